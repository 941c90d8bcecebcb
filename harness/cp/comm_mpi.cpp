// The mpi backend: one process per rank (OpenMPI), CPU tensors. Every transfer is a nonblocking Isend/Irecv
// polled with MPI_Testall against the operation's deadline; errors come back as return codes
// (MPI_ERRORS_RETURN on a private duplicate of MPI_COMM_WORLD) and become CommError.
//
// Running as root / in containers: mpirun needs --allow-run-as-root (or OMPI_ALLOW_RUN_AS_ROOT=1 and
// OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1) and, with more ranks than cores, --oversubscribe. See launcher.h.
#include "harness/cp/comm.h"

#if CPHARNESS_HAVE_MPI
#include <mpi.h>

#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#endif

namespace cpharness::cp {

#if CPHARNESS_HAVE_MPI

bool mpi_compiled() { return true; }

namespace {

std::atomic<bool> g_mpi_failed{false};  // a CommError was raised: at exit, abort instead of a collective finalize
bool g_we_initialized = false;
std::chrono::milliseconds g_step_limit{120000};  // --timeout: MPI's startup and shutdown get as long as any wait

// Runs `step`, an MPI call that waits for the other ranks and has no timeout of its own (MPI_Init_thread,
// MPI_Finalize), under a watchdog: past `limit` the process ends with exit 2 and a line saying which step hung,
// so a stopped peer or mpirun cannot hang this rank (and the job) for good.
void bounded(const char* step, std::chrono::milliseconds limit, const std::function<void()>& fn) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(m);
    if (cv.wait_for(lock, limit, [&] { return done; })) return;
    const char* r = std::getenv("OMPI_COMM_WORLD_RANK");
    std::fprintf(stderr,
                 "cpharness: rank %s: %s did not complete within %.0f s: another rank or mpirun is stopped or "
                 "unresponsive (exit 2)\n",
                 r ? r : "?", step, limit.count() / 1000.0);
    std::fflush(stderr);
    std::_Exit(2);
  });
  auto finish = [&] {
    {
      std::lock_guard<std::mutex> lock(m);
      done = true;
    }
    cv.notify_one();
    watchdog.join();
  };
  try {
    fn();
  } catch (...) {
    finish();
    throw;
  }
  finish();
}

void finalize_at_exit() {
  int fin = 0;
  MPI_Finalized(&fin);
  if (fin || !g_we_initialized) return;
  // MPI_Finalize synchronizes with the other ranks; after a comm failure they may be gone or stuck, so end the
  // job instead (mpirun then stops every rank, exit 2).
  if (g_mpi_failed.load()) MPI_Abort(MPI_COMM_WORLD, 2);
  bounded("MPI shutdown (MPI_Finalize)", g_step_limit, [] { MPI_Finalize(); });
}

void ensure_mpi_initialized(std::chrono::milliseconds limit) {
  static std::once_flag once;
  std::call_once(once, [limit] {
    g_step_limit = limit;
    int init = 0;
    MPI_Initialized(&init);
    if (init) return;
    int provided = 0, rc = MPI_SUCCESS;
    bounded("MPI startup (MPI_Init_thread)", limit,
            [&] { rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided); });
    if (rc != MPI_SUCCESS) throw CommError("mpi: MPI_Init_thread failed", "init");
    g_we_initialized = true;
    std::atexit(finalize_at_exit);
  });
}

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(buf, static_cast<size_t>(len));
}

constexpr int64_t kMaxMessageBytes = INT_MAX / 2;  // larger tensors travel as several messages

