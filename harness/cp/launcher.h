// Where this process sits in a multi-rank job, and how `--nproc N` starts one.
//
// Rank/world detection: launch_env.h.
//
// --nproc N (relaunch_under_mpirun): the current binary is re-executed as
//   mpirun -np N --allow-run-as-root --oversubscribe --bind-to none <exe> <args...>
// with OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 and
// OMPI_MCA_btl_vader_single_copy_mechanism=none (containers forbid the cross-memory-attach copy) set, and
// MASTER_ADDR/MASTER_PORT (a free loopback port) exported for the nccl backend. The children see
// OMPI_COMM_WORLD_* and do not relaunch. The local backend needs no launch (ranks are threads).
//
// Failure contract: a rank that fails prints "cpharness: rank R: <what>" (fail_rank) and ends the whole job
// with exit 2 (MPI_Abort: mpirun kills every other rank at once). A rank that crashes or exits non-zero makes
// mpirun kill the others (OpenMPI's default). A rank that hangs makes its peers time out (CommError naming it),
// and they end the job. The parent maps every failure to exit 2 and prints one line naming the rank.
// Ranks must agree on a non-zero "check failed" exit (all_reduce it) before exiting, since one rank exiting
// non-zero ends the job.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "harness/cp/comm.h"
#include "harness/cp/launch_env.h"

namespace cpharness::cp {

// Does `--nproc nproc` with this backend need a relaunch from this process? (mpi/nccl, nproc > 1, and not
// already under a launcher.)
bool needs_relaunch(Backend backend, int nproc, const LaunchEnv& env);

struct MpirunOptions {
  std::string mpirun;                    // empty: $CPHARNESS_MPIRUN, else the mpiexec CMake found, else "mpirun"
  std::chrono::milliseconds job_timeout{0};  // > 0: kill the job (exit 2) if it runs longer
  std::vector<std::string> extra_args;   // put before the executable (e.g. {"-x", "OMP_NUM_THREADS=1"})
  // The ranks' exit 0, 1 or 3 is a verdict only when rank 0 recorded it (record_job_verdict): an mpirun that ran
  // nothing, failed to launch or was stopped alone is exit 2, whatever its own status.
  bool require_verdict = false;
  // > 0 (with require_verdict): once rank 0 has recorded its verdict, the job must end within this (what is left is
  // the final agreement and MPI's shutdown, each bounded by --timeout in the ranks); a job still there after it (an
  // mpirun stopped or wedged) is killed, exit 2, rather than held until job_timeout.
  std::chrono::milliseconds after_verdict{0};
  // > 0 (with require_verdict): rank 0 beats from the moment its world is up (start_job_heartbeat); the job must
  // give its first beat within this of its start and never go this long without one before the verdict (time this
  // launcher itself was stopped not counted). A job silent that long (mpirun stopped or wedged before any rank ran,
  // the whole job frozen) is killed, exit 2, rather than held until job_timeout.
  std::chrono::milliseconds silence_limit{0};
};

// The full argv of the relaunch: mpirun ... exe args...
std::vector<std::string> mpirun_command(int nproc, const std::string& exe, const std::vector<std::string>& args,
                                        const MpirunOptions& opt = {});

struct LaunchResult {
  int exit_code = 0;      // 0, 1 or 3 passed through from the ranks; every other outcome is 2
  int mpirun_status = 0;  // mpirun's own exit status (128+signal if it was killed)
  int failed_rank = -1;   // the rank the failure was pinned on (-1 none/unknown)
  double seconds = 0;
  std::string message;    // one line; names the rank on failure
  std::string stderr_tail;  // the last 64 KiB of the job's stderr (also forwarded live)
  int stop_signal = 0;      // SIGTERM/SIGINT/SIGHUP the launching process received (passed on to the job), or 0
};

// Runs `exe args...` under mpirun with N ranks, forwarding its stdout/stderr, and waits for it. Stderr is scanned
// for the failing rank ("cpharness: rank R", mpirun's "process rank R" and "Process name: [[job,R]]").
// On failure, prints result.message to stderr. SIGTERM, SIGINT or SIGHUP to this process while the job runs is
// passed on to mpirun and every rank (SIGKILL 3 s later), the job is reaped, and the result names the signal.
LaunchResult relaunch_under_mpirun(int nproc, const std::string& exe, const std::vector<std::string>& args,
                                   const MpirunOptions& opt = {});

// Rank 0 of a job started by relaunch_under_mpirun with require_verdict: records the verdict it reached (after its
// reports were written) for the launching process. Does nothing outside such a job; false when it could not.
bool record_job_verdict(int exit_code);

// Rank 0 of such a job, once its world is up: a thread touches the verdict file every 250 ms for the rest of the
// process (its mtime is the job's heartbeat, MpirunOptions::silence_limit). Does nothing outside such a job.
void start_job_heartbeat();

// This executable (/proc/self/exe).
std::string self_exe();

// Prints "cpharness: rank R: <what>" to stderr and ends the job with exit 2: through comm->terminate_job when a
// process backend is given (MPI_Abort makes mpirun stop every rank), else std::_Exit(2).
// A rank started by mpirun ends itself (exit 2, one line) within a second of mpirun dying, so that a launcher or
// mpirun killed outright leaves no rank training on unowned (a thread that watches the parent process).
void end_with_parent(int rank);

[[noreturn]] void fail_rank(Comm* comm, int rank, const std::string& what);

// Runs body() and returns its exit code; any exception -> fail_rank(comm, rank, what) (exit 2 for the whole job).
int guarded_rank_main(Comm* comm, int rank, const std::function<int()>& body);

// A rank thread of run_local (ranks as threads) still running --timeout and a grace after a peer failed or ended
// is given up: it can be neither joined nor abandoned (it may touch what the run frees), so the process ends.
// `handler` (the CLI's: it writes the error report) gets the rank and a one-line message naming it; then, or
// without a handler after the message on stderr, exit 2.
void on_hung_local_rank(std::function<void(int rank, const std::string& message)> handler);
[[noreturn]] void end_for_hung_local_rank(int rank, const std::string& message);

// Rendezvous through c10d's TCPStore (libtorch_cpu): rank 0 publishes `value` under `key` at
// env.master_addr:env.master_port (serving the store itself unless env.agent_store); every other rank waits for it,
// reads it and acknowledges; rank 0 returns once all world_size - 1 acknowledgements arrived. Returns the value on
// every rank. Throws CommError (op "rendezvous", naming the rank) on timeout or store errors. Used for the NCCL id.
std::vector<uint8_t> store_rendezvous(const LaunchEnv& env, const std::string& key, const std::vector<uint8_t>& value,
                                      std::chrono::milliseconds timeout);

// A free TCP port on 127.0.0.1 (for MASTER_PORT).
int free_loopback_port();

}  // namespace cpharness::cp
