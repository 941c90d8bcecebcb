#include "harness/cli/verbs.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "harness/cli/older_reports.h"
#include "harness/cli/stop_signals.h"
#include "harness/cli/usage_error.h"
#include "harness/cp/launcher.h"
#include "harness/io/atomic_file.h"
#include "harness/io/directory_lock.h"
#include "harness/io/error_text.h"
#include "harness/io/input_error.h"
#include "harness/report/compare.h"
#include "harness/report/compare_directories.h"
#include "harness/report/environment.h"
#include "harness/report/json_report.h"
#include "harness/report/junit.h"
#include "harness/report/run_dump.h"
#include "harness/runner/golden.h"
#include "harness/runner/selftest.h"
#include "harness/runner/root_wait.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"

namespace cpharness::cli {

ReportOutputs ReportOutputs::resolved() const {
  ReportOutputs r = *this;
  if (!out_dir.empty()) {
    if (r.report_path.empty()) r.report_path = out_dir + "/report.json";
    if (r.junit_path.empty()) r.junit_path = out_dir + "/report.xml";
    if (r.html_path.empty()) r.html_path = out_dir + "/report.html";
  }
  return r;
}

namespace {

// Runs argv (searched on PATH) and returns its exit status (127: it could not start, 128 + N: killed by signal N).
// The child dies with this process (PR_SET_PDEATHSIG), so a run that is killed leaves no renderer behind writing
// a page after it. One still running after `limit` (a wedged interpreter, a font-cache lock) is killed with its
// process group: 124, as timeout(1) says.
int run_child(std::vector<std::string> argv, std::chrono::seconds limit) {
  std::vector<char*> args;
  for (auto& s : argv) args.push_back(s.data());
  args.push_back(nullptr);
  std::cout.flush();
  std::cerr.flush();
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return 127;
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::setpgid(0, 0);             // its own group, so that a kill at the limit takes whatever it started too
    ::signal(SIGPIPE, SIG_DFL);  // ignored by this process only (main)
    ::execvp(args[0], args.data());
    const std::string why = std::string("cpharness: cannot run ") + args[0] + ": " + std::strerror(errno) + "\n";
    (void)!::write(2, why.data(), why.size());
    ::_exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return 127;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(-pid, SIGKILL);
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      std::cerr << "cpharness: " << argv[0] << " did not finish within " << limit.count() << " s; it was killed\n";
      return 124;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// How long the page may take: a large report renders in well under a minute.
constexpr std::chrono::seconds kRendererLimit{300};

// kRendererLimit, or CPHARNESS_RENDER_TIMEOUT seconds (1 to 86400) where set: a test stands in a renderer that hangs.
std::chrono::seconds renderer_limit() {
  const char* env = std::getenv("CPHARNESS_RENDER_TIMEOUT");
  if (!env || !*env) return kRendererLimit;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (*end != '\0' || v < 1 || v > 86400) {
    std::cerr << "cpharness: CPHARNESS_RENDER_TIMEOUT=" << std::string(env).substr(0, 40)
              << " is not a whole number of seconds from 1 to 86400; using " << kRendererLimit.count() << "\n";
    return kRendererLimit;
  }
  return std::chrono::seconds(v);
}

// The HTML page of report.json at `json_path` (reports/render_html.py under Debian's /usr/bin/python3 with its matplotlib; CPHARNESS_RENDERER
// names another copy of the script). False, with the renderer's one-line reason on stderr, when it failed.
bool render_html(const std::string& json_path, const std::string& html_path) {
  const char* env = std::getenv("CPHARNESS_RENDERER");
  const std::string script = env && *env ? env : CPHARNESS_RENDERER;
  if (!std::filesystem::exists(script)) {
    std::cerr << "cpharness: cannot write " << html_path << ": the renderer " << script
              << " is missing (set CPHARNESS_RENDERER to reports/render_html.py)\n";
    return false;
  }
  // Debian's interpreter (its matplotlib) where there is one; CPHARNESS_PYTHON names another (a GPU image's venv).
  const char* py_env = std::getenv("CPHARNESS_PYTHON");
  const std::string python = py_env && *py_env ? py_env : std::filesystem::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
  const auto started = std::filesystem::file_time_type::clock::now();
  const int status = run_child({python, script, json_path, "-o", html_path}, renderer_limit());
  if (status != 0) {
    std::cerr << "cpharness: " << html_path << " not written (the renderer's reason is above)\n";
    return false;
  }
  // A renderer that ends well without writing the page (a wrong CPHARNESS_PYTHON) has not rendered it.
  std::error_code ec;
  const auto written = std::filesystem::last_write_time(html_path, ec);
  if (ec || written < started - std::chrono::seconds(2)) {
    std::cerr << "cpharness: " << html_path << " not written: the renderer (" << python << " " << script
              << ") exited 0 without writing it\n";
    return false;
  }
  return true;
}

// Removes each file (unlinking needs no free space); the paths that were there.
std::vector<std::string> remove_files(const std::vector<std::string>& paths) {
  std::vector<std::string> removed;
  for (const auto& p : paths) {
    std::error_code ec;
    if (!p.empty() && std::filesystem::remove(p, ec)) removed.push_back(p);
  }
  return removed;
}

// The stand-in this process wrote (stand_in_until_finished), until a verdict or an error report replaces it.
struct StandIn {
  ReportOutputs outputs;
  std::string comm;
  bool standing = false;
};
StandIn& stand_in() {
  static StandIn s;
  return s;
}

// Writes every requested report; false when the HTML page could not be rendered (the others are written).
// The files in place always come from one run: the previous run's JSON, XML and page go before the new JSON is
// written (each file is still replaced atomically), so a run killed between two writes leaves files missing, never
// an older verdict, alone or beside a newer one; a page that cannot be rendered leaves no page.
// `final`: false only for the stand-in, which a stop signal still replaces.
bool write_reports(const ReportOutputs& outputs, const report::Report& r, bool final = true) {
  const auto o = outputs.resolved();
  if (!o.out_dir.empty()) std::filesystem::create_directories(o.out_dir);
  // Before the claim: a stop signal while another process holds the lock still stops this one.
  const io::DirectoryLocks taking_turns({o.report_path, o.junit_path, o.html_path});
  if (final) claim_reports_for_verdict();
  stand_in().standing = false;  // (replaced now, or removed if this write fails)
  remove_files({o.report_path, o.junit_path, o.html_path});
  if (!o.report_path.empty()) report::write_report_json(o.report_path, r);
  if (!o.junit_path.empty()) report::write_junit_xml(o.junit_path, r);
  if (o.html_path.empty()) return true;
  // The page that --out adds is a convenience: when it cannot be rendered the run's verdict stands. A page asked
  // for by --html is an output like the others, and its failure is exit 2.
  const bool asked = !outputs.html_path.empty();
  // Rendered from this run's report in a file of its own beside the page (a directory found writable before any
  // work), not from report.json, which another run writing to the same place may have replaced meanwhile.
  const std::string own = io::detail::temp_path_for(o.html_path);  // (removed by a stop signal's handler too)
  bool rendered = false;
  try {
    report::write_report_json(own, r);
    rendered = render_html(own, o.html_path);
  } catch (const std::exception& e) {
    std::cerr << "cpharness: cannot render " << o.html_path << ": " << io::one_line(e) << "\n";
  }
  std::error_code ec;
  std::filesystem::remove(own, ec);
  io::detail::untrack_temp_file(own);
  if (!rendered) remove_files({o.html_path});  // whatever a failed renderer left half-written
  return rendered || !asked;
}

// An output that cannot be written is found before any work, naming the flag: a directory is created (as the
// writers would) and must be writable; a file's directory must exist and be writable.
void require_writable_dir(const std::string& dir, const char* flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir, ec))
    throw UsageError(fmt::format("{} {}: cannot create the directory ({})", flag, io::clip(dir), ec ? ec.message() : "not a directory"));
  if (::access(dir.c_str(), W_OK) != 0) throw UsageError(fmt::format("{} {}: the directory is not writable", flag, dir));
}
void require_writable_file(const std::string& path, const char* flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)  // too long, a symlink loop, a path through a file
    throw UsageError(fmt::format("{} {}: cannot be written ({})", flag, io::clip(path), ec.message()));
  if (fs::is_directory(status)) throw UsageError(fmt::format("{} {}: is a directory", flag, path));
  if (fs::exists(status) && !fs::is_regular_file(status))  // a FIFO or device is never replaced by a report
    throw UsageError(fmt::format("{} {}: exists and is not a regular file", flag, path));
  auto parent = fs::path(path).parent_path();
  if (parent.empty()) parent = ".";
  if (!fs::is_directory(parent, ec)) throw UsageError(fmt::format("{} {}: the directory {} does not exist", flag, path, parent.string()));
  if (::access(parent.c_str(), W_OK) != 0) throw UsageError(fmt::format("{} {}: the directory {} is not writable", flag, path, parent.string()));
  // Reports are written atomically: a temporary file beside the path, renamed over it. So the directory must take
  // a new file, which access() cannot tell for root or a read-only mount (/proc, a read-only bind): one is made.
  const std::string probe = (parent / fmt::format(".cpharness-write-test-{}", ::getpid())).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    throw UsageError(fmt::format("{} {}: no file can be made in {} ({})", flag, path, parent.string(), std::strerror(errno)));
  ::close(fd);
  ::unlink(probe.c_str());
}

