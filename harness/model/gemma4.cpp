#include "harness/model/gemma4.h"

#include <fmt/format.h>

#include <cmath>

#include "harness/model/layer_geometry.h"
#include "harness/model/rope.h"

namespace cpharness::model {
namespace {

BiasFreeLinear linear(int64_t in, int64_t out) { return BiasFreeLinear(in, out); }

torch::Tensor gelu_tanh(const torch::Tensor& x) { return torch::gelu(x, "tanh"); }

// HF's ScaledWordEmbedding: lookup with padding_idx (row `pad` gets no gradient from the lookup), times a
// 0-d fp32 scale cast to the weight dtype (so under bf16 the multiplier itself is bf16-rounded).
torch::Tensor scaled_embedding(const torch::Tensor& weight, const torch::Tensor& ids, int64_t pad, double scale) {
  return torch::embedding(weight, ids, pad) * embedding_multiplier(scale, weight.scalar_type()).to(weight.device());
}

}  // namespace

torch::Tensor embedding_multiplier(double scale, torch::ScalarType dtype) {
  return torch::tensor(float(scale), torch::TensorOptions().dtype(torch::kFloat32)).to(dtype);
}

torch::Tensor softcap(const torch::Tensor& logits, double cap) { return torch::tanh(logits / cap) * cap; }

Gemma4AttentionImpl::Gemma4AttentionImpl(const ModelConfig& c, int64_t layer)
    : layer_(layer),
      heads_(c.num_attention_heads),
      kv_heads_(c.layer_kv_heads(layer)),
      head_dim_(c.layer_head_dim(layer)),
      source_(c.kv_source_layer(layer)),
      shared_(c.is_kv_shared(layer)),
      stores_kv_(c.stores_full_length_kv(layer)),
      geometry_(layer_geometry(c, layer)),
      eps_(c.rms_norm_eps) {
  const int64_t H = c.hidden_size;
  q_proj = register_module("q_proj", linear(H, heads_ * head_dim_));
  if (c.owns_kv_weights(layer)) {
    k_proj = register_module("k_proj", linear(H, kv_heads_ * head_dim_));
    if (c.has_v_proj(layer)) v_proj = register_module("v_proj", linear(H, kv_heads_ * head_dim_));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, eps_, true));
  }
  o_proj = register_module("o_proj", linear(heads_ * head_dim_, H));
  q_norm = register_module("q_norm", RMSNorm(head_dim_, eps_, true));
}

torch::Tensor Gemma4AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                           const kernels::TokenMetadata& meta, AttentionBackend& backend, KvStore* store) {
  const int64_t B = x.size(0), S = x.size(1);
  const RopeTables rope{cos, sin};
  auto q = q_proj(x).view({B, S, heads_, head_dim_});
  q = apply_rope(q_norm(q), rope).transpose(1, 2);

  torch::Tensor k, v;
  if (shared_ && store) {
    auto it = store->find(source_);
    TORCH_CHECK(it != store->end(), fmt::format("layer {}: K/V of source layer {} were not stored", layer_, source_));
    std::tie(k, v) = it->second;
  } else {
    auto raw_k = k_proj(x).view({B, S, kv_heads_, head_dim_});
    auto raw_v = v_proj ? v_proj(x).view({B, S, kv_heads_, head_dim_}) : raw_k;  // k_eq_v: V from the raw K
    k = apply_rope(k_norm(raw_k), rope).transpose(1, 2);
    v = rms_norm(raw_v, torch::Tensor(), eps_).transpose(1, 2);
    if (stores_kv_ && store) (*store)[layer_] = {k, v};
  }

  AttentionInputs in{q, k, v, geometry_, /*scale=*/1.0, layer_};
  auto o = backend.attend(in, meta);  // [B, Hq, S, D]
  o = o.transpose(1, 2).contiguous().reshape({B, S, heads_ * head_dim_});
  return o_proj(o);
}

