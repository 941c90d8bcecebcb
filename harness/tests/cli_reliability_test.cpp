// The cpharness binary when its surroundings fail: reports of two runs never mixed, a launcher that ran nothing,
// a full disk, a hung rank thread, hostile nesting, signals ignored at startup, a closed stderr pipe, fault specs
// that cannot fire, output paths that cannot be resolved. Exit code and report always agree.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include <nlohmann/json.hpp>

#include "harness/tests/io_test_util.h"
#include "harness/tests/run_command.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kGoodCase = R"({"id": "t", "model": {"preset": "tiny-31b"},
  "data": {"seq_len": 24, "padding": 4, "seed": 1}, "steps": 2})";

class CliReliability : public ::testing::Test {
 protected:
  std::string write(const fs::path& p, const std::string& text) {
    const auto path = p.is_absolute() ? p : dir_ / p;
    std::ofstream(path) << text;
    return path.string();
  }
  // An executable shell script in the test's directory (a stand-in interpreter or launcher).
  std::string write_script(const fs::path& p, const std::string& text) {
    const auto path = write(p, text);
    fs::permissions(path, fs::perms::owner_all);
    return path;
  }
  // Another run's reports, all passing, where this run writes its own.
  void plant_older_run(const fs::path& out) {
    fs::create_directories(out);
    write(out / "report.json", R"({"status": "pass", "note": "an older run"})");
    write(out / "report.xml", "<testsuites name=\"an older run\"/>");
    write(out / "report.html", "<html>an older run</html>");
  }
  // `env`: assignments put before the command. Killed after 2 minutes: what these tests guard against includes
  // runs that never end, which must fail the test, not hang it.
  cpharness::testing::CommandResult run_cli(const std::string& args, const std::string& env = "") {
    return cpharness::testing::run_command(env + " timeout -s KILL 120 " + std::string(CPHARNESS_BINARY) + " " + args);
  }
  // bash -c SCRIPT, with $B the binary and the script's words single-quote-free; killed after 2 minutes.
  cpharness::testing::CommandResult bash(const std::string& script) {
    return cpharness::testing::run_command("B=" + std::string(CPHARNESS_BINARY) + " timeout -s KILL 120 bash -c '" +
                                           script + "'");
  }
  cpharness::io::testing::TempDir tmp_;  // removed with the fixture, made writable first if a test locked it
  const fs::path dir_ = tmp_.path();
};

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_text(p)); }

// F1: json, xml and page of one --out are of one run: a page that cannot be rendered leaves no page, not the older
// run's beside this run's verdict.
TEST_F(CliReliability, APageThatCannotBeRenderedLeavesNoOlderPageBesideTheNewReports) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  plant_older_run(out);
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string(), "CPHARNESS_PYTHON=/bin/false");
  EXPECT_EQ(r.exit_code, 0) << r.output;  // the page --out adds is a convenience: the verdict stands
  EXPECT_NE(r.output.find("report.html not written"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out / "report.html")) << read_text(out / "report.html");
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "pass");
  EXPECT_FALSE(j.contains("note"));
  const auto xml = read_text(out / "report.xml");
  EXPECT_EQ(xml.find("an older run"), std::string::npos) << xml;
  EXPECT_NE(xml.find("<testcase"), std::string::npos) << xml;
}

// F2: mpirun's own status is no verdict: one that runs nothing (exit 0 or 1) is exit 2 with an error report naming
// the launcher, never the older run's pass nor a pass of nothing.
TEST_F(CliReliability, AnMpirunThatRanNoRankIsExit2NotAVerdict) {
  const auto c = write("g.json", kGoodCase);
  for (const std::string mpirun : {"/bin/true", "/bin/false"}) {
    SCOPED_TRACE(mpirun);
    const auto out = dir_ / fs::path(mpirun).filename();
    plant_older_run(out);
    auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 20 --out " + out.string(), "CPHARNESS_MPIRUN=" + mpirun);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    const auto j = read_json(out / "report.json");
    EXPECT_EQ(j["status"], "error") << j.dump(2);
    const auto error = j["error"].get<std::string>();
    EXPECT_NE(error.find(mpirun), std::string::npos) << error;
    EXPECT_NE(error.find("recorded no verdict"), std::string::npos) << error;
    EXPECT_EQ(read_text(out / "report.xml").find("an older run"), std::string::npos);
    EXPECT_FALSE(fs::exists(out / "report.html") && read_text(out / "report.html").find("an older run") != std::string::npos);
  }
}

