// The tied LM head and the token cross entropy without the [B*S, V] logits: tokens go through in chunks, each
// chunk's logits are made, softcapped, reduced and dropped in forward, and made again in backward (per-chunk
// checkpointing). Same ops per element as softcap(linear(h, W)) followed by token_loss, so it agrees with the
// plain loss to summation order (the per-chunk sums and dW), at a peak of chunk x V logits instead of S x V (at
// 64k tokens and V = 262144 that is 64 GiB of fp32 logits avoided).
#pragma once
#include <torch/torch.h>

#include <optional>

#include "harness/model/gemma4.h"

namespace cpharness::model {

// hidden: [B, S, H] (the final-normed residual stream, Gemma4ModelImpl::forward with ForwardOptions::final_hidden);
// lm_head: [V, H]; shifted_labels: [B, S] (kIgnoreIndex where no loss). chunk_tokens >= 1.
TokenLoss chunked_token_loss(const torch::Tensor& hidden, const torch::Tensor& lm_head, std::optional<double> softcap,
                             const torch::Tensor& shifted_labels, int64_t chunk_tokens);

// The model's forward and its token loss in one: chunk_tokens 0 is the plain path (the logits, detached, go to
// `logits` when given); chunk_tokens >= 1 the chunked loss (no logits exist; `logits` is left undefined).
TokenLoss forward_loss(Gemma4Model& model, const ModelInputs& inputs, AttentionBackend& backend, ForwardOptions options,
                       const torch::Tensor& shifted_labels, int64_t chunk_tokens, torch::Tensor* logits = nullptr);

}  // namespace cpharness::model
