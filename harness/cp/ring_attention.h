// Ring attention for CP (cp-reference §1): each rank keeps its query shard; K/V chunks (with their owners'
// per-token metadata) travel around the ring. Forward: own chunk first, then cp - 1 rotations (fewer under the hop
// limit), each chunk through the block-mask cache and the kernels' chunk attention, merged by log-sum-exp.
// Backward: the ring is replayed (recompute: no chunk is held between forward and backward), per-chunk dq/dk/dv, and
// every foreign dK/dV reaches its owner, accumulated in fp32. Two modes (RingMode): `collect`, upstream's ring
// (every chunk collected first, one direct return per distance), and `stream` (the next exchange posted before the
// current chunk is computed, at most two chunks held, dK/dV accumulators travelling with their chunks); both give the
// same bits. Under zigzag sharding a rank's tokens are two global ranges, and each (query range, key range) pair gets
// its own block mask. RingAttention implements the model's AttentionBackend, so the model never knows.
//
// The algorithm is collect_forward / collect_backward and stream_forward / stream_backward in ring_attention.cpp;
// the selftest's known-bad variants go through RingHooks (ring_hooks.h), and everything recorded (trace, per-chunk
// results, comm time, chunks held) through a RingObserver.
#pragma once
#include <ctime>
#include <torch/torch.h>

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "harness/cp/chunk_compute.h"
#include "harness/cp/comm.h"
#include "harness/cp/comm_worker.h"
#include "harness/cp/ring_hooks.h"
#include "harness/cp/shard_plan.h"
#include "harness/model/attention_backend.h"
#include "kernels/block_mask_cache.h"
#include "kernels/chunk_attention.h"
#include "kernels/lse_merge.h"

namespace cpharness::cp {

// How K/V chunks move (both give bitwise the same numbers: the same merges and sums in the same order).
enum class RingMode {
  kCollect,  // upstream (#2621): every chunk collected before any compute, foreign dK/dV returned one exchange per
             // distance; the exchanges block
  kStream,   // the next chunk's exchange is posted before the current one is computed (at most two chunks held),
             // out/LSE merged as chunks arrive, dK/dV accumulators travel with their chunks (ring-flash-attention)
};
const char* to_string(RingMode mode);

struct RingOptions {
  RingMode mode = RingMode::kCollect;
  bool cache_enabled = true;
  bool recompute_backward = true;
  int64_t q_block = 128;
  int64_t kv_block = 128;
  kernels::LseMergeMode merge = kernels::LseMergeMode::kStable;
  RingMutation mutation = RingMutation::kNone;
  bool record_chunks = false;  // keep every chunk's partial result and gradients (tests, localisation)
  // Sliding-window layers without vision groups fetch only the prior chunks their window reaches (upstream #2984):
  // min(cp - 1, ceil(W / S_loc)) ring steps, forward and backward (ring_steps).
  bool hop_limit = false;
  CudaAttentionPath cuda_attention = CudaAttentionPath::kKernel;  // CUDA tensors: the kernel, or libtorch ops
};

// One chunk's contribution on this rank, kept when RingOptions::record_chunks is set.
struct ChunkRecord {
  int64_t layer = 0;
  int owner = 0;
  bool computed = false;
  torch::Tensor out, lse;    // forward: this chunk alone (accumulation dtype); undefined when not computed
  torch::Tensor dq, dk, dv;  // backward: this chunk's contributions before dK/dV go home
};

// One ring pass of one layer on this rank.
struct RingTraceEntry {
  int64_t layer = 0;
  std::string pass;            // "forward" or "backward"
  std::vector<int> owners;     // owner of the chunk processed at ring step s
  std::vector<bool> computed;  // false: no allowed pair in that chunk, compute skipped
  // Every attention computed in the pass, as ChunkCompute ran it: {query start, length, key start, length} in global
  // token indices (one per chunk under contiguous sharding, up to four under zigzag: its sub-chunk pairs).
  std::vector<std::array<int64_t, 4>> segments;
  int64_t ring_exchanges = 0;
  int64_t grad_returns = 0;  // exchanges that returned dK/dV to owners
  // Per dK/dV return of the pass, in order: whose chunk the dK/dV belong to, and the rank they were sent to (the
  // two are equal when the return reaches its owner).
  struct GradReturn {
    int owner = 0, sent_to = 0;
  };
  std::vector<GradReturn> returned;
  int64_t bytes_sent = 0;
  int64_t peak_chunks = 0;   // most K/V chunks alive on the rank at once (own included, received and in flight)
  // Per exchange of the pass, in order: seconds since the pass began when it was posted and when its wait returned
  // (collect: the same moment apart from the exchange itself; stream: compute happened in between).
  std::vector<double> posted_s, waited_s;
};

// What the ring reports as it runs. The algorithm never keeps records itself.
class RingObserver {
 public:
  virtual ~RingObserver() = default;
  virtual void pass_begin(int64_t layer, const char* pass) {}
  // The chunk of `owner` at the next ring step; `computed` false when it has no allowed pair.
  virtual void chunk(int owner, bool computed) {}
  // An attention of the global query range `q` against the key range `kv` was computed.
  virtual void segment_computed(const kernels::TokenRange& q, const kernels::TokenRange& kv) {}
  virtual void chunk_forward(int64_t layer, int owner, const kernels::AttentionPartial* partial) {}
  virtual void chunk_backward(int64_t layer, int owner, const kernels::ChunkAttentionGrads& grads) {}
  // One exchange of `bytes` (K/V around the ring, or dK/dV home), and the time this rank was blocked on it.
  virtual void exchanged(int64_t bytes, bool grad_return, double wall_s, double cpu_s) {}
  // dK/dV of `owner`'s chunk sent home to rank `destination` (correct: the owner).
  virtual void grads_sent_home(int owner, int destination) {}
  // When an exchange was posted and when its wait returned (steady clock), in exchange order.
  virtual void exchange_times(std::chrono::steady_clock::time_point posted, std::chrono::steady_clock::time_point waited) {}
  // K/V chunks alive on the rank now.
  virtual void chunks_held(int chunks) {}
  virtual void pass_end() {}
};

// The geometry rank `rank` uses against `owner`'s chunk (the layer's own, except under the window mutant).
kernels::LayerGeometry ring_chunk_geometry(const RingOptions& options, int rank, int owner,
                                           const kernels::LayerGeometry& geometry);

// How many ring steps after the own chunk a layer of `geometry` takes at cp `n` with `local_len` tokens per rank:
// cp - 1, or with options.hop_limit on a sliding layer without vision groups min(cp - 1, ceil(W / local_len)) (a
// query at the start of a shard reaches W - 1 tokens back). What the ring runs and what the checks expect.
int ring_steps(const RingOptions& options, const kernels::LayerGeometry& geometry, int n, int64_t local_len);

// The ring as the model's attention backend, with its block-mask cache, and the observer that keeps the trace,
// the per-chunk records and the time spent communicating.
class RingAttention : public model::AttentionBackend, public RingObserver {
 public:
  RingAttention(Comm& comm, RingOptions options = {});
  RingAttention(const RingAttention&) = delete;  // its ChunkCompute reports to this object
  RingAttention& operator=(const RingAttention&) = delete;