// OpenMPI's shared-memory files outlive a job whose mpirun is killed: the job gets a directory of its own for them
// (OMPI_MCA_btl_vader_backing_directory), removed when the job ends however it ends; a directory the user chose is
// theirs. The stand-in mpirun leaves a segment there and dies of SIGKILL.
TEST_F(CliReliability, AJobsSharedMemoryFilesGoWithTheJob) {
  const auto c = write("g.json", kGoodCase);
  const auto seen = dir_ / "backing";
  const auto mpirun = write_script("mpirun", "#!/bin/sh\necho \"$OMPI_MCA_btl_vader_backing_directory\" > " +
                                                 seen.string() + "\ntouch \"$OMPI_MCA_btl_vader_backing_directory/"
                                                 "vader_segment.0\"\nkill -KILL $$\n");
  auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 20 --out " + (dir_ / "out").string(),
                   "CPHARNESS_MPIRUN=" + mpirun);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const std::string backing = read_text(seen).substr(0, read_text(seen).find('\n'));
  EXPECT_NE(backing.find("cpharness-shm-"), std::string::npos) << backing;
  EXPECT_FALSE(fs::exists(backing)) << backing << " outlived the job";
  const auto chosen = dir_ / "chosen";
  fs::create_directories(chosen);
  r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 20 --out " + (dir_ / "out").string(),
              "CPHARNESS_MPIRUN=" + mpirun + " OMPI_MCA_btl_vader_backing_directory=" + chosen.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(read_text(seen), chosen.string() + "\n");
  EXPECT_TRUE(fs::exists(chosen / "vader_segment.0"));
}

// F3: a stop signal when the error report cannot be written (a full disk; here a file size limit of 0) leaves no
// report, neither a truncated one nor the older run's pass, and no temp file.
TEST_F(CliReliability, AStopSignalOnAFullDiskLeavesNoTruncatedOrOlderReport) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  plant_older_run(out);
  // rank 1 hangs before step 0, so the run is still going when the signal comes.
  auto r = bash("trap \"\" XFSZ; ulimit -f 0; CPHARNESS_INJECT_FAULT=hang@1:0 $B run " + c +
                " --cp 2 --timeout 60 --out " + out.string() + " & pid=$!; sleep 4; kill -TERM $pid; wait $pid; echo EXIT=$?");
  EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("could not write the error report"), std::string::npos) << r.output;
  for (const char* name : {"report.json", "report.xml", "report.html"}) EXPECT_FALSE(fs::exists(out / name)) << name;
  for (const auto& e : fs::directory_iterator(out)) ADD_FAILURE() << "left behind: " << e.path();
}

// A file-size limit (ulimit -f, a CI sandbox) that the final report outgrows, with SIGXFSZ at its default: the write
// fails like one on a full disk (exit 2, said on stderr), not a process killed by the signal with a temp file left.
TEST_F(CliReliability, AFileSizeLimitIsAWriteErrorNotADeadProcess) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  plant_older_run(out);
  auto r = bash("trap - XFSZ; ulimit -f 4; $B run " + c + " --cp 2 --out " + out.string() + "; echo EXIT=$?");
  EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("File too large"), std::string::npos) << r.output;
  for (const auto& e : fs::directory_iterator(out)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
    EXPECT_EQ(read_text(e.path()).find("an older run"), std::string::npos) << e.path();
  }
}

// F4: an error report that cannot be written (a full disk) removes the older run's reports instead of leaving
// their pass beside this run's exit 2, and says so.
TEST_F(CliReliability, AnErrorReportThatCannotBeWrittenLeavesNoOlderReport) {
  const auto bad = write("bad.json", R"({"id": "t", "model": )");
  const auto out = dir_ / "out";
  plant_older_run(out);
  auto r = bash("trap \"\" XFSZ; ulimit -f 0; $B run " + bad + " --out " + out.string() + "; echo EXIT=$?");
  EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("could not write the error report"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("removed"), std::string::npos) << r.output;
  for (const char* name : {"report.json", "report.xml", "report.html"}) EXPECT_FALSE(fs::exists(out / name)) << name;
}