// An output on one of the command's inputs would destroy it (a case file replaced by its own report, a golden by
// a comparison's JSON).
void require_not_an_input(const std::string& output, const char* flag, const std::vector<std::string>& inputs) {
  for (auto& input : inputs) {
    std::error_code ec;
    if (!output.empty() && std::filesystem::equivalent(output, input, ec) && !ec)
      throw UsageError(fmt::format("{} {}: is an input of this command ({}), which it would overwrite", flag,
                                   io::clip(output), io::clip(input)));
  }
}

}  // namespace

void check_outputs_writable(const ReportOutputs& outputs, const std::string& dump_dir,
                            const std::vector<std::string>& inputs) {
  // Two outputs on one path: the second would overwrite the first (report.json lost under the XML).
  const auto o = outputs.resolved();
  const std::vector<std::pair<std::string, const char*>> files = {
      {o.report_path, "--report"}, {o.junit_path, "--junit"}, {o.html_path, "--html"}};
  for (size_t i = 0; i < files.size(); ++i)
    for (size_t k = i + 1; k < files.size(); ++k) {
      if (files[i].first.empty() || files[k].first.empty()) continue;
      // Two paths that cannot be resolved (too long, a symlink loop) are not the same file: the checks below say why.
      std::error_code ec_i, ec_k;
      const auto a = std::filesystem::weakly_canonical(files[i].first, ec_i);
      const auto b = std::filesystem::weakly_canonical(files[k].first, ec_k);
      if (!ec_i && !ec_k && a == b)
        throw UsageError(fmt::format("{} and {} name the same file {}", files[i].second, files[k].second, files[i].first));
    }
  for (auto& [path, flag] : files) require_not_an_input(path, flag, inputs);
  if (!outputs.out_dir.empty()) require_writable_dir(outputs.out_dir, "--out");
  if (!outputs.report_path.empty()) require_writable_file(outputs.report_path, "--report");
  if (!outputs.junit_path.empty()) require_writable_file(outputs.junit_path, "--junit");
  if (!outputs.html_path.empty()) require_writable_file(outputs.html_path, "--html");
  if (!dump_dir.empty()) require_writable_dir(dump_dir, "--dump-dir");
}

