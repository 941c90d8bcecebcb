// The communication layer of the CP runtime: one Comm interface, three backends.
//
//   local  N ranks as threads of one process (LocalWorld / run_local); deterministic; unit tests and
//          single-device machines.
//   mpi    one process per rank under mpirun/srun (OpenMPI); nonblocking Isend/Irecv polled against a deadline.
//   nccl   one GPU per rank; NCCL unique id exchanged through c10d's TCPStore (comm_nccl.cpp).
//
// Every operation finishes within timeout() or throws CommError naming the operation and the peer rank; no
// operation hangs forever. Every operation is counted in stats() (calls, tensors and bytes sent per kind).
//
// Semantics shared by all backends:
//   * ring_exchange(send): sends `send` to (rank+1) % size, returns the same-shaped list received from
//     (rank-1+size) % size (K/V rotation, cp-reference §1.4).
//   * exchange(send, dst, recv, src): sends `send` to dst and fills `recv` (preallocated, shapes known) from src,
//     in one batch (the backward's dK/dV return to owners, cp-reference §1.6). dst == src == rank is a local copy.
//   * all_reduce(t): in-place sum; float32, float64, int64. local and mpi reduce in rank order on rank 0
//     ((t0 + t1) + t2 ...) and broadcast the result, so every rank and both backends give bit-identical results.
//   * broadcast(t, root), barrier().
// Byte accounting (CommStats::bytes_sent): the payload, not wire bytes, so it is backend independent:
//   ring/exchange: nbytes of the tensors sent; all_reduce: nbytes of the tensor on every rank;
//   broadcast: nbytes on the root, 0 elsewhere; barrier: 0.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace cpharness::cp {

// A communication failure: a timeout, a peer that failed, an MPI/NCCL error, a usage error (shape mismatch).
// rank(): the rank that raised it (-1 unknown); peer(): the rank it was waiting for or talking to (-1 none).
class CommError : public std::runtime_error {
 public:
  CommError(const std::string& message, std::string op = "", int rank = -1, int peer = -1);
  const std::string& op() const { return op_; }
  int rank() const { return rank_; }
  int peer() const { return peer_; }

 private:
  std::string op_;
  int rank_;
  int peer_;
};

enum class CommOp : int { RingExchange = 0, Exchange = 1, AllReduce = 2, Broadcast = 3, Barrier = 4 };
inline constexpr int kNumCommOps = 5;
const char* comm_op_name(CommOp op);

struct CommStats {
  std::array<int64_t, kNumCommOps> calls{};         // operations issued
  std::array<int64_t, kNumCommOps> tensors_sent{};  // tensors sent point-to-point (ring/exchange)
  std::array<int64_t, kNumCommOps> bytes_sent{};    // payload bytes, see the header comment

  int64_t ops(CommOp op) const { return calls[static_cast<int>(op)]; }
  int64_t tensors(CommOp op) const { return tensors_sent[static_cast<int>(op)]; }
  int64_t bytes(CommOp op) const { return bytes_sent[static_cast<int>(op)]; }
  int64_t total_ops() const;
  int64_t total_bytes() const;
  void reset() { *this = CommStats{}; }
  std::string to_string() const;  // "ring_exchange: 3 ops, 6 tensors, 96 B; ..."
};

enum class Backend { Local, Mpi, Nccl };
const char* backend_name(Backend b);
Backend parse_backend(const std::string& name);  // "local" | "mpi" | "nccl", else std::invalid_argument

inline constexpr std::chrono::milliseconds kDefaultCommTimeout{60000};

class Comm {
 public:
  virtual ~Comm() = default;
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Backend backend() const = 0;
  // Why this Comm may not be driven from a thread other than the one that made it (one thread at a time), or nullopt
  // when it may (the streaming ring runs its exchanges on a background thread). mpi: below MPI_THREAD_SERIALIZED.
  virtual std::optional<std::string> other_thread_problem() const { return std::nullopt; }

  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

