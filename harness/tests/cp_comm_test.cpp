// The local comm backend, run_local, the launcher's environment parsing and command line, and the nccl guard.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "harness/cp/comm.h"
#include "harness/cp/launcher.h"
#include "harness/tests/cp_comm_conformance.h"
#include "harness/tests/io_test_util.h"

namespace cpharness::cp {
namespace {

using Clock = std::chrono::steady_clock;
using testing::Failures;

std::string join(const Failures& f) {
  std::string s;
  for (const auto& x : f) s += x + "\n";
  return s;
}

// Runs `check` on every rank of a local world of n and expects no failures anywhere.
void expect_on_all_ranks(int n, Failures (*check)(Comm&)) {
  std::mutex mu;
  std::map<int, Failures> by_rank;
  run_local(n, [&](Comm& c) {
    auto f = check(c);
    std::lock_guard<std::mutex> lk(mu);
    by_rank[c.rank()] = f;
  });
  ASSERT_EQ(static_cast<int>(by_rank.size()), n);
  for (const auto& [r, f] : by_rank) EXPECT_TRUE(f.empty()) << "n=" << n << " rank " << r << ":\n" << join(f);
}

class CpLocalComm : public ::testing::TestWithParam<int> {};

TEST_P(CpLocalComm, RingExchange) { expect_on_all_ranks(GetParam(), &testing::check_ring); }
TEST_P(CpLocalComm, DirectExchangeToOwners) { expect_on_all_ranks(GetParam(), &testing::check_exchange); }
TEST_P(CpLocalComm, AllReduceRankOrderExact) { expect_on_all_ranks(GetParam(), &testing::check_all_reduce); }
TEST_P(CpLocalComm, BroadcastAndBarrier) { expect_on_all_ranks(GetParam(), &testing::check_broadcast_barrier); }
TEST_P(CpLocalComm, LargeMessage) { expect_on_all_ranks(GetParam(), &testing::check_large); }

TEST_P(CpLocalComm, FullRingVisitsEveryOwnerOnce) {
  const int n = GetParam();
  std::mutex mu;
  std::map<int, std::vector<int64_t>> owners;
  run_local(n, [&](Comm& c) {
    std::vector<int64_t> seen;
    auto chunk = at::full({2}, static_cast<int64_t>(c.rank()), at::kLong);
    seen.push_back(chunk[0].item<int64_t>());
    for (int s = 1; s < c.size(); ++s) {
      chunk = c.ring_exchange({chunk}).at(0);
      seen.push_back(chunk[0].item<int64_t>());
    }
    EXPECT_EQ(c.stats().ops(CommOp::RingExchange), c.size() - 1);
    EXPECT_EQ(c.stats().bytes(CommOp::RingExchange), 16 * (c.size() - 1));
    std::lock_guard<std::mutex> lk(mu);
    owners[c.rank()] = seen;
  });
  for (int r = 0; r < n; ++r)
    for (int s = 0; s < n; ++s) EXPECT_EQ(owners[r][static_cast<size_t>(s)], ((r - s) % n + n) % n) << r << "," << s;
}

INSTANTIATE_TEST_SUITE_P(Cp, CpLocalComm, ::testing::Values(1, 2, 3, 4));

TEST(CpLocalCommStats, ResetAndToString) {
  run_local(2, [](Comm& c) {
    c.ring_exchange({at::ones({4}, at::kFloat)});
    EXPECT_EQ(c.stats().total_ops(), 1);
    EXPECT_EQ(c.stats().total_bytes(), 16);
    EXPECT_NE(c.stats().to_string().find("ring_exchange: 1 ops, 1 tensors, 16 B"), std::string::npos);
    c.reset_stats();
    EXPECT_EQ(c.stats().total_ops(), 0);
    EXPECT_EQ(c.stats().total_bytes(), 0);
  });
}

// One rank never sends: every rank gets a CommError within the timeout; the rank waiting on it names it.
TEST(CpLocalCommTimeout, SilentRankMakesAllRanksFailNamingIt) {
  constexpr int n = 3, silent = 1;
  const auto timeout = std::chrono::milliseconds(200);
  std::mutex mu;
  std::map<int, std::string> errors;
  std::map<int, int> peers;
  std::map<int, double> elapsed_s;
  const auto t0 = Clock::now();
  try {
    run_local(
        n,
        [&](Comm& c) {
          try {
            // Only rank 2 runs with the short timeout, so it is the one that detects the silent rank; the others
            // wait with a long one and must be woken by the abort, not by their own timeout.
            if (c.rank() != 2) c.set_timeout(std::chrono::seconds(20));
            if (c.rank() == silent) {
              // Never takes part in the ring: waits for a message rank 2 never sends.
              std::vector<at::Tensor> r{at::empty({3}, at::kFloat)};
              c.exchange({at::ones({3}, at::kFloat)}, silent, r, 2);
            } else {
              c.ring_exchange({at::ones({3}, at::kFloat)});
              c.barrier();
            }
          } catch (const CommError& e) {
            std::lock_guard<std::mutex> lk(mu);
            errors[c.rank()] = e.what();
            peers[c.rank()] = e.peer();
            elapsed_s[c.rank()] = std::chrono::duration<double>(Clock::now() - t0).count();
            throw;
          }
        },
        timeout);
    FAIL() << "run_local did not throw";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("failed"), std::string::npos) << e.what();
  }
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(total, 3 * 0.2 + 1.0);  // generous for a loaded machine; no hang
  ASSERT_EQ(static_cast<int>(errors.size()), n) << "every rank must get a CommError";
  // Rank 2 receives from rank 1 in the ring: its error is the timeout naming rank 1.
  EXPECT_NE(errors[2].find("waiting to receive from rank 1"), std::string::npos) << errors[2];
  EXPECT_NE(errors[2].find("timed out after 200 ms"), std::string::npos) << errors[2];
  EXPECT_EQ(peers[2], silent);
  for (const auto& [r, s] : elapsed_s) EXPECT_LT(s, 1.5) << "rank " << r;
}

// A rank that runs out of memory is said to have, not to have failed in an exchange: the error names the rank and
// the cause, and carries no communication operation.
TEST(CpLocalCommTimeout, ARankOutOfMemoryIsSaidToBe) {
  try {
    run_local(2, [](Comm& c) {
      if (c.rank() == 1) throw std::bad_alloc();
      c.barrier();
    }, std::chrono::milliseconds(2000));
    FAIL() << "run_local did not throw";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1 failed: out of memory"), std::string::npos) << e.what();
    EXPECT_EQ(e.op(), "") << e.what();
  }
}

// The whole process stopped (SIGSTOP, Ctrl-Z, a paused container) for longer than the timeout stopped every rank
// alike: after SIGCONT no rank is blamed for the time nobody ran. Here the process stops itself for 3 s while rank
// 0 waits for rank 1 with a 1.5 s timeout; a child process sends SIGCONT.
TEST(CpLocalCommTimeout, TimeTheWholeProcessSpentStoppedBlamesNoRank) {
  const auto t0 = Clock::now();
  ASSERT_NO_THROW(run_local(
      2,
      [&](Comm& c) {
        if (c.rank() == 1) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
          const pid_t parent = ::getpid(), child = ::fork();
          ASSERT_GE(child, 0);
          if (child == 0) {
            ::sleep(3);
            ::kill(parent, SIGCONT);
            ::_exit(0);
          }
          ::raise(SIGSTOP);
          ::waitpid(child, nullptr, 0);
        }
        c.ring_exchange({at::ones({3}, at::kFloat)});
      },
      std::chrono::milliseconds(1500)));
  EXPECT_GE(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);  // it was stopped
}

