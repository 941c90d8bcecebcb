#include "harness/report/hf_golden.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "harness/io/error_text.h"
#include "harness/io/json_input.h"
#include "harness/io/input_error.h"
#include "harness/model/gemma4.h"
#include "harness/model/weights.h"
#include "harness/train/batch.h"

#include <limits>
#include <optional>
#include <regex>

namespace cpharness::report {
namespace {

using io::InputError;

std::string prov(const report::RunDump& d, const std::string& key) {
  auto it = d.provenance.find(key);
  return it == d.provenance.end() ? std::string() : it->second;
}

// An input of the export as `dtype`: stored as integers (bool too, for padding), never as floats a cast would
// truncate, and [batch, seq] with at least one row and one token.
torch::Tensor need_input(const HfGolden& g, const std::string& name, torch::ScalarType dtype) {
  auto it = g.dump.inputs.find(name);
  if (it == g.dump.inputs.end()) throw InputError(g.path, "inputs/" + name, "missing");
  auto t = it->second;
  if (t.dim() != 2) throw InputError(g.path, "inputs/" + name, fmt::format("expected [batch, seq], got {} dims", t.dim()));
  if (t.size(0) < 1 || t.size(1) < 1)
    throw InputError(g.path, "inputs/" + name, fmt::format("empty: shape [{}, {}]", t.size(0), t.size(1)));
  if (at::isFloatingType(t.scalar_type()) || at::isComplexType(t.scalar_type()))
    throw InputError(g.path, "inputs/" + name, fmt::format("stored as {}: token data must be integers", c10::toString(t.scalar_type())));
  if (dtype == torch::kBool && t.scalar_type() != torch::kBool && ((t != 0) & (t != 1)).any().item<bool>())
    throw InputError(g.path, "inputs/" + name, "holds values other than 0 and 1");
  return t.to(dtype).contiguous();
}

// Every element of `t` in [lo, hi), or equal to `also` (the ignore index of labels).
void require_range(const HfGolden& g, const std::string& name, const torch::Tensor& t, int64_t lo, int64_t hi,
                   std::optional<int64_t> also = std::nullopt) {
  auto bad = (t < lo) | (t >= hi);
  if (also) bad = bad & (t != *also);
  if (!bad.any().item<bool>()) return;
  const int64_t at = bad.flatten().nonzero()[0].item<int64_t>();
  throw InputError(g.path, "inputs/" + name,
                   fmt::format("value {} at flat index {} is outside [{}, {}){}", t.flatten()[at].item<int64_t>(), at, lo,
                               hi, also ? fmt::format(" (and is not {})", *also) : ""));
}

// MAJOR.MINOR of a transformers version ("5.6.2", "5.13.0.dev0", "5.25.0rc1"); none when it does not read as one.
std::optional<std::pair<int, int>> major_minor(const std::string& text) {
  static const std::regex version(R"(^(\d{1,4})\.(\d{1,4})(\.\d{1,6})?([.+-]?[A-Za-z0-9.+-]*)?$)");
  std::smatch m;
  if (!std::regex_match(text, m, version)) return std::nullopt;
  return std::make_pair(std::stoi(m[1].str()), std::stoi(m[2].str()));
}

// The vision-group rule a transformers version builds (model::VisionMask): 5.5 .. 5.8 OR a group after the sliding
// window; 5.9 .. 5.12 (create_masks_for_generate with block_sequence_ids) do so and open it on full-attention layers
// too; 5.13 on (create_masks_for_vision_model) OR it with causal inside the window only. None for a text that does
// not read as a version.
std::optional<model::VisionMask> version_vision_mask(const std::string& version) {
  const auto v = major_minor(version);
  if (!v) return std::nullopt;
  if (v->first != 5 || v->second >= 13) return model::VisionMask::kGroupInsideWindow;
  return v->second >= 9 ? model::VisionMask::kGroupOnEveryLayer : model::VisionMask::kGroupPastWindow;
}

bool has_vision_groups(const HfGolden& g) {
  const auto& groups = g.batch.meta.vision_group_ids;
  return g.config.use_bidirectional_attention == "vision" && groups.defined() && (groups >= 0).any().item<bool>();
}

// Which vision-group rule the export's masks followed: its provenance hf_vision_mask, else (exports that predate
// the attribute) its transformers version's. A version that does not read as MAJOR.MINOR[.PATCH][suffix] decides
// nothing: guessing a rule would run another mask than the export's.
model::VisionMask export_vision_mask(const HfGolden& g) {
  const auto stated = prov(g.dump, "hf_vision_mask");
  if (!stated.empty()) return model::vision_mask_from_string(stated, g.path, "provenance/hf_vision_mask");
  if (const auto rule = version_vision_mask(g.transformers_version)) return *rule;
  throw InputError(g.path, "provenance/transformers_version",
                   fmt::format("'{}' is not a transformers version (MAJOR.MINOR[.PATCH]), and with vision groups and no "
                               "provenance/hf_vision_mask the version decides which vision-group rule the export's "
                               "masks followed: give the version, or hf_vision_mask (group_inside_window, "
                               "group_past_window or group_on_every_layer)",
                               io::clip(g.transformers_version, 64)));
}

// The exporter once labelled its exports of transformers 5.9 .. 5.12 group_past_window and built 5.5 .. 5.8's masks
// for them, which are not what those versions compute (they open a group on full-attention layers too). Such a file
// whose batch has a vision group is refused rather than passed as parity with a version it does not reproduce.
void refuse_masks_other_than_the_versions(const HfGolden& g) {
  if (!has_vision_groups(g) || g.config.vision_mask != model::VisionMask::kGroupPastWindow) return;
  if (version_vision_mask(g.transformers_version) != model::VisionMask::kGroupOnEveryLayer) return;
  throw InputError(g.path, "provenance/hf_vision_mask",
                   fmt::format("group_past_window, but transformers {} also makes full-attention layers bidirectional "
                               "inside a vision group (group_on_every_layer), and this batch has vision groups: the "
                               "export's masks are not that version's; export it again with golden/export_hf.py",
                               io::clip(g.transformers_version, 64)));
}

// The config keys an export must give: those that decide the model's numerics. transformers writes every one of them
// (config.to_dict(), to_json_string(), save_pretrained, and export_hf.py's copy of the harness's own config), and
// a class default filled in for one left out may not be the exporting version's: a file without one is not read
// as some model it may not be. global_head_dim and num_global_key_value_heads may instead be per_layer_config's
// (5.15 on folds them into it).
void require_numerics_keys(const nlohmann::json& text, const std::string& path, const std::string& prefix) {
  static const char* const kRequired[] = {
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "layer_types", "sliding_window", "rope_parameters", "rms_norm_eps",
      "final_logit_softcapping", "hidden_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp",
      "attention_k_eq_v", "use_bidirectional_attention"};
  auto missing = [&](const std::string& key) {
    return InputError(path, "provenance/config." + prefix + key,
                      "missing: an export's config gives every key that decides the model (transformers writes them "
                      "all; a default filled in here may not be the exporting version's): write config.to_dict()");
  };
  for (const char* key : kRequired)
    if (!text.contains(key)) throw missing(key);
  const bool per_layer = text.contains("per_layer_config");
  if (!per_layer && !text.contains("global_head_dim")) throw missing("global_head_dim");
  const bool k_eq_v = text["attention_k_eq_v"].is_boolean() && text["attention_k_eq_v"].get<bool>();
  if (!per_layer && k_eq_v && !text.contains("num_global_key_value_heads")) throw missing("num_global_key_value_heads");
  const auto& ple = text["hidden_size_per_layer_input"];
  if (ple.is_number() && ple.get<double>() > 0 && !text.contains("vocab_size_per_layer_input"))
    throw missing("vocab_size_per_layer_input");
}

}  // namespace

bool HfGolden::hf_shared_kv() const {
  return config.kv_share_semantics != model::KvShareSemantics::kCacheGated || hf_use_cache;
}

std::string HfGolden::id() const {
  const std::string base = prov(dump, "case_id");
  return hf_shared_kv() ? base : base + "-no-cache";
}

HfGolden load_hf_golden(const std::string& path) {
  HfGolden g;
  g.path = path;
  g.dump = read_run_dump(path);
  const auto kind = prov(g.dump, "kind");
  if (kind != kKindHfExport)
    throw InputError(path, "provenance/kind", fmt::format("'{}', not an export from transformers (hf-export)", kind));
  const auto config_text = prov(g.dump, "config");
  if (config_text.empty()) throw InputError(path, "provenance/config", "missing: the model configuration (JSON)");
  const auto cj = io::parse_input_json(config_text, path, "provenance/config", "provenance/config: ");
  if (cj.is_object()) {
    const bool nested = cj.contains("text_config") && cj["text_config"].is_object();
    require_numerics_keys(nested ? cj["text_config"] : cj, path, nested ? "text_config." : "");
  }
  g.config = model::config_from_hf_json(cj, path + ": provenance/config");
  g.mechanism = prov(g.dump, "kv_share_mechanism");
  if (g.mechanism == "cache-shared-layers") g.config.kv_share_semantics = model::KvShareSemantics::kCacheGated;
  else if (g.mechanism == "shared-kv-states-by-index" || g.mechanism == "shared-kv-states-by-type")
    g.config.kv_share_semantics = model::KvShareSemantics::kSharedKvStates;
  else
    throw InputError(path, "provenance/kv_share_mechanism",
                     fmt::format("'{}': expected cache-shared-layers, shared-kv-states-by-index or shared-kv-states-by-type",
                                 g.mechanism));
  g.transformers_version = prov(g.dump, "transformers_version");
  if (g.config.use_bidirectional_attention == "vision") g.config.vision_mask = export_vision_mask(g);
  const auto use_cache = prov(g.dump, "hf_use_cache");
  if (!use_cache.empty() && use_cache != "true" && use_cache != "false")
    throw InputError(path, "provenance/hf_use_cache", fmt::format("'{}': expected true or false", use_cache));
  g.hf_use_cache = use_cache != "false";
  if (prov(g.dump, "dtype") != "fp32")
    throw InputError(path, "provenance/dtype", fmt::format("'{}': hf.parity judges fp32 exports", prov(g.dump, "dtype")));
  if (g.dump.weights.empty()) throw InputError(path, "weights", "missing: hf.parity loads the model from the golden");
  {
    // Every weight of the model comes from the export. The one absence a checkpoint may have (a cache-gated
    // version's shared layers' own K/V, which newer versions do not save) is no absence here: the exporting
    // version built them and its export holds them, and its no-cache run computes with them.
    const auto loaded = model::check_weights(g.config, g.dump.weights, path);
    if (!loaded.kept_init.empty())
      throw InputError(path, "weights/" + loaded.kept_init.front(),
                       fmt::format("missing ({} of the shared layers' own K/V weights are): transformers {} builds "
                                   "them (cache-gated KV sharing), so its export holds them, and without the cache "
                                   "its shared layers compute with them",
                                   loaded.kept_init.size(), g.transformers_version.empty() ? "(version not given)"
                                                                                           : io::clip(g.transformers_version, 64)));
  }
  if (!g.dump.steps.count(0)) throw InputError(path, "steps/0", "missing");
  const auto& s0 = g.dump.steps.at(0);
  if (!s0.logits.defined()) throw InputError(path, "steps/0/logits", "missing");
  if (s0.grads.empty()) throw InputError(path, "steps/0/grads", "missing");

  g.batch.input_ids = need_input(g, "input_ids", torch::kInt64);
  g.batch.labels = need_input(g, "labels", torch::kInt64);
  g.batch.position_ids = need_input(g, "position_ids", torch::kInt64);
  if (g.dump.inputs.count("document_ids")) g.batch.meta.document_ids = need_input(g, "document_ids", torch::kInt64);
  if (g.dump.inputs.count("padding")) g.batch.meta.padding = need_input(g, "padding", torch::kBool);
  if (g.dump.inputs.count("vision_group_ids")) {
    g.batch.meta.vision_group_ids = need_input(g, "vision_group_ids", torch::kInt64);
    if (auto why = train::vision_groups_problem(g.batch.meta.vision_group_ids))
      throw InputError(path, "inputs/vision_group_ids", *why + ": these are not transformers' masks");
  }
  refuse_masks_other_than_the_versions(g);
  const auto shape = g.batch.input_ids.sizes().vec();
  if (g.batch.position_ids.sizes().vec() != shape) throw InputError(path, "inputs/position_ids", "shape differs from input_ids");
  if (!g.batch.meta.document_ids.defined() && shape.size() == 2 && shape[1] > 0) {
    // Rows packed the way transformers packs them: documents given only by position ids restarting. Transformers
    // splits them into documents itself only when it gets no attention mask and no cache (masking_utils:
    // `attention_mask is None and past_key_values is None`); with either it attends across the restarts. So the
    // documents are derived exactly when the export had neither (no padding marked, use_cache=False), and a file
    // whose real tokens restart under a mask or a cache says two things at once: refused, never guessed.
    // Restarts inside the padding alone (HF's left-padding positions) are harmless.
    const auto derived = train::document_ids_from_positions(g.batch.position_ids);
    const bool padded = g.batch.meta.padding.defined() && g.batch.meta.padding.any().item<bool>();
    bool restarts = derived.max().item<int64_t>() > 1;
    if (padded) {
      const auto& pad = g.batch.meta.padding;
      const auto lo = derived.masked_fill(pad, std::numeric_limits<int64_t>::max()).amin(1);
      const auto hi = derived.masked_fill(pad, -1).amax(1);
      restarts = (hi > lo).logical_and(hi >= 0).any().item<bool>();
    }
    if (restarts && (padded || g.hf_use_cache))
      throw InputError(path, "inputs/document_ids",
                       fmt::format("missing, while position_ids restart among the real tokens of a row and the export "
                                   "had {}: transformers splits packed documents at position restarts only with no "
                                   "attention mask and no cache, so the documents are ambiguous; write "
                                   "/inputs/document_ids",
                                   padded ? "an attention mask (inputs/padding marks padding)"
                                          : "a cache (provenance hf_use_cache is not \"false\")"));
    if (restarts) {
      g.batch.meta.document_ids = derived;
      g.document_ids_from_positions = true;
    }
  }
  for (auto* t : {&g.batch.labels, &g.batch.position_ids, &g.batch.meta.document_ids, &g.batch.meta.padding,
                  &g.batch.meta.vision_group_ids})
    if (t->defined() && t->sizes().vec() != shape) throw InputError(path, "inputs", "inputs disagree in shape with input_ids");
  // Token ids index the embedding and the loss's classes: out of range they are bad input, not a model failure.
  require_range(g, "input_ids", g.batch.input_ids, 0, g.config.vocab_size);
  require_range(g, "labels", g.batch.labels, 0, g.config.vocab_size, model::kIgnoreIndex);
  // Positions of real tokens index RoPE; a padding position is never attended (exporters write 1, 0 or -1 there).
  const auto& pad = g.batch.meta.padding;
  require_range(g, "position_ids", pad.defined() ? g.batch.position_ids.masked_fill(pad, 0) : g.batch.position_ids, 0,
                std::numeric_limits<int32_t>::max());
  if (!(model::shift_labels(g.batch.labels) != model::kIgnoreIndex).any().item<bool>())
    throw InputError(path, "inputs/labels", "no token has a target (every shifted label is the ignore index): no loss to compare");
  const auto lshape = s0.logits.sizes().vec();
  if (lshape != std::vector<int64_t>{shape[0], shape[1], g.config.vocab_size})
    throw InputError(path, "steps/0/logits", fmt::format("shape [{}] does not match [batch, seq, vocab]", fmt::join(lshape, ", ")));
  return g;
}

}  // namespace cpharness::report