namespace {

// A run that failed as a whole: an error report (never a partial or passing one).
void write_error_report(const ReportOutputs& outputs, const std::string& comm, const std::string& message,
                        bool final = true) {
  auto r = report::new_report("cpu", comm);
  r.error = message;
  const auto o = outputs.resolved();
  std::vector<std::string> older;  // (write_reports removes them before it writes)
  for (const auto& p : {o.report_path, o.junit_path, o.html_path}) {
    std::error_code ec;
    if (!p.empty() && std::filesystem::exists(p, ec)) older.push_back(p);
  }
  try {
    write_reports(outputs, r, final);
  } catch (const std::exception& e) {
    // (A full disk.) No report at all rather than another run's beside this exit 2: unlinking needs no space.
    remove_files({o.report_path, o.junit_path, o.html_path});
    std::vector<std::string> removed;
    for (const auto& p : older) {
      std::error_code ec;
      if (!std::filesystem::exists(p, ec)) removed.push_back(p);
    }
    std::cerr << "cpharness: could not write the error report: " << io::one_line(e)
              << (removed.empty() ? std::string() : fmt::format("; removed {} instead, so that no other run's report "
                                                                "stands in its place", fmt::join(removed, ", ")))
              << "\n";
  }
}

// The verdict's stand-in, written before any work: an error report saying that the command has not finished,
// which the verdict (or an error report) replaces when it ends. A process killed outright (SIGKILL from an
// out-of-memory killer or a job's time limit: no handler runs) or crashed (SIGSEGV, SIGABRT) leaves this report, never
// an older run's pass in its place; the older run's page goes, and no page is rendered for the stand-in.
constexpr const char* kUnfinished = " did not finish: it started at ";

void stand_in_until_finished(const std::string& verb, const ReportOutputs& outputs, const std::string& comm) {
  auto o = outputs.resolved();
  remove_files({o.html_path});
  o.html_path.clear();
  o.out_dir.clear();  // (created by check_outputs_writable)
  write_error_report(o, comm, fmt::format("{}{}{} (pid {}) and ended before writing its verdict: it was killed "
                                          "(SIGKILL: an out-of-memory killer, a job's time limit) or it crashed",
                                          verb, kUnfinished, report::utc_timestamp_now(), ::getpid()),
                     /*final=*/false);
  stand_in() = {o, comm, true};
}

bool is_stand_in(const nlohmann::json& report) {
  const auto error = report.find("error");
  return error != report.end() && error->is_string() && error->get<std::string>().find(kUnfinished) != std::string::npos;
}

// What a stop signal leaves from here on (stop_signals.h): the error report in every report file asked for
// (rendered now, the handler cannot), no page of another run.
void end_cleanly_on_stop(const std::string& verb, const ReportOutputs& outputs, const std::string& comm) {
  const auto o = outputs.resolved();
  StopReportFile json{o.report_path, {}}, xml{o.junit_path, {}};
  for (int i = 0; i < 3; ++i) {
    auto r = report::new_report("cpu", comm);
    r.error = fmt::format("{} stopped: received {} before it finished", verb, stop_signal_name(i));
    json.contents[i] = report::json_text(report::to_json(r));
    xml.contents[i] = report::to_junit_xml(r);
  }
  std::vector<StopReportFile> files;
  if (!o.report_path.empty()) files.push_back(json);
  if (!o.junit_path.empty()) files.push_back(xml);
  std::vector<std::string> stale;
  if (!o.html_path.empty()) stale.push_back(o.html_path);
  end_on_stop_signals(verb, std::move(files), std::move(stale));
}

// What a rank thread that hangs past --timeout leaves (run_local gives it up; cp/launcher.h): the error report
// naming the rank, exit 2 (`code`: bisect's skip instead).
void end_cleanly_on_hung_rank(const std::string& verb, const ReportOutputs& outputs, const std::string& comm, int code = 2) {
  cp::on_hung_local_rank([=](int, const std::string& message) {
    const std::string why = fmt::format("{} failed: {}", verb, io::clip(message, 1000));
    std::cerr << "cpharness: " << why << " (exit " << code << ")" << std::endl;
    if (code == 2) write_error_report(outputs, comm, why);
    std::cerr.flush();
    std::_Exit(code);
  });
}

// Bad input found before any case ran: exit 2 with an error report.
int input_error_report(const ReportOutputs& outputs, const std::string& comm, const std::string& message) {
  std::cerr << "cpharness: error: " << message << "\n";
  write_error_report(outputs, comm, message);
  return 2;
}

// The verdict of a finished report: summary table to stderr, reports written, exit code.
int finish(const ReportOutputs& outputs, const report::Report& r, bool allow_nothing_ran = false) {
  std::cerr << runner::summary_table(r);
  const int code = report::exit_code(r, allow_nothing_ran);
  if (code == report::kExitNothingRan)
    std::cerr << "cpharness: no check ran (every case was skipped): exit 3; pass --allow-nothing-ran to accept that\n";
  return write_reports(outputs, r) || code != 0 ? code : 2;
}

std::chrono::milliseconds millis(double seconds) { return std::chrono::milliseconds(int64_t(seconds * 1000)); }

runner::SuiteOptions suite_options(const RunArgs& a) {
  runner::SuiteOptions o;
  if (!a.cp.empty()) o.cp_sizes = a.cp;
  o.comm = a.comm;
  o.dump_dir = a.dump_dir;
  o.timeout = millis(a.timeout_s);
  o.root_wait = o.timeout;  // every wait is bounded by --timeout, rank 0's cp 1 reference included
  if (!a.device.empty()) o.device = a.device;
  o.run.ring.cuda_attention = a.cuda_attention == "ops"           ? cp::CudaAttentionPath::kOps
                              : a.cuda_attention == "kernel-fp32" ? cp::CudaAttentionPath::kKernelFp32
                                                                  : cp::CudaAttentionPath::kKernel;
  return o;
}

// CPHARNESS_PLANT_BUG=NAME: one bug of the selftest catalogue planted in every candidate run of `run` and `bisect`,
// so that a user can prove their CI gate or bisect recipe goes red on a real CP bug. Said on stderr and in the
// report's environment (planted_bug); never set in a real run.
runner::SuiteOptions plant_bug_from_env(runner::SuiteOptions o) {
  const char* name = std::getenv("CPHARNESS_PLANT_BUG");
  if (!name || !*name) return o;
  runner::SuiteOptions planted;
  try {
    planted = runner::mutate(o, name);
  } catch (const std::invalid_argument& e) {
    std::vector<std::string> known;
    for (auto& m : runner::selftest_mutants()) known.push_back(m.name);
    throw UsageError(fmt::format("CPHARNESS_PLANT_BUG: {}; known: {}", e.what(), fmt::join(known, ", ")));
  }
  planted.planted_bug = name;
  std::cerr << fmt::format("cpharness: CPHARNESS_PLANT_BUG={}: a known bug is planted in every candidate run\n", name);
  for (auto& m : runner::selftest_mutants())
    if (m.name == name && !m.acts_only_with.empty())
      std::cerr << fmt::format("cpharness: note: this bug acts only in cases with {}; in others the runs are unchanged\n",
                               m.acts_only_with);
  return planted;
}

std::string fault_spec() {
  const char* spec = std::getenv("CPHARNESS_INJECT_FAULT");
  return spec ? spec : "";
}

std::optional<runner::Fault> fault_from_env() {
  const auto spec = fault_spec();
  if (spec.empty()) return std::nullopt;
  try {
    return runner::parse_fault(spec);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("CPHARNESS_INJECT_FAULT: ") + e.what());
  }
}

