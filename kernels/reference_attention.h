// The fp64 oracle for every attention path (chunk attention, ring attention, the mask checks): dense masked
// softmax attention with autograd, GQA by repeating K/V heads. Rows with no allowed key give out 0 and lse
// -inf, and contribute zero gradients.
#pragma once
#include <torch/torch.h>

namespace cpharness::kernels {

struct DenseAttention {
  torch::Tensor out;  // [B, Hq, Sq, D], differentiable in q, k, v
  torch::Tensor lse;  // [B, Hq, Sq], natural log, detached
};

// q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D]; allowed bool [B or 1, Sq, Skv]. Computes in the inputs' dtype (pass
// fp64 for an oracle).
DenseAttention dense_reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const torch::Tensor& allowed, double scale = 1.0);

struct DenseAttentionGrads {
  torch::Tensor out, lse, dq, dk, dv;  // fp64
};

// The oracle's output and its gradients for the upstream gradient `dout`, all in fp64.
DenseAttentionGrads dense_reference_attention_grads(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v, const torch::Tensor& allowed,
                                                    double scale, const torch::Tensor& dout);

}  // namespace cpharness::kernels
