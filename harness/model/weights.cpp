#include "harness/model/weights.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <optional>
#include <set>

#include "harness/io/error_text.h"
#include "harness/io/input_error.h"
#include "harness/io/safetensors.h"

namespace cpharness::model {
namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// "model.language_model.x" / "model.x" / "x" -> "x"; other prefixes (vision tower, audio) stay as they are.
std::string strip_text_prefix(const std::string& name) {
  for (const char* prefix : {"model.language_model.", "language_model.model.", "model."})
    if (starts_with(name, prefix)) return name.substr(std::string(prefix).size());
  return name;
}

bool is_non_text(const std::string& stripped) {
  for (const char* p : {"vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.",
                        "vision_", "audio_"})
    if (starts_with(stripped, p)) return true;
  return false;
}

// Gemma4 ties the LM head to the embeddings; a checkpoint may still carry the head (Google's converter writes the
// same array). Its shape is checked with the header, its values on load: a head that differs is another model, which
// transformers would run untied.
constexpr const char* kTiedHead = "lm_head.weight";

}  // namespace

std::vector<TensorSpec> tensor_specs(const ModelConfig& c) {
  std::vector<TensorSpec> specs;
  const int64_t H = c.hidden_size, L = c.num_hidden_layers, P = c.hidden_size_per_layer_input;
  specs.push_back({"embed_tokens.weight", {c.vocab_size, H}});
  if (c.has_per_layer_inputs()) {
    specs.push_back({"embed_tokens_per_layer.weight", {c.vocab_size_per_layer_input, L * P}});
    specs.push_back({"per_layer_model_projection.weight", {L * P, H}});
    specs.push_back({"per_layer_projection_norm.weight", {P}});
  }
  for (int64_t i = 0; i < L; ++i) {
    const std::string l = fmt::format("layers.{}.", i);
    const int64_t hd = c.layer_head_dim(i), kv = c.layer_kv_heads(i), heads = c.num_attention_heads;
    const int64_t I = c.layer_intermediate_size(i);
    specs.push_back({l + "self_attn.q_proj.weight", {heads * hd, H}});
    if (c.owns_kv_weights(i)) {
      specs.push_back({l + "self_attn.k_proj.weight", {kv * hd, H}});
      if (c.has_v_proj(i)) specs.push_back({l + "self_attn.v_proj.weight", {kv * hd, H}});
    }
    specs.push_back({l + "self_attn.o_proj.weight", {H, heads * hd}});
    specs.push_back({l + "self_attn.q_norm.weight", {hd}});
    if (c.owns_kv_weights(i)) specs.push_back({l + "self_attn.k_norm.weight", {hd}});
    specs.push_back({l + "mlp.gate_proj.weight", {I, H}});
    specs.push_back({l + "mlp.up_proj.weight", {I, H}});
    specs.push_back({l + "mlp.down_proj.weight", {H, I}});
    for (const char* n : {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"})
      specs.push_back({l + n + ".weight", {H}});
    if (c.has_per_layer_inputs()) {
      specs.push_back({l + "per_layer_input_gate.weight", {P, H}});
      specs.push_back({l + "per_layer_projection.weight", {H, P}});
      specs.push_back({l + "post_per_layer_input_norm.weight", {H}});
    }
    specs.push_back({l + "layer_scalar", {1}, true});
  }
  specs.push_back({"norm.weight", {H}});
  return specs;
}

std::map<std::string, torch::Tensor> model_tensors(Gemma4Model& model) {
  std::map<std::string, torch::Tensor> out;
  for (auto& p : model->named_parameters()) out[p.key()] = p.value().detach();
  for (auto& b : model->named_buffers()) out[b.key()] = b.value().detach();
  return out;
}

LoadSummary check_weights(const ModelConfig& c, const std::map<std::string, io::TensorInfo>& tensors,
                          const std::string& source) {
  std::map<std::string, std::vector<int64_t>> targets;
  for (auto& spec : tensor_specs(c)) targets[spec.name] = spec.shape;
  // Names a shared layer may carry in checkpoints but never uses (Google's originals keep them). They are still
  // checked as weights (dtype, and shape where a cache-gated model would load them): kvshare's checks build that
  // model from the same checkpoint, and a bad one found only there would come after every run had trained.
  std::map<std::string, std::optional<std::vector<int64_t>>> redundant;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    if (!c.is_kv_shared(i) || c.owns_kv_weights(i)) continue;
    for (const char* n : {"k_proj.weight", "v_proj.weight", "k_norm.weight"})
      redundant[fmt::format("layers.{}.self_attn.{}", i, n)] = std::nullopt;
  }
  if (!redundant.empty()) {
    auto gated = c;
    gated.kv_share_semantics = KvShareSemantics::kCacheGated;
    for (auto& spec : tensor_specs(gated))
      if (auto r = redundant.find(spec.name); r != redundant.end()) r->second = spec.shape;
  }
  auto require_float = [&](const std::string& raw_name, torch::ScalarType t) {
    // Weights are converted to the model's dtype; only floating-point values mean the same thing after that (an
    // integer, bool or fp8 tensor is quantized or not a weight at all).
    if (t != torch::kFloat32 && t != torch::kFloat16 && t != torch::kBFloat16 && t != torch::kFloat64)
      throw io::InputError(source, raw_name, fmt::format("dtype {}: a weight must be floating point (F32, F16, BF16 or F64)", c10::toString(t)));
  };
  LoadSummary summary;
  std::vector<std::string> unknown, mismatched;
  std::set<std::string> seen;
  for (auto& [raw_name, info] : tensors) {
    const std::string name = strip_text_prefix(raw_name);
    if (is_non_text(name)) { summary.skipped_non_text.push_back(raw_name); continue; }
    if (name == kTiedHead) {
      const std::vector<int64_t> embed_shape = {c.vocab_size, c.hidden_size};
      if (info.shape != embed_shape)
        mismatched.push_back(fmt::format("{} has shape {}, the tied embeddings {}", raw_name, io::shape_text(info.shape),
                                         io::shape_text(embed_shape)));
      summary.skipped_redundant.push_back(raw_name);
      continue;
    }
    if (auto r = redundant.find(name); r != redundant.end()) {
      require_float(raw_name, info.dtype);
      if (r->second && *r->second != info.shape)
        mismatched.push_back(fmt::format("{} has shape {}, its layer's own K/V would be {}", raw_name,
                                         io::shape_text(info.shape), io::shape_text(*r->second)));
      summary.skipped_redundant.push_back(raw_name);
      continue;
    }
    auto it = targets.find(name);
    if (it == targets.end()) { unknown.push_back(raw_name); continue; }
    require_float(raw_name, info.dtype);
    if (it->second != info.shape) {
      mismatched.push_back(fmt::format("{} has shape {}, the model expects {}", raw_name, io::shape_text(info.shape), io::shape_text(it->second)));
      continue;
    }
    if (!seen.insert(name).second) throw io::InputError(source, raw_name, "tensor given twice (under two prefixes)");
    ++summary.loaded;
  }
  // Under cache-gated semantics a shared layer owns K/V weights it uses only without the share holder (5.5.0's
  // dead-K/V path); checkpoints from transformers >= 5.5.2 do not have them. As transformers does for missing
  // keys, they keep their initialisation, and the summary says so.
  std::set<std::string> own_kv_of_shared;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    if (c.is_kv_shared(i) && c.owns_kv_weights(i))
      for (const char* n : {"k_proj.weight", "v_proj.weight", "k_norm.weight"})
        own_kv_of_shared.insert(fmt::format("layers.{}.self_attn.{}", i, n));
  std::vector<std::string> missing;
  for (auto& [name, shape] : targets)
    if (!seen.count(name)) (own_kv_of_shared.count(name) ? summary.kept_init : missing).push_back(name);
  if (!mismatched.empty()) throw io::InputError(source, mismatched.front(), fmt::format("shape mismatch ({} tensors: {})", mismatched.size(), fmt::join(mismatched, "; ")));
  if (!missing.empty()) throw io::InputError(source, missing.front(), fmt::format("missing tensor ({} missing: {})", missing.size(), fmt::join(missing, ", ")));
  if (!unknown.empty()) throw io::InputError(source, unknown.front(), fmt::format("unknown tensor ({} unknown: {})", unknown.size(), fmt::join(unknown, ", ")));
  return summary;
}

LoadSummary check_weights(const ModelConfig& c, const std::map<std::string, torch::Tensor>& tensors,
                          const std::string& source) {
  std::map<std::string, io::TensorInfo> infos;
  for (auto& [name, t] : tensors) infos[name] = io::TensorInfo{t.scalar_type(), t.sizes().vec()};
  return check_weights(c, infos, source);
}

LoadSummary load_weights(Gemma4Model& model, const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
  const LoadSummary summary = check_weights(model->config(), tensors, source);
  auto targets = model_tensors(model);
  torch::NoGradGuard no_grad;
  // A NaN or Inf weight is bad input, not a CP bug: every run would "fail" on it, naming the wrong culprit. Checked
  // on every tensor the model or a check may read (the loaded ones, the tied head, a shared layer's unused K/V),
  // before the head is compared with the embeddings (a NaN there is the NaN, not a difference).
  const std::set<std::string> kept_aside(summary.skipped_redundant.begin(), summary.skipped_redundant.end());
  for (auto& [raw_name, tensor] : tensors) {
    auto it = targets.find(strip_text_prefix(raw_name));
    const bool loaded = it != targets.end() && it->second.sizes() == tensor.sizes();
    if (!loaded && !kept_aside.count(raw_name)) continue;
    const auto finite = torch::isfinite(tensor);
    if (!finite.all().item<bool>()) {
      const int64_t at = (~finite).flatten().nonzero()[0].item<int64_t>();
      throw io::InputError(source, raw_name, fmt::format("holds NaN or Inf (first at flat index {} of {})", at, tensor.numel()));
    }
  }
  const torch::Tensor* head = nullptr;
  const torch::Tensor* embed = nullptr;
  std::string head_name;
  for (auto& [raw_name, tensor] : tensors) {
    const auto name = strip_text_prefix(raw_name);
    if (name == kTiedHead) head = &tensor, head_name = raw_name;
    if (name == "embed_tokens.weight") embed = &tensor;
  }
  // (In their own dtype when they share one: a real vocabulary's head is gigabytes in fp64.)
  const bool same_head = !head || !embed ||
                         (head->scalar_type() == embed->scalar_type()
                              ? torch::equal(*head, *embed)
                              : torch::equal(head->to(torch::kFloat64), embed->to(torch::kFloat64)));
  if (!same_head) {
    const auto e64 = embed->to(torch::kFloat64);
    const double diff = (head->to(torch::kFloat64) - e64).norm().item<double>() / std::max(e64.norm().item<double>(), 1e-300);
    throw io::InputError(source, head_name, fmt::format("differs from embed_tokens.weight (relative L2 {:.3g}): Gemma4 "
                                                        "ties the LM head to the embeddings (transformers would run "
                                                        "this head untied)", diff));
  }
  for (auto& [raw_name, tensor] : tensors) {
    auto it = targets.find(strip_text_prefix(raw_name));
    if (it == targets.end() || it->second.sizes() != tensor.sizes()) continue;  // skipped above (non-text, redundant)
    it->second.copy_(tensor.to(it->second.scalar_type()));
  }
  return summary;
}

}  // namespace cpharness::model

