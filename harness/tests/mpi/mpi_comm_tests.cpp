// The MPI driver of the CP comm tests (CTest runs it; see harness/CMakeLists.txt).
//
//   mpi_comm_tests [--nproc N] basic
//       every rank runs the shared conformance checks (ring, direct exchange, all_reduce, broadcast, barrier, op
//       and byte counts, an 8 MiB message) over the mpi backend; exit 0 when all pass on every rank.
//   mpi_comm_tests [--nproc N] fail SCENARIO BAD_RANK TIMEOUT_MS
//       ranks ring-exchange in a loop; at step 3 BAD_RANK crashes (abort), exits 3, hangs, or throws.
//   mpi_comm_tests expect-failure SCENARIO...
//       for each scenario, runs `fail SCENARIO 1 1000` with --nproc 3 and asserts: exit 2, the failing rank is
//       named (1), and the job ends within the timeout (+ teardown slack) after the fault. Exit 0 when all hold.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "harness/cp/comm.h"
#include "harness/cp/launcher.h"
#include "harness/tests/cp_comm_conformance.h"

using namespace cpharness::cp;

namespace {

int run_basic() {
  auto comm = make_mpi_comm(std::chrono::seconds(60));
  Comm* c = comm.get();
  return guarded_rank_main(c, c->rank(), [&] {
    auto failures = testing::check_all(*c);
    // Every rank learns how many failed, so they exit together (one non-zero exit would make mpirun kill the rest).
    auto bad = at::full({1}, static_cast<int64_t>(failures.empty() ? 0 : 1), at::kLong);
    c->all_reduce(bad);
    for (const auto& f : failures) std::cerr << "rank " << c->rank() << ": FAIL " << f << "\n";
    if (c->rank() == 0 && bad.item<int64_t>() == 0)
      std::cout << "mpi basic: all checks passed on " << c->size() << " ranks\n";
    c->barrier();
    return bad.item<int64_t>() == 0 ? 0 : 1;
  });
}

int run_fail(const std::string& scenario, int bad_rank, int timeout_ms) {
  auto comm = make_mpi_comm(std::chrono::milliseconds(timeout_ms));
  Comm* c = comm.get();
  return guarded_rank_main(c, c->rank(), [&] {
    auto x = at::full({16}, static_cast<float>(c->rank()), at::kFloat);
    for (int step = 0; step < 10; ++step) {
      if (step == 3 && c->rank() == bad_rank) {
        const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
        std::cerr << "mpi_comm_tests: injecting " << scenario << " on rank " << bad_rank << " at ms " << now_ms
                  << std::endl;
        if (scenario == "crash") std::abort();
        if (scenario == "exit") std::_Exit(3);
        if (scenario == "hang") std::this_thread::sleep_for(std::chrono::hours(1));
        if (scenario == "throw") throw std::runtime_error("injected failure at step 3");
      }
      x = c->ring_exchange({x}).at(0);
    }
    c->barrier();
    return 0;
  });
}

// Each scenario: exit 2, the failing rank named, and the job over within the timeout (plus teardown slack)
// counted from the moment the fault is injected; start-up time is not counted.
int run_expect_failure(const std::vector<std::string>& scenarios) {
  const int timeout_ms = 1000;
  const double teardown_slack_s = 4.0;  // mpirun noticing, MPI_Abort, killing the ranks, on a loaded 2-core box
  int failures = 0;
  for (const auto& sc : scenarios) {
    const auto res = relaunch_under_mpirun(3, self_exe(), {"fail", sc, "1", std::to_string(timeout_ms)});
    const auto end_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    double after_fault_s = -1;
    const auto at = res.stderr_tail.find("injecting " + sc + " on rank 1 at ms ");
    if (at != std::string::npos) {
      const auto num = at + std::string("injecting " + sc + " on rank 1 at ms ").size();
      after_fault_s = static_cast<double>(end_ms - std::stoll(res.stderr_tail.substr(num, 20))) / 1000.0;
    }
    const bool ok = res.exit_code == 2 && res.failed_rank == 1 && after_fault_s >= 0 &&
                    after_fault_s < timeout_ms / 1000.0 + teardown_slack_s &&
                    res.message.find("rank 1") != std::string::npos;
    std::cout << (ok ? "PASS " : "FAIL ") << sc << ": exit " << res.exit_code << " (mpirun " << res.mpirun_status
              << "), failed rank " << res.failed_rank << ", ended " << after_fault_s << " s after the fault ("
              << res.seconds << " s in all); message: " << res.message << std::endl;
    if (!ok) ++failures;
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int nproc = 0;
  if (args.size() >= 2 && args[0] == "--nproc") {
    nproc = std::stoi(args[1]);
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.empty()) {
    std::cerr << "usage: mpi_comm_tests [--nproc N] basic | fail SCENARIO BAD_RANK TIMEOUT_MS | expect-failure SCENARIO...\n";
    return 2;
  }
  if (needs_relaunch(Backend::Mpi, nproc, detect_launch_env()))
    return relaunch_under_mpirun(nproc, self_exe(), args).exit_code;
  if (args[0] == "basic") return run_basic();
  if (args[0] == "fail" && args.size() == 4) return run_fail(args[1], std::stoi(args[2]), std::stoi(args[3]));
  if (args[0] == "expect-failure" && args.size() > 1)
    return run_expect_failure(std::vector<std::string>(args.begin() + 1, args.end()));
  std::cerr << "mpi_comm_tests: unknown mode " << args[0] << "\n";
  return 2;
}