// Why the injected fault cannot do what it is for in this run: one that never fires lets the run pass (and proves
// nothing), and one that takes the whole process down under --comm local (ranks are threads: a thread cannot crash
// or freeze alone) ends it without a report. Checked against every case before any work.
std::optional<std::string> fault_problem(const runner::Fault& f, const std::string& spec, const std::vector<train::Case>& cases,
                                         const runner::SuiteOptions& o) {
  using Kind = runner::Fault::Kind;
  const bool local = o.world == nullptr;
  const std::string kind = spec.substr(0, spec.find('@'));
  if (local && f.kind == Kind::kCrash)
    return "crash aborts the whole process under --comm local (the ranks are threads of one process: a thread "
           "cannot crash alone, and nothing would be left to write the report); inject it under --comm mpi";
  if (local && f.kind == Kind::kStop)
    return "stop freezes the whole process under --comm local (the ranks are threads of one process); inject it "
           "under --comm mpi";
  if (local && f.at_exit) return "KIND@RANK:exit acts when a rank's process ends: it needs --comm mpi";
  auto cp_sizes = [&](const train::Case& c) {  // the candidates' sizes, as run_suite reads them
    if (o.world) return std::vector<int64_t>{o.world->size()};
    return o.cp_sizes ? std::vector<int64_t>(o.cp_sizes->begin(), o.cp_sizes->end()) : c.cp_sizes;
  };
  int world = 0;
  std::vector<int64_t> sizes;
  for (const auto& c : cases)
    for (int64_t n : cp_sizes(c)) {
      world = std::max<int>(world, int(n));
      if (std::find(sizes.begin(), sizes.end(), n) == sizes.end()) sizes.push_back(n);
    }
  if (f.rank >= world)
    return fmt::format("rank {} is not a rank of this run (cp sizes {}: ranks 0 to {}), so the fault would never fire",
                       f.rank, fmt::join(sizes, ", "), world - 1);
  if (f.kind == Kind::kSlow && (f.rank != 0 || spec.find(':') != std::string::npos))
    return fmt::format("slow acts in the steps of rank 0's cp 1 reference (slow@0); {} would never fire", spec);
  if (f.at_exit || f.kind == Kind::kSlow) return std::nullopt;
  if (f.kind == Kind::kStop || f.kind == Kind::kThrow) {
    if (f.rank != 0 || spec.find(':') != std::string::npos)
      return fmt::format("{} acts on rank 0 before its cp 1 reference ({}@0) or when a rank's process ends ({}@RANK:exit, "
                         "--comm mpi); {} would never fire", kind, kind, kind, spec);
    return std::nullopt;
  }
  int64_t steps = 0;  // of the cases in which the rank exists
  for (const auto& c : cases)
    for (int64_t n : cp_sizes(c))
      if (f.rank < n) steps = std::max(steps, c.steps);
  if (f.step >= steps)
    return fmt::format("step {} is not a step of this run (rank {} trains steps 0 to {}), so the fault would never fire",
                       f.step, f.rank, steps - 1);
  return std::nullopt;
}

// True when `path` holds a report with status error written at or after `since` (not rank 0's stand-in: the
// launcher's reason replaces that).
bool is_error_report_written_since(const std::string& path, std::filesystem::file_time_type since) {
  std::error_code ec;
  const auto when = std::filesystem::last_write_time(path, ec);
  if (ec || when < since) return false;
  std::ifstream in(path);
  const auto doc = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) return false;
  const auto status = doc.find("status");
  return status != doc.end() && *status == "error" && !is_stand_in(doc);
}

