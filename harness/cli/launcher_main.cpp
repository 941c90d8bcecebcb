// `cpharness`: withdraws an older run's reports, then becomes cpharness-core (the CLI itself) by exec.
//
// Loading libtorch takes half a second and more before main runs; the verbs' first act, the "did not finish"
// stand-in in place of the reports, comes after it. A command killed in that time (a CI job's time limit, a user's
// ^C at start, an out-of-memory killer) left an older run's pass where its own report belongs, to be read as its
// own. This program links no libtorch: it removes those reports within milliseconds and execs the core in the same
// process (same pid, same arguments, so signals, process groups and a parent's wait are unchanged). A command
// killed before the core's stand-in then leaves no report at all, never another run's.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "harness/cli/older_reports.h"
#include "harness/cp/launch_env.h"
#include "harness/io/directory_lock.h"

namespace {

namespace cli = cpharness::cli;

// Whether this process writes the reports the arguments name, as the core decides it (run_verb): under --comm mpi
// or nccl a rank other than 0 of a launched job (mpirun, torchrun, srun) does not; help writes nothing.
bool writes_reports(const std::vector<std::string>& args) {
  if (!cli::verb_writes_reports(args)) return false;
  for (const auto& a : args)
    if (a == "-h" || a == "--help" || a == "--help-all") return false;
  std::string comm = "local";
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--comm" && i + 1 < args.size()) comm = args[i + 1];
    else if (args[i].rfind("--comm=", 0) == 0) comm = args[i].substr(7);
  }
  if (args[0] != "run" || comm == "local") return true;
  try {
    const auto env = cpharness::cp::detect_launch_env();
    return !env.launched() || env.rank == 0;
  } catch (const std::runtime_error&) {
    return true;  // a malformed launcher variable is the core's usage error, which withdraws them too
  }
}

// Removes each report of ours among `paths` (under its directory's lock, as writers take it), returning those removed.
std::vector<std::string> remove_older_reports(const std::vector<std::string>& json, const std::vector<std::string>& junit,
                                              const std::vector<std::string>& pages) {
  std::vector<std::string> all(json);
  all.insert(all.end(), junit.begin(), junit.end());
  all.insert(all.end(), pages.begin(), pages.end());
  const cpharness::io::DirectoryLocks taking_turns(all, std::chrono::seconds(2));
  std::vector<std::string> removed;
  auto remove_if = [&](const std::string& path, bool ours, bool named) {
    if (!ours || ::unlink(path.c_str()) != 0) return;
    if (named) removed.push_back(path);
  };
  for (const auto& p : json) remove_if(p, cli::is_our_json_report(p), true);
  for (const auto& p : junit) remove_if(p, cli::is_our_junit_report(p), true);
  for (const auto& p : pages) remove_if(p, cli::is_our_page(p), false);
  return removed;
}

// cpharness-core beside this program: found through /proc/self/exe (a symlink to cpharness resolves to the build's),
// else through argv[0] where /proc is not mounted.
std::string core_path(const char* argv0) {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  const std::filesystem::path self = n > 0 ? std::filesystem::path(std::string(buf, size_t(n))) : std::filesystem::path(argv0);
  return (self.parent_path() / "cpharness-core").string();
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (writes_reports(args)) {
    std::vector<std::string> json, junit, pages;
    for (const auto& [flag, value] : cli::output_flags_in(args)) {
      if (flag == "--report") json.push_back(value);
      if (flag == "--junit") junit.push_back(value);
      if (flag == "--html") pages.push_back(value);
      if (flag == "--out" && !value.empty()) {
        json.push_back(value + "/report.json");
        junit.push_back(value + "/report.xml");
        pages.push_back(value + "/report.html");
      }
    }
    std::string listed;
    for (const auto& p : remove_older_reports(json, junit, pages)) listed += p + "\n";
    if (!listed.empty()) ::setenv(cli::kWithdrawnReportsVar, listed.c_str(), 1);
  }
  const std::string core = core_path(argv[0]);
  ::execv(core.c_str(), argv);
  std::cerr << "cpharness: cannot start " << core << ": " << std::strerror(errno)
            << " (cpharness-core is built beside cpharness; copy both)\n";
  return 2;
}
