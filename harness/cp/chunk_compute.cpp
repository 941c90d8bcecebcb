#include "harness/cp/chunk_compute.h"

#ifdef CPHARNESS_HAVE_CUDA
#include "kernels/cuda/chunk_attention_cuda.h"
#endif

namespace cpharness::cp {

bool cuda_kernel_built() {
#ifdef CPHARNESS_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

bool ChunkCompute::use_kernel(const torch::Tensor& q) const {
  const auto t = q.scalar_type();
  return cuda_kernel_built() && q.is_cuda() && path_ != CudaAttentionPath::kOps &&
         (t == torch::kFloat32 || t == torch::kBFloat16 || t == torch::kFloat16);
}

const kernels::BlockMask& ChunkCompute::on_device(const std::shared_ptr<const kernels::BlockMask>& mask,
                                                  const torch::Device& device) {
  auto it = device_masks_.find(mask.get());
  if (it == device_masks_.end()) {
#ifdef CPHARNESS_HAVE_CUDA
    it = device_masks_.emplace(mask.get(), std::make_pair(mask, kernels::block_mask_to(*mask, device))).first;
#else
    TORCH_CHECK(false, "chunk attention: the CUDA kernel is not built");
#endif
  }
  return it->second.second;
}

kernels::AttentionPartial ChunkCompute::forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                                const std::shared_ptr<const kernels::BlockMask>& mask, double scale) {
  if (computed_) computed_(*mask);
#ifdef CPHARNESS_HAVE_CUDA
  if (use_kernel(q))
    return kernels::chunk_attention_forward_cuda(q, k, v, on_device(mask, q.device()), scale, nullptr,
                                                 path_ == CudaAttentionPath::kKernel);
#endif
  return kernels::chunk_attention_forward(q, k, v, *mask, scale);
}

kernels::ChunkAttentionGrads ChunkCompute::backward(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v, const torch::Tensor& out,
                                                    const torch::Tensor& lse, const torch::Tensor& dout,
                                                    const std::shared_ptr<const kernels::BlockMask>& mask, double scale) {
  if (computed_) computed_(*mask);
#ifdef CPHARNESS_HAVE_CUDA
  if (use_kernel(q))
    return kernels::chunk_attention_backward_cuda(q, k, v, out, lse, dout, on_device(mask, q.device()), scale, nullptr,
                                                  path_ == CudaAttentionPath::kKernel);
#endif
  return kernels::chunk_attention_backward(q, k, v, out, lse, dout, *mask, scale);
}

}  // namespace cpharness::cp