// --comm mpi outside a launcher: run this command again under mpirun with N ranks. When the job dies without
// rank 0 having written its report (a rank crashed and mpirun stopped the rest), write the error report here.
int launch_mpi_job(const RunArgs& a) {
  if (a.nproc < 1) throw UsageError("--comm mpi needs --nproc N (or a launch under mpirun/srun)");
  // Before a process starts: N ranks that no case can be split over would each start, load and refuse (a huge N
  // grows mpirun itself without bound).
  std::vector<train::Case> cases;
  try {
    cases = train::load_cases(a.cases);
  } catch (const io::InputError&) {  // bad input: the ranks refuse it together, as under any launcher
  }
  for (const auto& c : cases)
    if (auto why = train::cp_size_problem(a.nproc, c.data.seq_len))
      throw UsageError(fmt::format("--nproc {}: case {} ({}): {}", a.nproc, c.id, c.path, *why));
  std::vector<std::string> child = {"run"};
  for (size_t i = 0; i < a.argv.size(); ++i) {
    if (a.argv[i] == "--nproc") ++i;
    else if (a.argv[i].rfind("--nproc=", 0) != 0) child.push_back(a.argv[i]);
  }
  const auto outputs = a.outputs.resolved();
  const auto started = std::filesystem::file_time_type::clock::now();
  cp::MpirunOptions mpirun;
  // The whole job's deadline, besides every wait inside it being bounded by --timeout: the ranks' own timeouts
  // end a stuck job first; this catches what they cannot (a launcher stuck before the ranks run).
  mpirun.job_timeout = std::chrono::milliseconds(int64_t(std::max(60.0, a.job_timeout_s) * 1000));
  mpirun.require_verdict = true;  // mpirun's own 0 or 1 is no verdict (/bin/true, a failed launch)
  // After rank 0's verdict only the ranks' agreement and MPI's shutdown are left, each bounded by --timeout.
  mpirun.after_verdict = std::chrono::milliseconds(int64_t(2 * a.timeout_s * 1000)) + std::chrono::seconds(10);
  // Before it, rank 0 beats once its world is up: a job silent as long (mpirun stopped or wedged before the ranks
  // run, the whole job frozen) is ended too. Starting N processes and MPI_Init take seconds; the floor allows a
  // loaded machine.
  mpirun.silence_limit = std::max(std::chrono::milliseconds(30000), mpirun.after_verdict);
  const auto result = cp::relaunch_under_mpirun(a.nproc, cp::self_exe(), child, mpirun);
  if (result.stop_signal) {  // interrupted: whatever rank 0 managed to write is replaced by the error report
    write_error_report(a.outputs, a.comm, result.message.substr(std::string("cpharness: ").size()));
    return 2;
  }
  if (result.exit_code == 0 || result.exit_code == 1 || result.exit_code == 3) return result.exit_code;
  // Exit 2 and the report must agree: rank 0's own error report (written during this job: it has the details) is
  // kept; anything else there (a pass rank 0 wrote before a rank died or hung in shutdown, another run's report
  // in the same directory, an older one) is replaced by the launcher's error report.
  if (!outputs.report_path.empty() && !is_error_report_written_since(outputs.report_path, started)) {
    std::string why = result.message;
    if (why.rfind("cpharness: ", 0) == 0) why.erase(0, std::string("cpharness: ").size());
    write_error_report(a.outputs, a.comm, "the rank job failed: " + why);
  }
  return 2;
}

}  // namespace

int run_verb_checked(const RunArgs& a);

int run_verb(const RunArgs& a) {
  // A local run is no rank of a launched job whatever RANK, SLURM_PROCID or MASTER_PORT say (a torchrun worker, an
  // srun step, a CI environment): it writes its reports, with their stand-in and stop handling. For mpi and nccl a
  // malformed launcher variable is a usage error, found before any work (older reports withdrawn).
  cp::LaunchEnv env;
  if (a.comm != "local") {
    try {
      env = cp::detect_launch_env();
    } catch (const std::runtime_error& e) {
      throw UsageError(std::string("--comm ") + a.comm + ": " + e.what());
    }
  }
  if (env.source == cp::LaunchEnv::Source::Mpirun) cp::end_with_parent(env.rank);
  const bool writes_reports = !env.launched() || env.rank == 0;  // rank 0 of a rank job writes them
  if (writes_reports) check_outputs_writable(a.outputs, a.dump_dir, a.cases);
  if (!env.launched()) {
    end_cleanly_on_stop("run", a.outputs, a.comm);
    end_cleanly_on_hung_rank("run", a.outputs, a.comm);
  }
  // Under torchrun or srun nothing of cpharness outlives a killed rank 0: its stand-in is the report that stays.
  if (writes_reports) stand_in_until_finished("run", a.outputs, a.comm);
  try {
    return run_verb_checked(a);
  } catch (const UsageError& e) {
    // (Found once the stand-in is in place: --comm nccl outside a launcher, --comm mpi without --nproc.)
    if (writes_reports) write_error_report(a.outputs, a.comm, std::string("usage error: ") + e.what());
    throw;
  } catch (const std::exception& e) {
    // Whatever went wrong, the report asked for says so (one line, no backtrace) and the exit code is 2. In a rank
    // job only rank 0 writes it (another rank's would overwrite the real cause), and the rank ends the job at once
    // instead of leaving its peers to time out in the verdict's broadcast and MPI's shutdown.
    const std::string why = exception_text(e);
    if (!env.launched()) return input_error_report(a.outputs, a.comm, why);
    if (env.rank == 0) input_error_report(a.outputs, a.comm, why);
    cp::fail_rank(nullptr, env.rank, why);
  }
}