  // Call once per batch before its forward: the generation keys the block-mask cache, `local_len` is S_loc and
  // `sharding` the layout that says which global ranges a rank's tokens are.
  void begin_batch(uint64_t generation, int64_t local_len, Sharding sharding = Sharding::kContiguous);

  torch::Tensor attend(const model::AttentionInputs& in, const kernels::TokenMetadata& local_meta) override;

  Comm& comm() { return comm_; }
  kernels::BlockMaskCache& cache() { return cache_; }
  ChunkCompute& compute() { return compute_; }
  const RingOptions& options() const { return options_; }
  const RingHooks& hooks() const { return *hooks_; }
  std::vector<RingTraceEntry>& trace() { return trace_; }
  std::vector<ChunkRecord>& records() { return records_; }
  uint64_t generation() const { return generation_; }
  int64_t local_len() const { return local_len_; }
  Sharding sharding() const { return sharding_; }

  // Seconds spent inside communication calls (including waiting for peers), for step-time breakdowns: wall time,
  // and this thread's CPU time (MPI polls while it waits, so waiting burns CPU that is not compute).
  double comm_seconds() const { return comm_seconds_; }
  double comm_cpu_seconds() const { return comm_cpu_seconds_; }
  void add_comm_seconds(double wall, double cpu) { comm_seconds_ += wall, comm_cpu_seconds_ += cpu; }
  void reset_comm_seconds() { comm_seconds_ = comm_cpu_seconds_ = 0; }

  // RingObserver: the trace, the chunk records (when options().record_chunks) and the comm time.
  void pass_begin(int64_t layer, const char* pass) override;
  void chunk(int owner, bool computed) override;
  void segment_computed(const kernels::TokenRange& q, const kernels::TokenRange& kv) override;
  void chunk_forward(int64_t layer, int owner, const kernels::AttentionPartial* partial) override;
  void chunk_backward(int64_t layer, int owner, const kernels::ChunkAttentionGrads& grads) override;
  void exchanged(int64_t bytes, bool grad_return, double wall_s, double cpu_s) override;
  void grads_sent_home(int owner, int destination) override;
  void exchange_times(std::chrono::steady_clock::time_point posted, std::chrono::steady_clock::time_point waited) override;
  void chunks_held(int chunks) override;
  void pass_end() override;
  // The background thread of the streaming ring (started on first use).
  CommWorker& worker();

 private:
  Comm& comm_;
  RingOptions options_;
  std::unique_ptr<RingHooks> hooks_;
  kernels::BlockMaskCache cache_;
  ChunkCompute compute_;
  std::unique_ptr<CommWorker> worker_;
  std::vector<RingTraceEntry> trace_;
  RingTraceEntry current_;
  std::chrono::steady_clock::time_point pass_start_;
  std::vector<ChunkRecord> records_;
  uint64_t generation_ = 0;
  bool generation_set_ = false;
  int64_t local_len_ = 0;
  Sharding sharding_ = Sharding::kContiguous;
  double comm_seconds_ = 0;
  double comm_cpu_seconds_ = 0;
};

// CPU time consumed by the calling thread so far (CLOCK_THREAD_CPUTIME_ID).
inline double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Adds the wall and CPU time of its scope to a RingAttention's comm time (collectives outside the ring).
class CommTimer {
 public:
  explicit CommTimer(RingAttention& ring) : ring_(ring), start_(std::chrono::steady_clock::now()), cpu_start_(thread_cpu_seconds()) {}
  ~CommTimer() {
    ring_.add_comm_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(),
                           thread_cpu_seconds() - cpu_start_);
  }

 private:
  RingAttention& ring_;
  std::chrono::steady_clock::time_point start_;
  double cpu_start_;
};

}  // namespace cpharness::cp