class MpiComm final : public Comm {
 public:
  explicit MpiComm(std::chrono::milliseconds timeout) : Comm(timeout) {
    ensure_mpi_initialized(timeout);
    check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), CommOp::Barrier, -1, "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiComm() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin && comm_ != MPI_COMM_NULL && !g_mpi_failed.load()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  std::optional<std::string> other_thread_problem() const override {
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    if (level >= MPI_THREAD_SERIALIZED) return std::nullopt;
    return "this MPI provides thread level " + std::to_string(level) + ", below MPI_THREAD_SERIALIZED (" +
           std::to_string(MPI_THREAD_SERIALIZED) + ")";
  }
  int size() const override { return size_; }
  Backend backend() const override { return Backend::Mpi; }
  std::optional<at::Device> transfer_device() const override { return at::Device(at::kCPU); }

  void terminate_job(int exit_code, const std::string& reason) override {
    g_mpi_failed = true;
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::_Exit(exit_code);
  }

 protected:
  void sendrecv(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src, CommOp op,
                Clock::time_point deadline) override {
    const int tag = static_cast<int>(op);
    std::vector<MPI_Request> reqs;
    std::vector<int> peer;       // per request: the peer rank
    std::vector<bool> is_recv;   // per request
    std::vector<int64_t> bytes;  // per request: expected bytes
    auto post = [&](const at::Tensor& t, bool rcv, int p) {
      if (!t.device().is_cpu())
        fail(op, p, std::string("tensor on ") + t.device().str() + "; the mpi backend moves CPU tensors only");
      auto* base = static_cast<char*>(t.data_ptr());
      const int64_t total = static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
      int64_t off = 0;
      do {  // zero-byte tensors still send one (empty) message so both sides agree on the count
        const int64_t n = std::min(kMaxMessageBytes, total - off);
        MPI_Request rq;
        const int rc = rcv ? MPI_Irecv(base + off, static_cast<int>(n), MPI_BYTE, p, tag, comm_, &rq)
                           : MPI_Isend(base + off, static_cast<int>(n), MPI_BYTE, p, tag, comm_, &rq);
        check(rc, op, p, rcv ? "MPI_Irecv" : "MPI_Isend");
        reqs.push_back(rq);
        peer.push_back(p);
        is_recv.push_back(rcv);
        bytes.push_back(n);
        off += n;
      } while (off < total);
    };
    // Receives first, so a self-exchange or an eager peer always finds a posted buffer.
    if (src >= 0)
      for (auto& t : recv) post(t, true, src);
    if (dst >= 0)
      for (const auto& t : send) post(t, false, dst);
    if (reqs.empty()) return;

    std::vector<MPI_Status> sts(reqs.size());
    int spins = 0;
    auto sleep_us = std::chrono::microseconds(10);
    for (;;) {
      int done = 0;
      const int rc = MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, sts.data());
      if (rc != MPI_SUCCESS) {
        for (size_t i = 0; i < reqs.size(); ++i)
          if (rc == MPI_ERR_IN_STATUS && sts[i].MPI_ERROR != MPI_SUCCESS && sts[i].MPI_ERROR != MPI_ERR_PENDING)
            fail(op, peer[i], std::string(is_recv[i] ? "receive from" : "send to") + " rank " +
                                  std::to_string(peer[i]) + " failed: " + mpi_error_string(sts[i].MPI_ERROR));
        fail(op, src >= 0 ? src : dst, "MPI_Testall failed: " + mpi_error_string(rc));
      }
      if (done) break;
      if (Clock::now() >= deadline) timed_out(op, reqs, peer, is_recv, send, recv);
      if (++spins > 64) {  // back off: ranks share few cores
        std::this_thread::sleep_for(sleep_us);
        sleep_us = std::min(sleep_us * 2, std::chrono::microseconds(1000));
      }
    }
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (!is_recv[i]) continue;
      int count = 0;
      MPI_Get_count(&sts[i], MPI_BYTE, &count);
      if (count != bytes[i])
        fail(op, peer[i], "received " + std::to_string(count) + " bytes from rank " + std::to_string(peer[i]) +
                              ", expected " + std::to_string(bytes[i]) + " (shape mismatch between ranks)");
    }
  }

 private:
  [[noreturn]] void fail(CommOp op, int peer, const std::string& what) {
    g_mpi_failed = true;
    throw CommError(where(op) + ": " + what, comm_op_name(op), rank_, peer);
  }
  void check(int rc, CommOp op, int peer, const char* call) {
    if (rc != MPI_SUCCESS) fail(op, peer, std::string(call) + " failed: " + mpi_error_string(rc));
  }

  [[noreturn]] void timed_out(CommOp op, std::vector<MPI_Request>& reqs, const std::vector<int>& peer,
                              const std::vector<bool>& is_recv, const std::vector<at::Tensor>& send,
                              const std::vector<at::Tensor>& recv) {
    int culprit = -1;
    bool culprit_recv = false;
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (reqs[i] == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Request_get_status(reqs[i], &flag, MPI_STATUS_IGNORE);
      if (flag) continue;
      if (culprit < 0 || (is_recv[i] && !culprit_recv)) {
        culprit = peer[i];
        culprit_recv = is_recv[i];
      }
    }
    // Pending requests still reference the buffers: cancel the receives, and keep every buffer alive for the rest
    // of the process (the job is going down).
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (reqs[i] == MPI_REQUEST_NULL) continue;
      if (is_recv[i]) MPI_Cancel(&reqs[i]);
      MPI_Request_free(&reqs[i]);
    }
    for (const auto& t : send) leaked_.push_back(t);
    for (const auto& t : recv) leaked_.push_back(t);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout()).count();
    fail(op, culprit,
         "timed out after " + std::to_string(ms) + " ms " +
             (culprit_recv ? "waiting to receive from rank " : "waiting for rank ") + std::to_string(culprit) +
             (culprit_recv ? "" : " to take our send"));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::vector<at::Tensor> leaked_;
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(std::chrono::milliseconds timeout) { return std::make_unique<MpiComm>(timeout); }

#else  // !CPHARNESS_HAVE_MPI

bool mpi_compiled() { return false; }

std::unique_ptr<Comm> make_mpi_comm(std::chrono::milliseconds) {
  throw CommError("the mpi backend is not compiled in (configure with -DCPHARNESS_MPI=ON and OpenMPI installed)",
                  "init");
}

#endif

}  // namespace cpharness::cp