int run_verb_checked(const RunArgs& a) {
  auto options = plant_bug_from_env(suite_options(a));
  options.run.fault = fault_from_env();
  std::unique_ptr<cp::Comm> world;
  if (a.comm == "mpi") {
    const auto env = cp::detect_launch_env();
    if (!env.launched()) return launch_mpi_job(a);
    // Under a launcher (an sbatch step, a torchrun worker, mpirun) the world is the launcher's: an --nproc that
    // differs would be dropped silently, and the run would judge a cp size nobody asked for.
    const std::string vars = env.source == cp::LaunchEnv::Source::Slurm      ? "SLURM_PROCID/SLURM_NTASKS"
                             : env.source == cp::LaunchEnv::Source::Torchrun ? "RANK/WORLD_SIZE"
                                                                             : "OMPI_COMM_WORLD_RANK/SIZE";
    if (a.nproc && a.nproc != env.world_size)
      throw UsageError(fmt::format("--nproc {}: this process already runs under a launcher ({}, world size {} by {}), "
                                   "whose ranks --nproc cannot change: leave --nproc out under a launcher, or start "
                                   "cpharness outside one", a.nproc, cp::launch_source_name(env.source), env.world_size, vars));
    world = cp::make_mpi_comm(options.timeout);
    if (world->size() != env.world_size)
      throw std::runtime_error(fmt::format("MPI started {} rank(s) but the launcher's variables ({}: {}) say {}: this "
                                           "MPI library does not see the launcher's job (for srun, an MPI without its "
                                           "PMI support)", world->size(), cp::launch_source_name(env.source), vars,
                                           env.world_size));
    options.world = world.get();
    if (world->rank() == 0) cp::start_job_heartbeat();  // for an --nproc launcher: the job is alive
  } else if (a.comm == "nccl") {
    // One process per GPU, started by torchrun, srun or mpirun (RANK/WORLD_SIZE/LOCAL_RANK or their equivalents);
    // rendezvous on MASTER_ADDR/MASTER_PORT; every rank trains on its local rank's GPU.
    const auto env = cp::detect_launch_env();
    if (!env.launched())
      throw UsageError("--comm nccl runs one process per GPU: start it under torchrun, srun or mpirun (RANK, "
                       "WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/MASTER_PORT)");
    if (!options.device) options.device = "cuda";
    if (!train::parse_device(*options.device).is_cuda())
      throw UsageError("--comm nccl moves CUDA tensors: --device must be cuda");
    try {
      world = cp::make_nccl_comm(env, options.timeout);
    } catch (const cp::CommError& e) {  // no GPU, NCCL not built, rendezvous failed: an error report, exit 2
      if (env.rank == 0) return input_error_report(a.outputs, a.comm, std::string("nccl: ") + e.what());
      std::cerr << fmt::format("cpharness: rank {}: nccl: {}\n", env.rank, io::one_line(e));  // rank 0 writes the report
      return 2;
    }
    options.world = world.get();
  }
  const bool root = !world || world->rank() == 0;
  // Bad input: every rank sees the same files and refuses together; rank 0 writes the error report and, for an
  // --nproc launcher, records the exit 2 as this job's verdict (no rank failed).
  auto refuse = [&](const std::string& why) {
    if (!root) return 2;
    const int code = input_error_report(a.outputs, a.comm, why);
    if (world) cp::record_job_verdict(code);
    return code;
  };
  std::vector<train::Case> cases;
  try {
    cases = train::load_cases(a.cases);  // validate every case before running any
  } catch (const io::InputError& e) {
    return refuse(e.what());
  }
  for (auto& c : cases)  // a configuration that cannot run is refused before any work
    if (auto why = runner::unsupported_configuration(c, options)) return refuse(c.path + ": " + *why);
  if (options.run.fault)
    if (auto why = fault_problem(*options.run.fault, fault_spec(), cases, options))
      return refuse("CPHARNESS_INJECT_FAULT=" + fault_spec() + ": " + *why);
  auto r = runner::run_suite(cases, options);
  const int code = root ? finish(a.outputs, r, a.allow_nothing_ran) : report::exit_code(r, a.allow_nothing_ran);
  if (!world) return code;
  if (root) cp::record_job_verdict(code);  // for an --nproc launcher: this job's rank 0 reached it, reports written
  if (options.world_failed) {
    // Ending the job stops every rank at once: give rank 0 a moment to finish writing its error report first.
    if (!root) std::this_thread::sleep_for(std::chrono::seconds(3));
    // Pinned on the peer this rank was waiting for, so the launcher names the rank that failed or hung.
    const int culprit = options.failed_peer >= 0 ? options.failed_peer : world->rank();
    cp::fail_rank(world.get(), culprit, fmt::format("stopped or unresponsive (seen by rank {})", world->rank()));
  }
  // One rank exiting non-zero ends the job: every rank leaves with rank 0's verdict. A peer that does not take part
  // (stopped, hung) is named as in any failed collective, and the report rank 0 wrote gives way to the error.
  // The others wait for it on rank 0's signs of life: its judgement of the last case may outlast --timeout.
  int64_t verdict = code;
  try {
    // (Rank 0 wrote its reports first, rendering the page included, which has its own limit.)
    verdict = runner::wait_for_root(*world, code, options.root_wait + renderer_limit() + std::chrono::seconds(30));
  } catch (const cp::CommError& e) {
    std::string why = "the ranks could not agree on the verdict: " + io::one_line(e);
    if (e.peer() >= 0 && e.peer() != world->rank()) why += " [culprit: rank " + std::to_string(e.peer()) + "]";
    if (root) write_error_report(a.outputs, a.comm, why);
    cp::fail_rank(world.get(), world->rank(), "CommError: " + why);
  }
  const auto& fault = options.run.fault;
  if (fault && fault->at_exit && fault->rank == world->rank()) runner::inject_fault(*fault);
  return int(verdict);
}

int selftest_verb(const SelftestArgs& a) {
  std::vector<std::string> known;
  for (auto& m : runner::selftest_mutants()) known.push_back(m.name);
  for (auto& name : a.only)  // an unknown name would run nothing and exit 3, looking like a skipped suite
    if (std::find(known.begin(), known.end(), name) == known.end())
      throw UsageError(fmt::format("--only {}: no such mutant; known: {}", name.empty() ? "''" : name, fmt::join(known, ", ")));
  check_outputs_writable(a.outputs);
  end_cleanly_on_stop("selftest", a.outputs, "local");
  end_cleanly_on_hung_rank("selftest", a.outputs, "local");
  stand_in_until_finished("selftest", a.outputs, "local");
  runner::SuiteOptions options;
  options.timeout = millis(a.timeout_s);
  return finish(a.outputs, runner::run_selftest(options, a.only));
}