// F6: under --comm local a rank thread that hangs past --timeout ends the run (it cannot be joined): exit 2 and an
// error report naming the rank, within the timeout and a grace.
TEST_F(CliReliability, AHungRankThreadEndsTheLocalRunNamingIt) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  const auto start = Clock::now();
  auto r = run_cli("run " + c + " --cp 2 --timeout 3 --out " + out.string(), "CPHARNESS_INJECT_FAULT=hang@1:1");
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(30)) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("rank 1 failed or hung"), std::string::npos) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "error") << j.dump(2);
  EXPECT_NE(j["error"].get<std::string>().find("rank 1 failed or hung"), std::string::npos) << j["error"];
  EXPECT_NE(j["error"].get<std::string>().find("[culprit: rank 1]"), std::string::npos) << j["error"];
}

// F7: a case nested 100000 deep (anywhere in it) is an input error naming the file, not a stack overflow.
TEST_F(CliReliability, ADeeplyNestedCaseIsAnInputErrorNotACrash) {
  const int depth = 100000;
  const std::string arrays = std::string(depth, '[') + "1" + std::string(depth, ']');
  std::string objects;
  for (int i = 0; i < depth; ++i) objects += "{\"a\":";
  objects += "1" + std::string(depth, '}');
  const auto model = write("deep-model.json", "{\"id\": \"x\", \"model\": " + arrays + "}");
  const auto described = write("deep-description.json", R"({"id": "x", "model": {"preset": "tiny-31b"},
      "data": {"seq_len": 24}, "description": )" + objects + "}");
  for (const auto& path : {model, described}) {
    SCOPED_TRACE(path);
    const auto out = dir_ / "out";
    for (const auto& r : {run_cli("list " + path), run_cli("run " + path + " --cp 2 --out " + out.string())}) {
      EXPECT_EQ(r.exit_code, 2) << r.output.substr(0, 2000);
      EXPECT_NE(r.output.find(path), std::string::npos) << r.output.substr(0, 2000);
      EXPECT_NE(r.output.find("nested more than 64 levels deep"), std::string::npos) << r.output.substr(0, 2000);
    }
    EXPECT_EQ(read_json(out / "report.json")["status"], "error");
  }
}

// F8a: a stop signal ignored when cpharness started (nohup, a shell's background job) stays ignored: the run goes
// on to its own end (here: a hung rank, exit 2 naming it), not "stopped: received SIGHUP".
TEST_F(CliReliability, ASignalIgnoredAtStartupStaysIgnored) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  auto r = bash("trap \"\" HUP; CPHARNESS_INJECT_FAULT=hang@1:1 $B run " + c + " --cp 2 --timeout 2 --out " +
                out.string() + " & pid=$!; sleep 1.5; kill -HUP $pid; wait $pid; echo EXIT=$?");
  EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("SIGHUP"), std::string::npos) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_NE(j["error"].get<std::string>().find("rank 1 failed or hung"), std::string::npos) << j["error"];
}

// F8b: `cpharness run ... 2>&1 | head -1`: progress output into a closed pipe is dropped; the run does not die of
// SIGPIPE, its verdict and report stand.
TEST_F(CliReliability, AClosedOutputPipeDoesNotEndTheRun) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  plant_older_run(out);
  auto r = bash("$B run " + c + " --cp 2 --out " + out.string() + " 2>&1 | true; echo EXIT=${PIPESTATUS[0]}");
  EXPECT_NE(r.output.find("EXIT=0"), std::string::npos) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "pass");
  EXPECT_FALSE(j.contains("note"));
}

// F11: a fault that could never fire (the run would pass and prove nothing), or that would take the whole process
// down under --comm local (ranks are threads), is refused before any work: exit 2 naming CPHARNESS_INJECT_FAULT.
TEST_F(CliReliability, FaultsThatCannotFireOrWouldEndTheProcessAreRefused) {
  const auto c = write("g.json", kGoodCase);
  const std::pair<const char*, const char*> refused[] = {
      {"stop@1", "--comm mpi"},   {"throw@1", "never fire"},    {"throw@0:1", "never fire"}, {"hang@2", "not a rank"},
      {"hang@1:2", "not a step"}, {"crash@1", "--comm mpi"},    {"stop@0", "--comm mpi"},    {"hang@1:exit", "--comm mpi"},
      {"slow@1", "slow acts in the steps of rank 0's cp 1 reference"}, {"slow@0:1", "never fire"},
      {"slow@0:exit", "--comm mpi"},
  };
  for (const auto& [spec, why] : refused) {
    SCOPED_TRACE(spec);
    const auto out = dir_ / "out";
    const auto start = Clock::now();
    auto r = run_cli("run " + c + " --cp 2 --out " + out.string(), std::string("CPHARNESS_INJECT_FAULT=") + spec);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(20));
    EXPECT_EQ(r.output.find("step 0"), std::string::npos) << "the run started: " << r.output;
    const auto error = read_json(out / "report.json")["error"].get<std::string>();
    EXPECT_NE(error.find(std::string("CPHARNESS_INJECT_FAULT=") + spec), std::string::npos) << error;
    EXPECT_NE(error.find(why), std::string::npos) << error;
  }
}

