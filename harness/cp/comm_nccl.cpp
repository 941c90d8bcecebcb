// The nccl backend: one GPU per rank, CUDA tensors.
//
// Rendezvous: rank 0 creates the NCCL unique id and publishes it in c10d's TCPStore (from libtorch_cpu; header
// torch/csrc/distributed/c10d/TCPStore.hpp in the wheel) at MASTER_ADDR:MASTER_PORT; the other ranks read it
// (store_rendezvous in launcher.cpp, tested on CPU). Under torchrun the agent already serves the store
// (TORCHELASTIC_USE_AGENT_STORE), so every rank is a client.
//
// Timeouts: the communicator is nonblocking (ncclConfig_t.blocking = 0); every operation is polled with
// ncclCommGetAsyncError / cudaStreamQuery against its deadline, and on timeout the communicator is aborted
// (ncclCommAbort) and CommError is thrown naming the peer.
//
// Streams: operations run on a private *blocking* stream (cudaStreamDefault flags), which the legacy default
// stream (torch's default current stream) orders against implicitly, and each operation waits for its stream
// before returning, so the CPU build needs no c10_cuda. Code that runs torch on non-default streams must
// synchronize them before calling.
//
// Built only when CPHARNESS_HAVE_NCCL (CMake option CPHARNESS_NCCL, default ON when
// /usr/local/cuda/include/nccl.h exists). Without a GPU, make_nccl_comm throws CommError (no crash).
#include "harness/cp/comm.h"
#include "harness/cp/launcher.h"

#if CPHARNESS_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#endif

namespace cpharness::cp {

#if CPHARNESS_HAVE_NCCL

bool nccl_compiled() { return true; }

namespace {

std::atomic<int> g_generation{0};  // one store key per communicator created in this process

ncclDataType_t nccl_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    default: return ncclUint8;
  }
}

class NcclComm final : public Comm {
 public:
  NcclComm(const LaunchEnv& env, std::chrono::milliseconds timeout) : Comm(timeout), rank_(env.rank), size_(env.world_size) {
    const auto deadline = Clock::now() + timeout;
    int ndev = 0;
    const cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev == 0)
      throw CommError("rank " + std::to_string(rank_) + " (nccl) init: no CUDA device is visible (" +
                          (ce != cudaSuccess ? std::string(cudaGetErrorString(ce)) : std::string("0 devices")) +
                          "); the nccl backend needs one GPU per rank",
                      "init", rank_);
    if (env.local_rank < ndev) device_ = env.local_rank;
    else if (ndev == 1) device_ = 0;  // CUDA_VISIBLE_DEVICES gave each rank its own GPU
    else
      throw CommError("rank " + std::to_string(rank_) + " (nccl) init: LOCAL_RANK " + std::to_string(env.local_rank) +
                          " but only " + std::to_string(ndev) + " CUDA devices",
                      "init", rank_);
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");

