// Where one chunk's attention runs, chosen by where its tensors live: the CPU chunk attention (libtorch ops) on
// the CPU; on CUDA the block-sparse CUDA kernel (GPU build) reading a device copy of the block mask, made once per
// mask and batch, or the same libtorch-ops path as the CPU (the reference and fallback: fp64, or when asked for).
// The ring calls this and nothing else, so the ring algorithm stays the same on every device.
#pragma once
#include <functional>
#include <map>
#include <memory>

#include "kernels/block_mask.h"
#include "kernels/chunk_attention.h"

namespace cpharness::cp {

enum class CudaAttentionPath {
  kKernel,      // kernels/cuda block-sparse flash attention (fp32 / fp16 / bf16; fp64 falls back to kOps), bf16 /
                // fp16 on tensor cores
  kKernelFp32,  // the same kernels with bf16 / fp16 on the fp32 CUDA-core path (the fallback of the tensor-core one)
  kOps,         // the libtorch-ops chunk attention on CUDA tensors
};

// Whether this build has the CUDA kernel path (CPHARNESS_CUDA=ON).
bool cuda_kernel_built();

class ChunkCompute {
 public:
  explicit ChunkCompute(CudaAttentionPath path = CudaAttentionPath::kKernel) : path_(path) {}

  kernels::AttentionPartial forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const std::shared_ptr<const kernels::BlockMask>& mask, double scale);
  kernels::ChunkAttentionGrads backward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        const torch::Tensor& out, const torch::Tensor& lse, const torch::Tensor& dout,
                                        const std::shared_ptr<const kernels::BlockMask>& mask, double scale);
  // Called with the mask of every attention computed, before it runs (the ring's trace records what was computed,
  // not what the ring meant to compute).
  void report_to(std::function<void(const kernels::BlockMask&)> computed) { computed_ = std::move(computed); }
  // A new batch: the device copies of the last batch's masks are dropped (as the block-mask cache drops them).
  void new_batch() { device_masks_.clear(); }
  // Device copies made so far in this batch (one per host mask: forward and backward share it).
  size_t device_copies() const { return device_masks_.size(); }

 private:
  bool use_kernel(const torch::Tensor& q) const;
  const kernels::BlockMask& on_device(const std::shared_ptr<const kernels::BlockMask>& mask, const torch::Device& d);

  CudaAttentionPath path_;
  std::function<void(const kernels::BlockMask&)> computed_;
  // Host mask -> its device copy; the host mask is held, so its address is never reused while the entry lives.
  std::map<const kernels::BlockMask*, std::pair<std::shared_ptr<const kernels::BlockMask>, kernels::BlockMask>>
      device_masks_;
};

}  // namespace cpharness::cp