int golden_record_verb(const std::string& case_path, const std::string& out_path, bool force) {
  require_not_an_input(out_path, "-o", {case_path});  // --force or not
  if (std::filesystem::exists(out_path) && !force)
    throw io::InputError(out_path, "golden", "exists; refreshing a golden is explicit: pass --force");
  const auto c = train::load_case(case_path);
  if (!c.requires_features.empty())
    throw io::InputError(case_path, "requires", "cannot record a golden here: requires " + c.requires_features.front());
  end_on_stop_signals("golden record", {}, {});  // (its temp file removed, the old golden untouched)
  // Without --force the golden is never overwritten, also not one another command recorded there meanwhile.
  try {
    report::write_run_dump(out_path, runner::reference_dump(c, report::kKindGolden), force);
  } catch (const io::InputError&) {
    if (!force && std::filesystem::exists(out_path))
      throw io::InputError(out_path, "golden", "was recorded by another command while this one ran; it is not replaced "
                                               "(refreshing a golden is explicit: pass --force)");
    throw;
  }
  std::cerr << fmt::format("recorded {} ({}, {} steps) -> {}\n", c.id, train::to_string(c.dtype), c.steps, out_path);
  return 0;
}

int golden_verify_verb(const std::string& case_path, const std::string& golden_path, const ReportOutputs& outputs) {
  check_outputs_writable(outputs, "", {case_path, golden_path});
  end_cleanly_on_stop("golden verify", outputs, "local");
  end_cleanly_on_hung_rank("golden verify", outputs, "local");
  stand_in_until_finished("golden verify", outputs, "local");
  return finish(outputs, runner::run_golden_verify(case_path, golden_path));
}

int compare_verb(const CompareArgs& a) {
  if (!a.json_path.empty()) {  // before the comparison, not after it
    require_not_an_input(a.json_path, "--json", {a.a, a.b});
    require_writable_file(a.json_path, "--json");
  }
  report::ComparePolicy policy;
  try {
    policy = report::ComparePolicy::parse(a.policy);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--policy: ") + e.what());
  }
  // An older comparison's JSON goes before the work: a compare that fails on bad input, or is killed, must not leave
  // it to be read as this one's.
  if (!a.json_path.empty()) {
    std::error_code ec;
    std::filesystem::remove(a.json_path, ec);
  }
  namespace fs = std::filesystem;
  if (fs::is_directory(a.a) || fs::is_directory(a.b)) {
    if (!fs::is_directory(a.a) || !fs::is_directory(a.b)) throw UsageError("compare: give two files or two directories");
    const auto result = report::compare_directories(a.a, a.b, policy, a.rows);
    std::cout << result.text;
    if (!a.json_path.empty()) report::write_file_atomically(a.json_path, report::json_text(result.doc));
    return result.passed ? 0 : 1;
  }
  const auto result = report::compare_dumps(report::read_run_dump(a.a), report::read_run_dump(a.b), policy);
  std::cout << report::render_text(result, a.a, a.b, a.rows);
  if (!a.json_path.empty()) report::write_file_atomically(a.json_path, report::json_text(report::to_json(result)));
  return result.passed ? 0 : 1;
}

int hf_parity_verb(const runner::HfParityOptions& options, const ReportOutputs& outputs) {
  check_outputs_writable(outputs, "", options.paths);
  end_cleanly_on_stop("hf-parity", outputs, "local");
  end_cleanly_on_hung_rank("hf-parity", outputs, "local");
  stand_in_until_finished("hf-parity", outputs, "local");
  try {
    runner::hf_golden_files(options.paths);  // a missing path is bad input, before any golden runs
  } catch (const io::InputError& e) {
    return input_error_report(outputs, "local", e.what());
  }
  return finish(outputs, runner::run_hf_parity(options));
}

// For `git bisect run`: judges what `run` judges for the case (every check it selects, at its cp sizes, with the
// local backend) plus golden.match when a golden is given. 0 good (every check passed), 1 bad (a check failed), 125
// skip (the commit cannot be judged: bad input, a run that could not be made, a case skipped here, an errored
// check), so that a CP regression (which a cp 1 comparison cannot see) is found like any other.
namespace {

int bisect_verb_judged(const std::string& case_path, const std::string& golden_path) {
  auto skip = [](const std::string& why) {
    std::cerr << "bisect: skip (the commit cannot be judged): " << why << "\n";
    return 125;
  };
  end_cleanly_on_hung_rank("bisect", {}, "local", 125);  // a hung rank: the commit cannot be judged
  try {
    const auto c = train::load_case(case_path);
    if (!golden_path.empty() && !std::filesystem::is_regular_file(golden_path))  // before the case trains
      return skip(golden_path + ": no such golden file");
    const auto options = plant_bug_from_env(runner::SuiteOptions{});
    if (auto why = runner::unsupported_configuration(c, options)) return skip(c.path + ": " + *why);
    const auto r = runner::run_suite({c}, options);
    const auto& rep = r.cases.at(0);
    if (rep.status() == report::Status::Error) return skip(rep.error_reason().value_or("the case errored"));
    if (rep.status() == report::Status::Skipped) return skip(rep.skip_reason.value_or("the case was skipped"));
    std::vector<report::CheckResult> judged = rep.checks;
    if (!golden_path.empty()) {
      report::CompareResult cmp;
      const auto reference = runner::run_reference(c, c.dtype);
      judged.push_back(runner::verify_golden(c, golden_path, &cmp, &reference));
      std::cerr << report::render_text(cmp, "run", golden_path);
      if (judged.back().status == report::Status::Error) return skip(judged.back().message);
      judged.push_back(runner::verify_golden_memory(c, golden_path, reference));
    }
    std::vector<const report::CheckResult*> failed;
    for (auto& k : judged)
      if (k.status == report::Status::Fail) failed.push_back(&k);
    if (failed.empty()) {
      std::cerr << fmt::format("bisect: good ({} checks passed{})\n", judged.size(),
                               golden_path.empty() ? "" : ", golden.match and memory.activations included");
      return 0;
    }
    std::cerr << fmt::format("bisect: bad ({} of {} checks failed)\n", failed.size(), judged.size());
    for (size_t i = 0; i < std::min<size_t>(failed.size(), 5); ++i)
      std::cerr << fmt::format("  {} cp {}: {}\n", failed[i]->name, failed[i]->cp, failed[i]->message);
    return 1;
  } catch (const std::exception& e) {
    return skip(io::one_line(e));
  }
}

// The report files the launcher removed before the libraries loaded (older_reports.h): older reports as much as
// those still there.
std::vector<std::string>& withdrawn_by_launcher() {
  static std::vector<std::string> paths;
  return paths;
}

bool withdrawn_by_launcher(const std::string& path) {
  const auto& w = withdrawn_by_launcher();
  return !path.empty() && std::find(w.begin(), w.end(), path) != w.end();
}

// The reports of an older run at the outputs `asked` names are replaced by an error report saying `why`.
void withdraw_older_reports_at(const ReportOutputs& asked, const std::string& why) {
  const auto o = asked.resolved();
  // Only a file that is a report of ours is touched: the path may name anything (the usage error may be that it
  // names the case file).
  ReportOutputs older;
  if (is_our_json_report(o.report_path) || withdrawn_by_launcher(o.report_path)) older.report_path = o.report_path;
  if (is_our_junit_report(o.junit_path) || withdrawn_by_launcher(o.junit_path)) older.junit_path = o.junit_path;
  if (is_our_page(o.html_path)) remove_files({o.html_path});
  if (!older.report_path.empty() || !older.junit_path.empty()) write_error_report(older, "local", why);
}

}  // namespace