TEST(CpLocalCommTimeout, ExceptionOnOneRankStopsTheOthersAtOnce) {
  const auto t0 = Clock::now();
  std::atomic<int> comm_errors{0};
  try {
    run_local(
        4,
        [&](Comm& c) {
          if (c.rank() == 2) throw std::runtime_error("boom on two");
          try {
            c.ring_exchange({at::ones({1}, at::kFloat)});
            c.barrier();
          } catch (const CommError& e) {
            EXPECT_NE(std::string(e.what()).find("rank 2 failed: boom on two"), std::string::npos) << e.what();
            EXPECT_EQ(e.peer(), 2);
            ++comm_errors;
            throw;
          }
        },
        std::chrono::seconds(30));
    FAIL() << "run_local did not throw";
  } catch (const CommError& e) {
    EXPECT_EQ(e.rank(), 2);
    EXPECT_EQ(std::string(e.what()), "rank 2 failed: boom on two");
  }
  EXPECT_GE(comm_errors.load(), 1);  // at least the ranks still waiting were woken
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);  // far below the 30 s timeout
}

TEST(CpLocalCommErrors, MismatchedShapesAndOpsAreCommErrors) {
  EXPECT_THROW(run_local(2,
                         [](Comm& c) {
                           auto t = at::ones({c.rank() + 1}, at::kFloat);  // ranks disagree on the shape
                           c.ring_exchange({t});
                         },
                         std::chrono::milliseconds(500)),
               CommError);
  try {
    run_local(2, [](Comm& c) { std::vector<at::Tensor> r{at::empty({1})}; c.exchange({at::ones({1})}, 5, r, 0); });
    FAIL();
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("destination rank 5 is outside [0, 2)"), std::string::npos) << e.what();
  }
}