// F9: an output path that cannot be resolved (longer than PATH_MAX, a symlink loop) is refused with its own
// reason, not as two outputs naming "the same file".
TEST_F(CliReliability, OutputPathsThatCannotBeResolvedAreRefusedWithTheirReason) {
  const auto c = write("g.json", kGoodCase);
  fs::create_directory_symlink(dir_ / "loop", dir_ / "loop");
  const std::pair<std::string, std::string> bad[] = {
      {(dir_ / std::string(5000, 'x')).string(), "too long"},
      {(dir_ / "loop" / "out").string(), "symbolic links"},
  };
  for (const auto& [path, reason] : bad) {
    SCOPED_TRACE(reason);
    auto r = run_cli("run " + c + " --cp 2 --out " + path);
    EXPECT_EQ(r.exit_code, 2) << r.output.substr(0, 3000);
    EXPECT_EQ(r.output.find("same file"), std::string::npos) << r.output.substr(0, 3000);
    EXPECT_NE(r.output.find(reason), std::string::npos) << r.output.substr(0, 3000);
    EXPECT_NE(r.output.find("--out"), std::string::npos) << r.output.substr(0, 3000);
  }
}

}  // namespace

namespace {

const std::string kSource = CPHARNESS_SOURCE_DIR;

// A launcher's variables in the environment of a local run (a torchrun worker, an srun step, a CI job that exports
// MASTER_PORT) are not this run's business: it runs, writes its reports and passes. For --comm nccl, where they
// matter, a malformed one is a usage error naming it (not an "internal error"), and an older run's pass is withdrawn.
TEST_F(CliReliability, LauncherVariablesAreIgnoredByALocalRunAndNamedWhenTheyMatter) {
  const auto c = write("g.json", kGoodCase);
  const std::string hostile = "RANK=abc WORLD_SIZE=2 SLURM_PROCID=5 SLURM_NTASKS=2 MASTER_PORT=http";
  auto out = dir_ / "local";
  plant_older_run(out);
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string(), hostile);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "pass");
  EXPECT_FALSE(read_json(out / "report.json").contains("note")) << "this run's report, not the older one";
  out = dir_ / "nccl";
  plant_older_run(out);
  const auto older = out / "report.json";
  write(older, read_text(dir_ / "local" / "report.json"));  // a real cpharness pass, which must not survive
  r = run_cli("run " + c + " --comm nccl --device cuda --out " + out.string(), "RANK=abc WORLD_SIZE=2");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("RANK"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(older)["status"], "error");
}

// A bad CPHARNESS_INTRA_OP_THREADS, read before the arguments, is a usage error like the others: an older run's
// report where this run would write is withdrawn.
TEST_F(CliReliability, ABadThreadCountWithdrawsTheOlderReport) {
  const auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out";
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --out " + out.string()).exit_code, 0);
  ASSERT_EQ(read_json(out / "report.json")["status"], "pass");
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string(), "CPHARNESS_INTRA_OP_THREADS=0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("CPHARNESS_INTRA_OP_THREADS"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "error");
  EXPECT_FALSE(fs::exists(out / "report.html"));
}

