// Where a run's tensors live: the case key "device" ("cpu" | "cuda" | "cuda:N") or `run --device`. The model,
// its optimizer, the batches, the ring and the kernels all follow the device; records the checks read come back to
// the host. Device memory figures come from the CUDA caching allocator (GPU build only; CPU runs report none).
#pragma once
#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "harness/train/batch.h"

namespace cpharness::train {

// "cpu", "cuda" or "cuda:N"; std::invalid_argument naming the accepted forms otherwise.
torch::Device parse_device(const std::string& name);

// True when this build can run CUDA tensors (CPHARNESS_CUDA=ON) and the machine has a CUDA device.
bool cuda_available();
// Why CUDA is not available ("" when it is): not built with CUDA, or no device (with the driver's words).
std::string cuda_unavailable_reason();

// The batch with every tensor (ids, labels, positions, metadata) moved to `device`.
Batch to_device(const Batch& batch, const torch::Device& device);

// Waits for the device's queued work (a no-op on the CPU): step times are taken after it.
void synchronize(const torch::Device& device);

// Peak bytes the caching allocator handed out (allocated) and held from the driver (reserved) since the last
// reset_peak_memory, for the whole device (ranks as threads on one GPU share it). Empty on the CPU.
struct DeviceMemory {
  int64_t peak_allocated = 0;
  int64_t peak_reserved = 0;
};
void reset_peak_memory(const torch::Device& device);
std::optional<DeviceMemory> peak_memory(const torch::Device& device);

// Gives the caching allocator's unused blocks back to the driver (CUDA; a no-op on the CPU), so that one run's
// cache does not crowd the next run of the same process (the reference, then the fp32 oracle, then a candidate).
void release_cached_memory(const torch::Device& device);

// The device's name for reports ("cpu", or the GPU's marketing name).
std::string device_name(const torch::Device& device);

// ---- Ranks as threads on one GPU, each on a CUDA stream of its own ----------------------------------------------
// Each rank thread queues its work on a stream of its own, so one rank's kernels are never ordered behind another's
// by a shared queue; what crosses between them is ordered explicitly. Everything below is a no-op for CPU devices
// and in the CPU build.

// Makes a stream from the device's pool this thread's current stream until destroyed (the previous one restored).
class OwnStream {
 public:
  explicit OwnStream(const torch::Device& device);
  ~OwnStream();
  OwnStream(const OwnStream&) = delete;
  OwnStream& operator=(const OwnStream&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The calling thread's current stream (of its current CUDA device), captured so that a helper thread working for
// it (the streaming ring's communication thread) queues onto the same stream: use() makes it current there until
// the returned holder dies.
class ThreadStream {
 public:
  ThreadStream();  // captures the calling thread's stream
  std::shared_ptr<void> use() const;

 private:
  std::shared_ptr<void> stream_;  // null: nothing to carry (CPU)
};

// Tensors one rank thread hands another are complete only when the sender's stream reaches them: mark() records
// that point after the sender queued them; accept() makes the receiver's current stream wait for it and keeps the
// tensors' memory from reuse until the receiver's stream has read them. Null (no CUDA tensor): nothing to order.
class StreamHandoff {
 public:
  static std::shared_ptr<const StreamHandoff> mark(const std::vector<at::Tensor>& sent);
  void accept(const std::vector<at::Tensor>& received) const;

 private:
  std::shared_ptr<void> event_;
};

}  // namespace cpharness::train