TEST(CpLocalCommDeterminism, AllReduceBitIdenticalAcrossRanksAndRuns) {
  std::vector<at::Tensor> results(8);
  for (int run = 0; run < 2; ++run)
    run_local(4, [&](Comm& c) {
      auto x = testing::reduce_input(c.rank(), at::kFloat) * 1e3;
      c.all_reduce(x);
      results[static_cast<size_t>(run * 4 + c.rank())] = x;
    });
  for (size_t i = 1; i < results.size(); ++i) EXPECT_TRUE(at::equal(results[0], results[i])) << i;
}

// ---- launcher -----------------------------------------------------------------------------------------------

LaunchEnv env_of(std::map<std::string, std::string> vars) {
  return detect_launch_env([vars](const char* k) -> const char* {
    auto it = vars.find(k);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

TEST(CpLauncher, DetectsMpirunTorchrunSlurm) {
  auto none = env_of({});
  EXPECT_FALSE(none.launched());
  EXPECT_EQ(none.world_size, 1);
  EXPECT_EQ(none.master_addr, "127.0.0.1");
  EXPECT_EQ(none.master_port, 29500);

  auto m = env_of({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                   {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}});
  EXPECT_EQ(m.source, LaunchEnv::Source::Mpirun);
  EXPECT_EQ(m.rank, 3);
  EXPECT_EQ(m.world_size, 4);
  EXPECT_EQ(m.local_rank, 1);

  auto t = env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.5"},
                   {"MASTER_PORT", "29600"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  EXPECT_EQ(t.source, LaunchEnv::Source::Torchrun);
  EXPECT_EQ(t.rank, 1);
  EXPECT_EQ(t.world_size, 2);
  EXPECT_EQ(t.master_addr, "10.0.0.5");
  EXPECT_EQ(t.master_port, 29600);
  EXPECT_TRUE(t.agent_store);

  auto s = env_of({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}});
  EXPECT_EQ(s.source, LaunchEnv::Source::Slurm);
  EXPECT_EQ(s.rank, 5);
  EXPECT_EQ(s.world_size, 8);
  EXPECT_EQ(s.local_rank, 1);

  EXPECT_THROW(env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}}), std::runtime_error);
  EXPECT_THROW(env_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}), std::runtime_error);
  EXPECT_THROW(env_of({{"MASTER_PORT", "70000"}}), std::runtime_error);
}

TEST(CpLauncher, RelaunchDecisionAndCommand) {
  const auto none = env_of({});
  const auto under = env_of({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}});
  EXPECT_TRUE(needs_relaunch(Backend::Mpi, 2, none));
  EXPECT_TRUE(needs_relaunch(Backend::Nccl, 4, none));
  EXPECT_FALSE(needs_relaunch(Backend::Mpi, 2, under));  // the children do not relaunch again
  EXPECT_FALSE(needs_relaunch(Backend::Local, 4, none));  // threads: nothing to launch
  EXPECT_FALSE(needs_relaunch(Backend::Mpi, 1, none));

  MpirunOptions o;
  o.mpirun = "mpirun";
  o.extra_args = {"-x", "OMP_NUM_THREADS=1"};
  const auto cmd = mpirun_command(3, "/bin/cpharness", {"run", "a.json", "--comm", "mpi"}, o);
  const std::vector<std::string> want{"mpirun", "-np", "3", "--allow-run-as-root", "--oversubscribe", "--bind-to",
                                      "none", "-x", "OMP_NUM_THREADS=1", "/bin/cpharness", "run", "a.json", "--comm",
                                      "mpi"};
  EXPECT_EQ(cmd, want);
  EXPECT_EQ(parse_backend("mpi"), Backend::Mpi);
  EXPECT_STREQ(backend_name(parse_backend("nccl")), "nccl");
  EXPECT_THROW(parse_backend("gloo"), std::invalid_argument);
  const int port = free_loopback_port();
  EXPECT_GT(port, 0);
  EXPECT_LT(port, 65536);
}