Gemma4MlpImpl::Gemma4MlpImpl(int64_t hidden, int64_t intermediate) {
  gate_proj = register_module("gate_proj", linear(hidden, intermediate));
  up_proj = register_module("up_proj", linear(hidden, intermediate));
  down_proj = register_module("down_proj", linear(intermediate, hidden));
}

torch::Tensor Gemma4MlpImpl::forward(const torch::Tensor& x) { return down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)); }

Gemma4DecoderLayerImpl::Gemma4DecoderLayerImpl(const ModelConfig& c, int64_t layer) {
  const int64_t H = c.hidden_size;
  const double eps = c.rms_norm_eps;
  self_attn = register_module("self_attn", Gemma4Attention(c, layer));
  mlp = register_module("mlp", Gemma4Mlp(H, c.layer_intermediate_size(layer)));
  input_layernorm = register_module("input_layernorm", RMSNorm(H, eps, true));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(H, eps, true));
  pre_feedforward_layernorm = register_module("pre_feedforward_layernorm", RMSNorm(H, eps, true));
  post_feedforward_layernorm = register_module("post_feedforward_layernorm", RMSNorm(H, eps, true));
  if (c.has_per_layer_inputs()) {
    const int64_t P = c.hidden_size_per_layer_input;
    per_layer_input_gate = register_module("per_layer_input_gate", linear(H, P));
    per_layer_projection = register_module("per_layer_projection", linear(P, H));
    post_per_layer_input_norm = register_module("post_per_layer_input_norm", RMSNorm(H, eps, true));
  }
  layer_scalar = register_buffer("layer_scalar", torch::ones({1}));
}

torch::Tensor Gemma4DecoderLayerImpl::forward(const torch::Tensor& h_in, const torch::Tensor& cos, const torch::Tensor& sin,
                                              const torch::Tensor& per_layer_input, const kernels::TokenMetadata& meta,
                                              AttentionBackend& backend, KvStore* store) {
  auto residual = h_in;
  auto x = post_attention_layernorm(self_attn(input_layernorm(h_in), cos, sin, meta, backend, store));
  auto h = residual + x;
  residual = h;
  x = post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)));
  h = residual + x;
  if (per_layer_input_gate) {
    residual = h;
    auto g = gelu_tanh(per_layer_input_gate(h)) * per_layer_input;
    g = post_per_layer_input_norm(per_layer_projection(g));
    h = residual + g;
  }
  return h * layer_scalar;
}

Gemma4ModelImpl::Gemma4ModelImpl(const ModelConfig& c) : config_(c) {
  config_.validate("model config");
  const int64_t H = c.hidden_size, L = c.num_hidden_layers;
  embed_tokens = register_module("embed_tokens", EmbeddingTable(c.vocab_size, H));
  if (c.has_per_layer_inputs()) {
    const int64_t P = c.hidden_size_per_layer_input;
    embed_tokens_per_layer = register_module("embed_tokens_per_layer", EmbeddingTable(c.vocab_size_per_layer_input, L * P));
    per_layer_model_projection = register_module("per_layer_model_projection", linear(H, L * P));
    per_layer_projection_norm = register_module("per_layer_projection_norm", RMSNorm(P, c.rms_norm_eps, true));
  }
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < L; ++i) layers->push_back(Gemma4DecoderLayer(c, i));
  norm = register_module("norm", RMSNorm(H, c.rms_norm_eps, true));
  inv_freq_sliding_ = rope_inverse_frequencies(c.rope_sliding, c.head_dim);
  inv_freq_full_ = rope_inverse_frequencies(c.rope_full, c.global_head_dim);
}

torch::Tensor Gemma4ModelImpl::per_layer_token_inputs(const torch::Tensor& input_ids) {
  const int64_t P = config_.hidden_size_per_layer_input;
  auto tok = scaled_embedding(embed_tokens_per_layer->weight, input_ids, config_.pad_token_id.value_or(-1), std::sqrt(double(P)));
  return tok.reshape({input_ids.size(0), input_ids.size(1), config_.num_hidden_layers, P});
}

