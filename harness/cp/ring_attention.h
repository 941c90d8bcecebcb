// Ring attention for CP (cp-reference §1): each rank keeps its query shard; K/V chunks (with their owners'
// per-token metadata) travel around the ring. Forward: own chunk first, then cp - 1 rotations, each chunk
// through the block-mask cache and the kernels' chunk attention, merged by log-sum-exp. Backward: the ring is
// replayed (recompute, the default: no chunk is held between forward and backward, so memory stays at one
// shard of K/V per layer, as upstream), per-chunk dq/dk/dv, and every foreign dK/dV is sent back to its owner
// and accumulated there in fp32. It implements the model's AttentionBackend, so the model never knows.
#pragma once
#include <ctime>
#include <torch/torch.h>

#include <chrono>
#include <string>
#include <vector>

#include "harness/cp/comm.h"
#include "harness/model/attention_backend.h"
#include "kernels/block_mask_cache.h"
#include "kernels/lse_merge.h"

namespace cpharness::cp {

// Known-bad variants, for the selftest mutants only.
enum class RingMutation {
  kNone,
  kReverseRotation,   // owners labelled as if chunks came from rank + s instead of rank - s
  kDropGradReturn,    // foreign dK/dV are never sent back to their owners
  kStaleGeneration,   // the cache generation never advances (a stale mask survives a new batch)
  kWindowOffByOneAtEdge,  // foreign chunks use q - k <= W instead of q - k < W (a window bug at shard edges)
  kPaddedRowsNotZeroed,   // rows with no allowed key take V of local index 0 (upstream's trick, never zeroed)
};

struct RingOptions {
  bool cache_enabled = true;
  bool recompute_backward = true;
  int64_t q_block = 128;
  int64_t kv_block = 128;
  kernels::LseMergeMode merge = kernels::LseMergeMode::kStable;
  RingMutation mutation = RingMutation::kNone;
  bool record_chunks = false;  // keep every chunk's partial result and gradients (tests, localisation)
};

// One chunk's contribution on this rank, kept when RingOptions::record_chunks is set.
struct ChunkRecord {
  int64_t layer = 0;
  int owner = 0;
  bool computed = false;
  torch::Tensor out, lse;  // forward: this chunk alone (accumulation dtype); undefined when not computed
  torch::Tensor dq, dk, dv;  // backward: this chunk's contributions before dK/dV go home
};

// One ring pass of one layer on this rank.
struct RingTraceEntry {
  int64_t layer = 0;
  std::string pass;         // "forward" or "backward"
  std::vector<int> owners;  // owner of the chunk processed at ring step s
  std::vector<bool> computed;  // false: no allowed pair in that chunk, compute skipped
  int64_t ring_exchanges = 0;
  int64_t grad_returns = 0;   // exchanges that returned dK/dV to owners
  int64_t bytes_sent = 0;
};

// The geometry rank `rank` uses against `owner`'s chunk: the layer's own, except under the window mutant.
kernels::LayerGeometry ring_chunk_geometry(const RingOptions& options, int rank, int owner,
                                           const kernels::LayerGeometry& geometry);

class RingAttention : public model::AttentionBackend {
 public:
  RingAttention(Comm& comm, RingOptions options = {});

  // Call once per batch before its forward: the generation keys the block-mask cache, `local_len` is S_loc.
  void begin_batch(uint64_t generation, int64_t local_len);

  torch::Tensor attend(const model::AttentionInputs& in, const kernels::TokenMetadata& local_meta) override;

  Comm& comm() { return comm_; }
  kernels::BlockMaskCache& cache() { return cache_; }
  const RingOptions& options() const { return options_; }
  std::vector<RingTraceEntry>& trace() { return trace_; }
  std::vector<ChunkRecord>& records() { return records_; }
  uint64_t generation() const { return generation_; }
  int64_t local_len() const { return local_len_; }

  // Seconds spent inside communication calls (including waiting for peers), for step-time breakdowns: wall time,
  // and this thread's CPU time (MPI polls while it waits, so waiting burns CPU that is not compute).
  double comm_seconds() const { return comm_seconds_; }
  double comm_cpu_seconds() const { return comm_cpu_seconds_; }
  void add_comm_seconds(double wall, double cpu) { comm_seconds_ += wall, comm_cpu_seconds_ += cpu; }
  void reset_comm_seconds() { comm_seconds_ = comm_cpu_seconds_ = 0; }

  // The geometry this rank uses against `owner`'s chunk (honours the window mutant).
  kernels::LayerGeometry chunk_geometry(int owner, const kernels::LayerGeometry& geometry) const;

  // Owner of the chunk held at ring step s (honours the rotation mutant).
  int owner_at_step(int step) const;

 private:
  Comm& comm_;
  RingOptions options_;
  kernels::BlockMaskCache cache_;
  std::vector<RingTraceEntry> trace_;
  std::vector<ChunkRecord> records_;
  uint64_t generation_ = 0;
  bool generation_frozen_ = false;
  int64_t local_len_ = 0;
  double comm_seconds_ = 0;
  double comm_cpu_seconds_ = 0;
};

// Adds the wall time of its scope to a RingAttention's comm_seconds.
// CPU time consumed by the calling thread so far (CLOCK_THREAD_CPUTIME_ID).
inline double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

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