// An output flag given twice is a usage error; an older run's report at either value is withdrawn, not only at the
// last one (CLI11 keeps the last).
TEST_F(CliReliability, ARepeatedOutputFlagWithdrawsTheOlderReportAtEveryValue) {
  const auto c = write("g.json", kGoodCase);
  const auto first = dir_ / "first", second = dir_ / "second";
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --out " + first.string()).exit_code, 0);
  ASSERT_EQ(read_json(first / "report.json")["status"], "pass");
  auto r = run_cli("run " + c + " --cp 2 --out " + first.string() + " --out " + second.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(read_json(first / "report.json")["status"], "error");
  EXPECT_FALSE(fs::exists(first / "report.html"));
  const auto report = dir_ / "r.json";
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --report " + report.string()).exit_code, 0);
  ASSERT_EQ(read_json(report)["status"], "pass");
  r = run_cli("run " + c + " --cp 2 --report=" + report.string() + " --report " + (dir_ / "other.json").string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(read_json(report)["status"], "error");
}

// Started with SIGHUP and SIGINT ignored (nohup, a background job), cpharness ignores them, and so does the child
// that reads a golden first: a hang-up to the process group while it reads must not call a sound golden "damaged".
TEST_F(CliReliability, SignalsTheProcessIgnoresDoNotMakeASoundGoldenDamaged) {
  const auto report = dir_ / "verify.json";
  const auto script = write("hup.py", R"(import json, os, signal, subprocess, sys, time
p = subprocess.Popen([sys.argv[1], 'golden', 'verify', sys.argv[2] + '/cases/default/tiny-e4b-zigzag.json',
                      sys.argv[2] + '/golden/tiny-e4b-zigzag.h5', '--report', sys.argv[3]], stderr=subprocess.DEVNULL,
                     preexec_fn=lambda: (signal.signal(signal.SIGHUP, signal.SIG_IGN),
                                         signal.signal(signal.SIGINT, signal.SIG_IGN), os.setpgid(0, 0)))
sent = 0
while p.poll() is None:
    try:
        os.killpg(p.pid, signal.SIGHUP if sent % 2 else signal.SIGINT)
        sent += 1
    except ProcessLookupError:
        break
    time.sleep(0.005)
print('exit', p.returncode, 'signals', sent)
)");
  auto r = cpharness::testing::run_command("timeout -s KILL 120 /usr/bin/python3 " + script + " " +
                                           std::string(CPHARNESS_BINARY) + " " + kSource + " " + report.string());
  EXPECT_NE(r.output.find("exit 0"), std::string::npos) << r.output;
  const auto j = read_json(report);
  EXPECT_EQ(j["status"], "pass") << j.dump(2).substr(0, 2000);
}

// A renderer that never returns (a wedged interpreter, a font-cache lock) cannot hold the run: past its limit it is
// killed with what it started, the page is reported missing, and the verdict stands.
TEST_F(CliReliability, ARendererThatNeverReturnsIsKilledAtItsLimit) {
  const auto c = write("g.json", kGoodCase);
  const auto sleeper = write_script("sleepy-python.sh", "#!/bin/sh\nsleep 1000 &\nsleep 1000\n");
  const auto out = dir_ / "out";
  const auto start = Clock::now();
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string(),
                   "CPHARNESS_PYTHON=" + sleeper + " CPHARNESS_RENDER_TIMEOUT=2");
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(90)) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("did not finish within 2 s"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "pass");
  EXPECT_FALSE(fs::exists(out / "report.html"));
  // Nothing the renderer started is left: no process still runs the stand-in interpreter.
  auto left = cpharness::testing::run_command("pgrep -f '^/bin/sh " + sleeper + "' | wc -l");
  EXPECT_EQ(std::stoi(left.output), 0) << left.output;
}

// An mpirun that stays after rank 0 recorded its verdict (stopped, wedged in shutdown; here a wrapper that sleeps
// once the job is done) is killed within 2 x --timeout + 10 s of the verdict, exit 2 with an error report, instead
// of holding the run until --job-timeout (6 h by default).
TEST_F(CliReliability, AnMpirunThatOutstaysTheVerdictIsKilled) {
  const auto c = write("g.json", kGoodCase);
  const auto wrapper = write_script("lingering-mpirun.sh", "#!/bin/sh\nmpiexec \"$@\"\nsleep 1000\n");
  const auto out = dir_ / "out";
  const auto start = Clock::now();
  auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 5 --out " + out.string(), "CPHARNESS_MPIRUN=" + wrapper);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(100)) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("of rank 0 recording its verdict"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "error");
}