torch::Tensor Gemma4ModelImpl::project_per_layer_inputs(const torch::Tensor& h0, const torch::Tensor& token_inputs) {
  const int64_t H = config_.hidden_size, P = config_.hidden_size_per_layer_input, L = config_.num_hidden_layers;
  // Python-float scales in HF: Tensor * double, computed in fp32 opmath and rounded once.
  auto ctx = per_layer_model_projection(h0) * std::pow(double(H), -0.5);
  ctx = per_layer_projection_norm(ctx.reshape({h0.size(0), h0.size(1), L, P}));
  return (ctx + token_inputs) * std::pow(2.0, -0.5);
}

torch::Tensor Gemma4ModelImpl::forward(const ModelInputs& inputs, AttentionBackend& backend, const ForwardOptions& options) {
  const auto& c = config_;
  auto h = scaled_embedding(embed_tokens->weight, inputs.input_ids, c.pad_token_id.value_or(-1), std::sqrt(double(c.hidden_size)));
  torch::Tensor ple;
  if (c.has_per_layer_inputs()) {
    auto tok = inputs.per_layer_inputs.defined() ? inputs.per_layer_inputs : per_layer_token_inputs(inputs.input_ids);
    ple = project_per_layer_inputs(h, tok);
  }
  const auto dtype = h.scalar_type();
  const auto sliding = rope_tables(inv_freq_sliding_, inputs.position_ids, dtype);
  const auto full = rope_tables(inv_freq_full_, inputs.position_ids, dtype);

  // shared-kv-states: a fresh map every forward. cache-gated: only the holder's map, else no sharing at all.
  KvStore local_store;
  KvStore* store = nullptr;
  if (c.kv_share_semantics == KvShareSemantics::kSharedKvStates) store = &local_store;
  else if (options.holder) store = &options.holder->shared_layers;

  if (options.hidden_states) options.hidden_states->push_back(h);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const auto& rope = c.is_full(i) ? full : sliding;
    auto per_layer_input = ple.defined() ? ple.select(2, i) : torch::Tensor();
    auto* layer = layers[i]->as<Gemma4DecoderLayer>();
    if (options.checkpointing != ActivationCheckpointing::kOff && torch::GradMode::is_enabled())
      h = checkpointed_layer(options.checkpointing, *layer, i, h, rope.cos, rope.sin, per_layer_input, inputs.meta, backend,
                             store, c.is_kv_shared(i) ? c.kv_source_layer(i) : -1, c.stores_full_length_kv(i));
    else
      h = layer->forward(h, rope.cos, rope.sin, per_layer_input, inputs.meta, backend, store);
    if (options.hidden_states) options.hidden_states->push_back(h);
  }
  h = norm(h);
  if (options.final_hidden) return h;
  auto logits = torch::linear(h, embed_tokens->weight);  // tied LM head
  if (c.final_logit_softcapping) logits = softcap(logits, *c.final_logit_softcapping);
  return logits;
}

torch::Tensor shift_labels(const torch::Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(labels.dim() >= 2, "shift_labels: labels must be [B, S, ...]");
  const int64_t s = labels.size(1);
  auto out = torch::full_like(labels, ignore_index);
  if (s > 1) out.narrow(1, 0, s - 1).copy_(labels.narrow(1, 1, s - 1));
  return out;
}

TokenLoss token_loss(const torch::Tensor& logits, const torch::Tensor& shifted_labels) {
  // HF upcasts the (softcapped, D-rounded) logits to fp32; an fp64 model stays fp64.
  const auto compute = logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto flat_logits = logits.to(compute).reshape({-1, logits.size(-1)});
  auto flat_labels = shifted_labels.reshape({-1}).to(logits.device());
  auto sum = torch::nn::functional::cross_entropy(
      flat_logits, flat_labels,
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex).reduction(torch::kSum));
  return {sum, (flat_labels != kIgnoreIndex).sum().item<int64_t>()};
}

}  // namespace cpharness::model