  std::vector<at::Tensor> ring_exchange(const std::vector<at::Tensor>& send);
  void exchange(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src);
  std::vector<at::Tensor> exchange(const std::vector<at::Tensor>& send, int dst, int src);  // recv shaped like send
  void all_reduce(at::Tensor& t);  // sum, in place; t contiguous, float32/float64/int64
  void broadcast(at::Tensor& t, int root);
  void barrier();

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_.reset(); }

  // Ends the whole job now with `exit_code` (mpi: MPI_Abort, which makes mpirun kill every rank; nccl: aborts the
  // communicator, then exits). local: marks the world failed so the other threads stop; does not exit.
  virtual void terminate_job(int exit_code, const std::string& reason) = 0;

 protected:
  explicit Comm(std::chrono::milliseconds timeout) : timeout_(timeout) {}
  using Clock = std::chrono::steady_clock;

  // Sends `send` to dst and receives into `recv` from src (either side may be empty: dst/src = -1), completing
  // both before `deadline`. Tensors are contiguous and on the backend's device; recv shapes are the expected ones.
  virtual void sendrecv(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src,
                        CommOp op, Clock::time_point deadline) = 0;
  // Default collectives over sendrecv (rank-order reduction on rank 0); NCCL overrides them.
  virtual void do_all_reduce(at::Tensor& t, Clock::time_point deadline);
  virtual void do_broadcast(at::Tensor& t, int root, Clock::time_point deadline);
  virtual void do_barrier(Clock::time_point deadline);
  // Where the backend's buffers must live: nullopt = anywhere (local), the host (mpi), one CUDA device (nccl).
  // Tensors elsewhere are staged through copies there (mpi: CUDA tensors via the host; nccl: host tensors such as
  // the loss statistics and the gathered run records via the GPU).
  virtual std::optional<at::Device> transfer_device() const { return std::nullopt; }
  // sendrecv with that staging. Every point-to-point operation goes through here.
  void transfer(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src, CommOp op,
                Clock::time_point deadline);

  std::string where(CommOp op) const;  // "rank 2 (mpi) ring_exchange"

 private:
  void check_peer(int peer, CommOp op, const char* what) const;
  std::chrono::milliseconds timeout_;
  CommStats stats_;
};

// ---- local backend: ranks as threads of one process --------------------------------------------------------

// The shared in-memory mailbox of one group of `size` threads. Messages are FIFO per (src, dst) pair; a receive
// waits on a condition variable until its message arrives, the deadline passes, or the world is aborted (a rank
// failed), whichever is first.
class LocalWorld {
 public:
  explicit LocalWorld(int size);
  ~LocalWorld();
  int size() const;
  // The Comm of `rank` (owned by the world; one per rank; use it from one thread).
  Comm& comm(int rank, std::chrono::milliseconds timeout = kDefaultCommTimeout);
  // Marks the world failed: every pending and future operation of every rank throws CommError naming `rank`.
  void abort(int rank, const std::string& reason);
  bool aborted() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::unique_ptr<Comm>> comms_;
};

// Runs fn(comm) on n threads, one per rank, each with its own local Comm. If a rank throws, the world is aborted
// (ranks waiting in the Comm stop at once with CommError) and, after every thread has ended, run_local throws
// CommError "rank R failed: <what>" for the FIRST rank that failed (rank() = R; original op/peer kept). A rank
// still running `timeout` + 5 s after the last rank ended or failed is hung: the process ends
// (end_for_hung_local_rank, launcher.h), since a thread can be neither joined nor abandoned.
void run_local(int n, const std::function<void(Comm&)>& fn,
               std::chrono::milliseconds timeout = kDefaultCommTimeout);

// ---- process backends ---------------------------------------------------------------------------------------

bool mpi_compiled();   // the mpi backend was built (CPHARNESS_MPI)
bool nccl_compiled();  // the nccl backend was built (CPHARNESS_NCCL)

// The MPI_COMM_WORLD Comm of this process. Initializes MPI (MPI_THREAD_SERIALIZED) if needed and finalizes it at
// exit. Throws CommError if MPI was not compiled in.
std::unique_ptr<Comm> make_mpi_comm(std::chrono::milliseconds timeout = kDefaultCommTimeout);

struct LaunchEnv;  // launcher.h
// One GPU per rank (device = env.local_rank); rendezvous: rank 0 creates the NCCL unique id and publishes it in a
// c10d TCPStore at env.master_addr:env.master_port. Throws CommError (never crashes) when NCCL is not compiled in,
// no CUDA device is visible, the rendezvous times out, or NCCL init fails.
std::unique_ptr<Comm> make_nccl_comm(const LaunchEnv& env, std::chrono::milliseconds timeout = kDefaultCommTimeout);

}  // namespace cpharness::cp
