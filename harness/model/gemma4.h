// The Gemma4 text decoder (gemma4-spec §3): embeddings with per-layer inputs, sandwich-normed decoder layers with
// KV sharing, final norm, tied LM head and logit softcap. Parameter names equal the HF checkpoint names under
// `model.` (e.g. "layers.3.self_attn.q_proj.weight"). Attention goes through an AttentionBackend; the model
// knows nothing of context parallelism.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <optional>
#include <vector>

#include "harness/model/attention_backend.h"
#include "harness/model/config.h"
#include "harness/model/kv_share.h"
#include "harness/model/layer_checkpoint.h"
#include "harness/model/rms_norm.h"
#include "kernels/mask_spec.h"

namespace cpharness::model {

// Everything one forward needs. The tensors may be a shard of a longer sequence: the backend interprets `meta`.
struct ModelInputs {
  torch::Tensor input_ids;     // [B, S] int64
  torch::Tensor position_ids;  // [B, S] int64 (RoPE positions; restart per packed document if the data says so)
  kernels::TokenMetadata meta; // document ids, padding, vision groups for the attention mask
  // Optional token-identity per-layer inputs [B, S, L, P] (HF's get_per_layer_inputs); computed from
  // input_ids when undefined.
  torch::Tensor per_layer_inputs;
};

struct ForwardOptions {
  // Cache-gated semantics share K/V only through a holder (or a cache); shared-kv-states ignores this.
  KvShareHolder* holder = nullptr;
  // When set, receives the residual stream after the embedding and after every layer (L + 1 tensors).
  std::vector<torch::Tensor>* hidden_states = nullptr;
  // Return the final-normed hidden state [B, S, H] instead of logits, for chunked_token_loss (no [S, V] logits).
  bool final_hidden = false;
  // Recompute every decoder layer in backward instead of keeping its activations (layer_checkpoint.h); applies only
  // when gradients are being recorded.
  ActivationCheckpointing checkpointing = ActivationCheckpointing::kOff;
};

// Where a forward keeps the K/V of source layers (KvStore, layer_checkpoint.h): a plain per-forward map
// (shared-kv-states) or a holder's.

// y = x W^T, the only linear layer Gemma4 has. Its weight starts at zero rather than torch::nn::Linear's Kaiming
// draw: every model gets its values from init_weights or a checkpoint (or aliases another's), and at real size that
// draw alone is a pass over billions of host numbers per model built.
class BiasFreeLinearImpl : public torch::nn::Module {
 public:
  BiasFreeLinearImpl(int64_t in, int64_t out) { weight = register_parameter("weight", torch::zeros({out, in})); }
  torch::Tensor forward(const torch::Tensor& x) { return torch::linear(x, weight); }
  torch::Tensor weight;
};
TORCH_MODULE(BiasFreeLinear);

class Gemma4AttentionImpl : public torch::nn::Module {
 public:
  Gemma4AttentionImpl(const ModelConfig& config, int64_t layer);
  // `store` is null when K/V sharing is inactive for this forward (cache-gated without a holder).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const kernels::TokenMetadata& meta, AttentionBackend& backend, KvStore* store);

  BiasFreeLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};

 private:
  int64_t layer_, heads_, kv_heads_, head_dim_, source_;
  bool shared_, stores_kv_;
  kernels::LayerGeometry geometry_;
  double eps_;
};
TORCH_MODULE(Gemma4Attention);

class Gemma4MlpImpl : public torch::nn::Module {
 public:
  Gemma4MlpImpl(int64_t hidden, int64_t intermediate);
  torch::Tensor forward(const torch::Tensor& x);
  BiasFreeLinear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(Gemma4Mlp);

class Gemma4DecoderLayerImpl : public torch::nn::Module {
 public:
  Gemma4DecoderLayerImpl(const ModelConfig& config, int64_t layer);
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& per_layer_input, const kernels::TokenMetadata& meta,
                        AttentionBackend& backend, KvStore* store);

  Gemma4Attention self_attn{nullptr};
  Gemma4Mlp mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  RMSNorm pre_feedforward_layernorm{nullptr}, post_feedforward_layernorm{nullptr};
  BiasFreeLinear per_layer_input_gate{nullptr}, per_layer_projection{nullptr};
  RMSNorm post_per_layer_input_norm{nullptr};
  torch::Tensor layer_scalar;  // [1] buffer, loaded from checkpoints (never assumed 1)
};
TORCH_MODULE(Gemma4DecoderLayer);

// A bare parameter holder so the checkpoint name is "<module>.weight".
class EmbeddingTableImpl : public torch::nn::Module {
 public:
  EmbeddingTableImpl(int64_t rows, int64_t dim) { weight = register_parameter("weight", torch::zeros({rows, dim})); }
  torch::Tensor weight;
};
TORCH_MODULE(EmbeddingTable);

class Gemma4ModelImpl : public torch::nn::Module {
 public:
  explicit Gemma4ModelImpl(const ModelConfig& config);

  // Softcapped logits [B, S, V] in the model dtype.
  torch::Tensor forward(const ModelInputs& inputs, AttentionBackend& backend, const ForwardOptions& options = {});

  // Token-identity part of the per-layer inputs: [B, S, L, P] (= embed_tokens_per_layer[ids] * sqrt(P)).
  torch::Tensor per_layer_token_inputs(const torch::Tensor& input_ids);

  const ModelConfig& config() const { return config_; }
  torch::ScalarType dtype() const { return embed_tokens->weight.scalar_type(); }

  EmbeddingTable embed_tokens{nullptr}, embed_tokens_per_layer{nullptr};
  BiasFreeLinear per_layer_model_projection{nullptr};
  RMSNorm per_layer_projection_norm{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};

 private:
  torch::Tensor project_per_layer_inputs(const torch::Tensor& h0, const torch::Tensor& token_inputs);
  ModelConfig config_;
  torch::Tensor inv_freq_sliding_, inv_freq_full_;  // fp32, never cast with the model
};
TORCH_MODULE(Gemma4Model);

// The embedding multiplier as HF applies it: a 0-d fp32 tensor holding `scale`, cast to the weight dtype
// (bf16: sqrt(1536) = 39.19 becomes 39.25).
torch::Tensor embedding_multiplier(double scale, torch::ScalarType dtype);

// Final logit softcap: tanh(logits / cap) * cap, each op in the logits dtype.
torch::Tensor softcap(const torch::Tensor& logits, double cap);

// The label value that carries no loss (HF's ignore_index).
inline constexpr int64_t kIgnoreIndex = -100;

// Labels for next-token prediction along dim 1 of [B, S, ...]: target[t] = labels[t + 1], the last position
// ignore_index (HF ForCausalLMLoss). The one definition: the CP shard plan shifts with it too.
torch::Tensor shift_labels(const torch::Tensor& labels, int64_t ignore_index = kIgnoreIndex);

// Sum of per-token cross entropies (logits upcast to fp32) over targets != -100, and their count.
struct TokenLoss {
  torch::Tensor sum;  // fp32 scalar, differentiable
  int64_t count = 0;
};
TokenLoss token_loss(const torch::Tensor& logits, const torch::Tensor& shifted_labels);

}  // namespace cpharness::model