void take_withdrawn_reports_from_environment() {
  const char* listed = std::getenv(kWithdrawnReportsVar);
  if (!listed) return;
  std::string rest = listed;
  for (size_t end; !rest.empty(); rest.erase(0, end == std::string::npos ? rest.size() : end + 1)) {
    end = rest.find('\n');
    if (end != 0) withdrawn_by_launcher().push_back(rest.substr(0, end));
  }
  ::unsetenv(kWithdrawnReportsVar);  // (this process's alone: not its ranks', nor a bisected commit's)
}

void withdraw_older_reports(const std::vector<std::string>& args, const std::string& why) {
  // Every place an output flag names, a repeated flag's first value too (repeating one is itself the usage error).
  for (const auto& [flag, value] : output_flags_in(args)) {
    ReportOutputs asked;
    if (flag == "--report") asked.report_path = value;
    else if (flag == "--junit") asked.junit_path = value;
    else if (flag == "--html") asked.html_path = value;
    else asked.out_dir = value;
    withdraw_older_reports_at(asked, why);
  }
}

bool replace_stand_in(const std::string& why) {
  if (!stand_in().standing) return false;
  write_error_report(stand_in().outputs, stand_in().comm, why);
  return true;
}

std::string exception_text(const std::exception& e) {
  // A path the OS refused (a symlink loop, a permission) is the input's fault, named with its path.
  if (const auto* fs_error = dynamic_cast<const std::filesystem::filesystem_error*>(&e))
    return fmt::format("{}: {}", fs_error->path1().string(), fs_error->code().message());
  if (dynamic_cast<const io::InputError*>(&e)) return io::one_line(e);  // names its file, field and reason
  return "internal error: " + io::one_line(e);
}

// `git bisect run` aborts the whole bisection on an exit code above 127, which is what a crash of the commit's own
// code gives (139 for SIGSEGV). So the commit is judged in a child process: a crash (SIGSEGV, SIGABRT, SIGBUS,
// SIGFPE, SIGILL) is a bad commit (1); SIGKILL (an out-of-memory killer, a job's limit: not the code's own doing, as
// far as can be told) cannot be judged (125); any other signal (SIGTERM, SIGINT to the child alone) ends this process
// the same way, so that the bisection stops as it was asked to. The child dies with this process.
int bisect_verb(const std::string& case_path, const std::string& golden_path) {
  std::cout.flush();
  std::cerr.flush();
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return bisect_verb_judged(case_path, golden_path);  // no child to be had: judged here
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(125);
    const int code = bisect_verb_judged(case_path, golden_path);
    std::cout.flush();
    std::cerr.flush();
    ::_exit(code);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  const int sig = WTERMSIG(status);
  switch (sig) {
    case SIGSEGV:
    case SIGABRT:
    case SIGBUS:
    case SIGFPE:
    case SIGILL:
      std::cerr << fmt::format("bisect: bad (the run crashed: {})\n", ::strsignal(sig));
      return 1;
    case SIGKILL:
      std::cerr << "bisect: skip (the commit cannot be judged): the run was killed (SIGKILL: out of memory, or a limit)\n";
      return 125;
    default:
      std::cerr << fmt::format("bisect: stopped ({})\n", ::strsignal(sig));
      std::cerr.flush();
      ::signal(sig, SIG_DFL);
      ::raise(sig);
      return 128 + sig;
  }
}

int render_verb(const std::string& report_path, const std::string& html_path) {
  if (!std::filesystem::is_regular_file(report_path)) throw io::InputError(report_path, "", "no such report file");
  require_not_an_input(html_path, "-o", {report_path});
  return render_html(report_path, html_path) ? 0 : 2;
}

int list_verb(const std::vector<std::string>& paths) {
  for (auto& c : train::load_cases(paths.empty() ? std::vector<std::string>{"cases/default"} : paths))
    std::cout << fmt::format("{:<28} {:<10} {:<5} steps {} cp {} {}\n", c.id, c.model.name, train::to_string(c.dtype), c.steps,
                             fmt::join(c.cp_sizes, ","), c.requires_features.empty() ? "" : "requires " + c.requires_features.front());
  return 0;
}

}  // namespace cpharness::cli