// An mpirun that never starts the ranks and stays (stopped or wedged at launch; here a wrapper that sleeps) is
// killed once no rank 0 has beaten for max(30 s, 2 x --timeout + 10 s), exit 2 with an error report naming why,
// instead of holding the run until --job-timeout (6 h by default).
TEST_F(CliReliability, AnMpirunThatNeverStartsTheRanksIsKilledWhenSilent) {
  const auto c = write("g.json", kGoodCase);
  const auto wrapper = write_script("wedged-mpirun.sh", "#!/bin/sh\nsleep 1000\n");
  const auto out = dir_ / "out";
  plant_older_run(out);
  const auto start = Clock::now();
  auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 5 --out " + out.string(), "CPHARNESS_MPIRUN=" + wrapper);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(100)) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no sign of life from rank 0 for 30000 ms"), std::string::npos) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "error") << j.dump(2);
  EXPECT_NE(j["error"].get<std::string>().find("no sign of life"), std::string::npos) << j.dump(2);
}

// --nproc is checked against the cases before any process starts: more ranks than a case has tokens (or than the
// harness allows) would each start and refuse, and a huge count grew mpirun itself without bound.
TEST_F(CliReliability, AnNprocNoCaseCanBeSplitOverIsRefusedBeforeLaunch) {
  const auto c = write("g.json", kGoodCase);
  for (const std::string n : {"25", "1000000000"}) {
    SCOPED_TRACE(n);
    const auto start = Clock::now();
    auto r = run_cli("run " + c + " --comm mpi --nproc " + n + " --report " + (dir_ / "r.json").string(),
                     "CPHARNESS_MPIRUN=/bin/false");
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(20)) << r.output;
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("--nproc " + n), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("launcher"), std::string::npos) << "no mpirun was started: " << r.output;
  }
}

// A timeout below a millisecond would be 0 ms, timing out at once and blaming a healthy rank: a usage error.
TEST_F(CliReliability, ATimeoutBelowAMillisecondIsAUsageError) {
  const auto c = write("g.json", kGoodCase);
  auto r = run_cli("run " + c + " --cp 2 --timeout 0.0001");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("0.001"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("timed out"), std::string::npos) << r.output;
}

// Inside an sbatch step or a torchrun worker the world is the launcher's: an --nproc that differs from it was
// dropped silently (and the case blamed for having no candidate cp size); it is a usage error naming both.
TEST_F(CliReliability, AnNprocUnderALauncherThatSaysOtherwiseIsAUsageError) {
  const auto c = write("g.json", kGoodCase);
  for (const std::string env : {"SLURM_PROCID=0 SLURM_NTASKS=1", "RANK=0 WORLD_SIZE=1 MASTER_PORT=29511"}) {
    SCOPED_TRACE(env);
    const auto out = dir_ / "out";
    plant_older_run(out);
    auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 20 --out " + out.string(), env);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("--nproc 2"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("world size 1"), std::string::npos) << r.output;
    EXPECT_EQ(read_json(out / "report.json")["status"], "error");
  }
}

// An mpirun that cannot be started, or a TMPDIR the launcher cannot write its verdict file in, is bad input
// naming the variable and the path (it was "a rank failed (mpirun status 127)" and an "internal error"), before
// any process starts; the older report is withdrawn.
TEST_F(CliReliability, AnMpirunOrTmpdirThatCannotBeUsedIsNamedBeforeLaunch) {
  const auto c = write("g.json", kGoodCase);
  struct Env {
    std::string env, variable, path;
  };
  for (const auto& e : {Env{"CPHARNESS_MPIRUN=/nonexistent/mpirun", "CPHARNESS_MPIRUN", "/nonexistent/mpirun"},
                        Env{"CPHARNESS_MPIRUN=" + dir_.string(), "CPHARNESS_MPIRUN", dir_.string()},
                        Env{"TMPDIR=/nonexistent/tmp", "TMPDIR", "/nonexistent/tmp"}}) {
    SCOPED_TRACE(e.env);
    const auto out = dir_ / "out";
    plant_older_run(out);
    // The job's verdict file goes to a TMPDIR of our own, so that one left behind shows.
    const auto tmp = dir_ / "tmp";
    std::filesystem::create_directories(tmp);
    const std::string env = e.variable == "TMPDIR" ? e.env : e.env + " TMPDIR=" + tmp.string();
    auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 20 --out " + out.string(), env);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_TRUE(std::filesystem::is_empty(tmp)) << "a file was left in TMPDIR";
    EXPECT_NE(r.output.find(e.variable), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(e.path), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("a rank failed"), std::string::npos) << r.output;
    EXPECT_EQ(read_json(out / "report.json")["status"], "error");
  }
}

}  // namespace