// The NCCL id rendezvous through c10d's TCPStore works from the CPU-only link (libtorch_cpu).
TEST(CpLauncher, TcpStoreRendezvousDeliversRankZerosValue) {
  const int port = free_loopback_port();
  const std::vector<uint8_t> secret{1, 2, 3, 250, 0, 7};
  std::vector<std::vector<uint8_t>> got(3);
  std::vector<std::string> errors(3);
  std::vector<std::thread> ts;
  for (int r = 0; r < 3; ++r)
    ts.emplace_back([&, r] {
      LaunchEnv e;
      e.source = LaunchEnv::Source::Torchrun;
      e.rank = r;
      e.world_size = 3;
      e.master_port = port;
      try {
        got[static_cast<size_t>(r)] =
            store_rendezvous(e, "test/id", r == 0 ? secret : std::vector<uint8_t>{}, std::chrono::seconds(20));
      } catch (const std::exception& ex) {
        errors[static_cast<size_t>(r)] = ex.what();
      }
    });
  for (auto& t : ts) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
    EXPECT_EQ(got[static_cast<size_t>(r)], secret) << "rank " << r;
  }
}

TEST(CpLauncher, TcpStoreRendezvousTimesOutWithCommError) {
  LaunchEnv e;
  e.world_size = 2;  // rank 1 never comes
  e.master_port = free_loopback_port();
  const auto t0 = Clock::now();
  try {
    store_rendezvous(e, "test/id", {9}, std::chrono::milliseconds(300));
    FAIL() << "no CommError";
  } catch (const CommError& err) {
    EXPECT_EQ(err.op(), "rendezvous");
    EXPECT_NE(std::string(err.what()).find("0 of 1 ranks"), std::string::npos) << err.what();
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);
}

// The launcher's watch on a job before any verdict: a stand-in mpirun that starts nothing and stays (stopped or
// wedged before the ranks run) is killed once silent for silence_limit, exit 2 naming why, instead of being held
// until job_timeout; one whose rank 0 beats (here the stand-in touches the verdict file as start_job_heartbeat
// does) runs past that limit to its verdict.
TEST(CpLauncher, AJobSilentBeforeAnyVerdictIsKilledAndABeatingOneIsNot) {
  io::testing::TempDir dir;
  auto script = [&](const std::string& name, const std::string& body) {
    const auto path = (dir.path() / name).string();
    std::ofstream(path) << "#!/bin/sh\n" << body;
    std::filesystem::permissions(path, std::filesystem::perms::owner_all);
    return path;
  };
  MpirunOptions o;
  o.require_verdict = true;
  o.silence_limit = std::chrono::milliseconds(1500);
  o.job_timeout = std::chrono::seconds(60);

  o.mpirun = script("silent-mpirun.sh", "sleep 60\n");
  const auto silent = relaunch_under_mpirun(2, "/bin/true", {}, o);
  EXPECT_EQ(silent.exit_code, 2) << silent.message;
  EXPECT_NE(silent.message.find("no sign of life from rank 0 for 1500 ms"), std::string::npos) << silent.message;
  EXPECT_EQ(silent.failed_rank, -1);
  EXPECT_LT(silent.seconds, 10.0);

  o.mpirun = script("beating-mpirun.sh",
                    "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do touch \"$CPHARNESS_VERDICT_FILE\"; sleep 0.3; done\n"
                    "printf '0\\n' > \"$CPHARNESS_VERDICT_FILE\"\n");
  const auto beating = relaunch_under_mpirun(2, "/bin/true", {}, o);
  EXPECT_EQ(beating.exit_code, 0) << beating.message;
  EXPECT_GT(beating.seconds, 3.0);  // well past the silence limit
}

// ---- nccl ---------------------------------------------------------------------------------------------------

// Creating an nccl Comm where there is no GPU (CI) fails with a clear CommError, not a crash or a hang.
TEST(CpNccl, NoGpuGivesCommError) {
  LaunchEnv env;
  env.master_port = free_loopback_port();
  try {
    auto c = make_nccl_comm(env, std::chrono::seconds(5));
    // A GPU is present: the 1-rank communicator must work end to end on CPU-side checks only.
    EXPECT_EQ(c->size(), 1);
    EXPECT_EQ(c->backend(), Backend::Nccl);
    // CPU tensors are refused with a CommError naming the device.
    EXPECT_THROW(c->ring_exchange({at::ones({2})}), CommError);
  } catch (const CommError& e) {
    const std::string w = e.what();
    EXPECT_EQ(e.op(), "init");
    if (nccl_compiled())
      EXPECT_NE(w.find("no CUDA device is visible"), std::string::npos) << w;
    else
      EXPECT_NE(w.find("not compiled in"), std::string::npos) << w;
  }
}

}  // namespace
}  // namespace cpharness::cp
