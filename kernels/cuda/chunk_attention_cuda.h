// The libtorch face of the CUDA block-sparse attention: the contract of kernels/chunk_attention.h on CUDA
// tensors (GPU build only, CPHARNESS_CUDA=ON). Launches on the current CUDA stream of q's device.
#pragma once
#include "kernels/chunk_attention.h"

namespace cpharness::kernels {

// A copy of `mask` with its lists and metadata on `device` (int32 lists, int64 ids, bool padding, contiguous).
// The adapters below move a mask themselves when needed; moving it once and reusing it saves the copies.
BlockMask block_mask_to(const BlockMask& mask, const torch::Device& device);

// As chunk_attention_forward: q [B, Hq, Sq, D], k, v [B, Hkv, Skv, D] on one CUDA device, fp32, fp16 or bf16,
// head_dim <= 512. Returns out and lse in fp32 (the accumulation dtype), rows with no key out 0, lse -inf.
// `tensor_cores`: bf16 / fp16 inputs run the tensor-core kernels (false: the fp32 CUDA-core ones).
AttentionPartial chunk_attention_forward_cuda(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const BlockMask& mask, double scale, AttentionWork* work = nullptr,
                                              bool tensor_cores = true);

// As chunk_attention_backward, with the merged out / lse of all chunks. Returns dq, dk, dv in fp32.
ChunkAttentionGrads chunk_attention_backward_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                                  const torch::Tensor& v, const torch::Tensor& out,
                                                  const torch::Tensor& lse, const torch::Tensor& dout,
                                                  const BlockMask& mask, double scale, AttentionWork* work = nullptr,
                                                  bool tensor_cores = true);

}  // namespace cpharness::kernels
