// Masked attention of one query shard against one K/V chunk, block-sparse over a BlockMask, forward with
// log-sum-exp and an explicit backward (the FlashAttention recurrences). CPU, libtorch ops per q block /
// kv block; the CUDA kernels later implement the same contract.
#pragma once
#include "kernels/block_mask.h"
#include "kernels/lse_merge.h"

namespace cpharness::kernels {

// Work done by one call, for work-efficiency figures and the "no mask inside full blocks" contract.
struct AttentionWork {
  int64_t score_elements = 0;   // q x k scores computed, summed over batch and query heads
  int64_t mask_elements = 0;    // mask elements evaluated (partial tiles only), summed over batch
  int64_t partial_blocks = 0;   // tiles visited that needed the mask, summed over batch
  int64_t full_blocks = 0;      // tiles visited without the mask, summed over batch
  AttentionWork& operator+=(const AttentionWork& o) {
    score_elements += o.score_elements;
    mask_elements += o.mask_elements;
    partial_blocks += o.partial_blocks;
    full_blocks += o.full_blocks;
    return *this;
  }
};

// q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D] with Hq a multiple of Hkv (GQA: query head h uses kv head
// h / (Hq / Hkv), never materialised); Sq / Skv equal the mask's q / kv range lengths; the mask's batch is B
// or 1. Returns out [B, Hq, Sq, D] and lse [B, Hq, Sq] in the accumulation dtype (fp32, or fp64 for fp64
// inputs), not yet cast back: partial results are merged first (lse_merge) and cast once. Rows without an
// allowed key in this chunk: out exactly 0, lse -inf. Empty tiles are skipped; full tiles never evaluate the
// mask.
AttentionPartial chunk_attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const BlockMask& mask, double scale, AttentionWork* work = nullptr);

struct ChunkAttentionGrads {
  torch::Tensor dq;  // [B, Hq, Sq, D], this chunk's contribution
  torch::Tensor dk;  // [B, Hkv, Skv, D]
  torch::Tensor dv;  // [B, Hkv, Skv, D]
};

// Gradients for one chunk, given the upstream gradient `dout` of the final (merged) output and the merged
// `out` / `lse` of the forward over all chunks (cp-reference §1.6): P = exp(scale * q k^T - lse) on allowed
// elements, dv = P^T dout, dS = P * (dout v^T - rowsum(dout * out)), dq = scale * dS k, dk = scale * dS^T q.
// Summing dq over chunks gives the full dq. Accumulates in fp32 (fp64 for fp64 inputs) and returns that
// dtype. Rows with lse = -inf contribute exactly 0. dq walks the q-major lists, dk / dv the kv-major
// transposes (no scatter, deterministic).
ChunkAttentionGrads chunk_attention_backward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             const torch::Tensor& out, const torch::Tensor& lse,
                                             const torch::Tensor& dout, const BlockMask& mask, double scale,
                                             AttentionWork* work = nullptr);

// The accumulation dtype for inputs of `dtype`: fp64 stays fp64, everything else computes in fp32.
torch::ScalarType accumulation_dtype(torch::ScalarType dtype);

}  // namespace cpharness::kernels