#include "harness/io/hdf5_tensors.h"
#include "harness/io/safetensors.h"

namespace cpharness::model {

LoadSummary load_checkpoint(Gemma4Model& model, const std::string& path) {
  check_checkpoint(model->config(), path);  // before a byte of data is read
  return load_weights(model, io::read_safetensors_checkpoint(path), path);
}

LoadSummary check_checkpoint(const ModelConfig& config, const std::string& path) {
  const auto info = io::read_safetensors_checkpoint_info(path);
  return check_weights(config, info.tensors, info.file);
}

void save_weights_hdf5(Gemma4Model& model, const std::string& path) {
  io::TensorMap tensors;
  for (auto& [name, t] : model_tensors(model)) tensors["weights/" + name] = t;
  io::write_hdf5(path, tensors, {{"/", {{"config", model->config().to_json().dump()}}}});
}

LoadSummary load_weights_hdf5(Gemma4Model& model, const std::string& path) {
  std::map<std::string, torch::Tensor> tensors;
  for (auto& [full_name, t] : io::read_hdf5(path, "/weights")) {
    std::string name = full_name;
    for (const std::string prefix : {"/", "weights/"})
      if (starts_with(name, prefix)) name = name.substr(prefix.size());
    tensors[name] = t;
  }
  return load_weights(model, tensors, path);
}

std::map<std::string, torch::Tensor> gradient_copies(Gemma4Model& model, torch::ScalarType dtype) {
  std::map<std::string, torch::Tensor> out;
  for (auto& p : model->named_parameters())
    out[p.key()] = p.value().grad().defined() ? p.value().grad().detach().to(torch::kCPU, dtype).clone()
                                              : torch::zeros(p.value().sizes(), torch::TensorOptions().dtype(dtype));
  return out;
}

std::map<std::string, torch::Tensor> parameter_copies(Gemma4Model& model, torch::ScalarType dtype) {
  std::map<std::string, torch::Tensor> out;
  for (auto& p : model->named_parameters()) out[p.key()] = p.value().detach().to(torch::kCPU, dtype).clone();
  return out;
}

Gemma4Model model_sharing_weights(Gemma4Model& source) {
  Gemma4Model m(source->config());
  torch::NoGradGuard no_grad;
  // set_data swaps the storage under each leaf and frees the fresh initialisation; the leaf, and so its .grad(),
  // stays the new model's own.
  auto own = [](const torch::OrderedDict<std::string, torch::Tensor>& mine,
                const torch::OrderedDict<std::string, torch::Tensor>& theirs, const char* what) {
    if (mine.size() != theirs.size()) throw std::logic_error(fmt::format("model_sharing_weights: {} counts differ", what));
    for (auto& item : mine) {
      const auto* src = theirs.find(item.key());
      if (!src || src->sizes() != item.value().sizes())
        throw std::logic_error(fmt::format("model_sharing_weights: {} '{}' has no match in the source", what, item.key()));
      item.value().set_data(*src);
    }
  };
  own(m->named_parameters(), source->named_parameters(), "parameter");
  own(m->named_buffers(), source->named_buffers(), "buffer");
  return m;
}

}  // namespace cpharness::model