    // Rendezvous through c10d's TCPStore (store_rendezvous, launcher.cpp).
    ncclUniqueId id;
    std::vector<uint8_t> bytes(sizeof(id));
    if (rank_ == 0) {
      nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId", -1);
      std::memcpy(bytes.data(), &id, sizeof(id));
    }
    bytes = store_rendezvous(env, "cpharness/nccl_unique_id/" + std::to_string(g_generation++), bytes, timeout);
    if (bytes.size() != sizeof(id)) throw CommError(prefix("init") + "NCCL unique id has the wrong size", "init", rank_, 0);
    std::memcpy(&id, bytes.data(), sizeof(id));

    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) nccl_check(r, "ncclCommInitRankConfig", -1);
    wait_comm(deadline, "init", -1);
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault), "cudaStreamCreateWithFlags");
  }

  ~NcclComm() override {
    if (comm_) {
      if (aborted_) ncclCommAbort(comm_);
      else ncclCommDestroy(comm_);
    }
    if (stream_) cudaStreamDestroy(stream_);
    if (scratch_) cudaFree(scratch_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Backend backend() const override { return Backend::Nccl; }
  std::optional<at::Device> transfer_device() const override {
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_));
  }

  void terminate_job(int exit_code, const std::string&) override {
    if (comm_ && !aborted_) ncclCommAbort(comm_);
    aborted_ = true;
    std::_Exit(exit_code);
  }

 protected:
  void sendrecv(const std::vector<at::Tensor>& send, int dst, std::vector<at::Tensor>& recv, int src, CommOp op,
                Clock::time_point deadline) override {
    const char* name = comm_op_name(op);
    // The streaming ring calls this from its background thread, whose current device is not yet this rank's.
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    for (const auto& t : send) check_device(t, op, dst);
    for (const auto& t : recv) check_device(t, op, src);
    nccl_check(ncclGroupStart(), "ncclGroupStart", -1, name);
    if (src >= 0)
      for (auto& t : recv)
        nccl_enqueue(ncclRecv(t.data_ptr(), bytes_of(t), ncclUint8, src, comm_, stream_), "ncclRecv", src, name);
    if (dst >= 0)
      for (const auto& t : send)
        nccl_enqueue(ncclSend(t.data_ptr(), bytes_of(t), ncclUint8, dst, comm_, stream_), "ncclSend", dst, name);
    nccl_enqueue(ncclGroupEnd(), "ncclGroupEnd", src >= 0 ? src : dst, name);
    wait_stream(deadline, name, src >= 0 ? src : dst);
  }

  void do_all_reduce(at::Tensor& t, Clock::time_point deadline) override {
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");  // rank 0's heartbeat may come from another thread
    check_device(t, CommOp::AllReduce, -1);
    nccl_enqueue(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_dtype(t.scalar_type()),
                               ncclSum, comm_, stream_),
                 "ncclAllReduce", -1, "all_reduce");
    wait_stream(deadline, "all_reduce", -1);
  }

  void do_broadcast(at::Tensor& t, int root, Clock::time_point deadline) override {
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");  // rank 0's heartbeat may come from another thread
    check_device(t, CommOp::Broadcast, root);
    nccl_enqueue(ncclBroadcast(t.data_ptr(), t.data_ptr(), bytes_of(t), ncclUint8, root, comm_, stream_),
                 "ncclBroadcast", root, "broadcast");
    wait_stream(deadline, "broadcast", root);
  }

  void do_barrier(Clock::time_point deadline) override {
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");  // rank 0's heartbeat may come from another thread
    if (!scratch_) cuda_check(cudaMalloc(&scratch_, sizeof(float)), "cudaMalloc");
    nccl_enqueue(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce", -1,
                 "barrier");
    wait_stream(deadline, "barrier", -1);
  }

 private:
  static size_t bytes_of(const at::Tensor& t) { return static_cast<size_t>(t.numel()) * t.element_size(); }

  std::string prefix(const std::string& op) const {
    return "rank " + std::to_string(rank_) + " (nccl) " + op + ": ";
  }
  void check_device(const at::Tensor& t, CommOp op, int peer) {
    if (!t.device().is_cuda() || t.device().index() != device_)
      throw CommError(prefix(comm_op_name(op)) + "tensor on " + t.device().str() + ", expected cuda:" +
                          std::to_string(device_),
                      comm_op_name(op), rank_, peer);
  }
  void cuda_check(cudaError_t e, const char* call) {
    if (e != cudaSuccess)
      throw CommError(prefix("init") + call + " failed: " + cudaGetErrorString(e), "init", rank_);
  }
  void nccl_check(ncclResult_t r, const char* call, int peer, const std::string& op = "init") {
    if (r == ncclSuccess) return;
    fail(op, peer, std::string(call) + " failed: " + ncclGetErrorString(r) + last_error());
  }
  void nccl_enqueue(ncclResult_t r, const char* call, int peer, const std::string& op) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    nccl_check(r, call, peer, op);
  }
  std::string last_error() const {
    const char* s = comm_ ? ncclGetLastError(comm_) : nullptr;
    return (s && *s) ? std::string(" (") + s + ")" : std::string();
  }
  [[noreturn]] void fail(const std::string& op, int peer, const std::string& what) {
    if (comm_ && !aborted_) ncclCommAbort(comm_);
    aborted_ = true;
    comm_ = nullptr;
    throw CommError(prefix(op) + what, op, rank_, peer);
  }
  [[noreturn]] void timeout_fail(const std::string& op, int peer) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout()).count();
    fail(op, peer, "timed out after " + std::to_string(ms) + " ms" +
                       (peer >= 0 ? " waiting for rank " + std::to_string(peer) : std::string(" waiting for the group")));
  }
  void check_alive(const std::string& op, int peer) {
    if (!comm_ || aborted_) fail(op, peer, "the communicator was aborted by an earlier failure");
  }
  // Waits until the nonblocking communicator has no operation in progress.
  void wait_comm(Clock::time_point deadline, const std::string& op, int peer) {
    check_alive(op, peer);
    for (;;) {
      ncclResult_t a = ncclSuccess;
      nccl_check(ncclCommGetAsyncError(comm_, &a), "ncclCommGetAsyncError", peer, op);
      if (a == ncclSuccess) return;
      if (a != ncclInProgress) fail(op, peer, std::string("NCCL error: ") + ncclGetErrorString(a) + last_error());
      if (Clock::now() >= deadline) timeout_fail(op, peer);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  void wait_stream(Clock::time_point deadline, const std::string& op, int peer) {
    wait_comm(deadline, op, peer);
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) fail(op, peer, std::string("CUDA error: ") + cudaGetErrorString(q));
      ncclResult_t a = ncclSuccess;
      ncclCommGetAsyncError(comm_, &a);
      if (a != ncclSuccess && a != ncclInProgress)
        fail(op, peer, std::string("NCCL error: ") + ncclGetErrorString(a) + last_error());
      if (Clock::now() >= deadline) timeout_fail(op, peer);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  int rank_, size_;
  int device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
  bool aborted_ = false;
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(const LaunchEnv& env, std::chrono::milliseconds timeout) {
  return std::make_unique<NcclComm>(env, timeout);
}

#else  // !CPHARNESS_HAVE_NCCL

bool nccl_compiled() { return false; }

std::unique_ptr<Comm> make_nccl_comm(const LaunchEnv& env, std::chrono::milliseconds) {
  throw CommError("rank " + std::to_string(env.rank) +
                      " (nccl) init: the nccl backend is not compiled in (configure with -DCPHARNESS_NCCL=ON and "
                      "NCCL at /usr/local/cuda)",
                  "init", env.rank);
}

#endif

}  // namespace cpharness::cp
