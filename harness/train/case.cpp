#include "harness/train/case.h"

#include "harness/model/gemma4.h"
#include "harness/model/weights.h"

#include "harness/train/check_names.h"
#include "harness/train/device.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <filesystem>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>

#include "harness/io/input_error.h"
#include "harness/io/json_input.h"
#include "harness/io/paths.h"

namespace cpharness::train {
namespace {

using nlohmann::json;
using io::InputError;

void reject_unknown(const json& j, const std::set<std::string>& known, const std::string& path, const std::string& prefix) {
  for (auto& [key, value] : j.items())
    if (!known.count(key)) throw InputError(path, prefix + key, "unknown key");
}

const json& object_at(const json& j, const std::string& key, const std::string& path, const std::string& field) {
  if (!j.at(key).is_object()) throw InputError(path, field, "wrong type: expected an object");
  return j.at(key);
}

int64_t int_value(const json& v, const std::string& path, const std::string& field, int64_t min_value) {
  if (!v.is_number_integer()) throw InputError(path, field, fmt::format("wrong type: expected an integer, got {}", v.type_name()));
  const int64_t x = io::json_int64(v, path, field);
  if (x < min_value) throw InputError(path, field, fmt::format("must be >= {}, got {}", min_value, x));
  return x;
}

// A seed: any integer in [0, 2^64) (JSON integers past 2^63 arrive unsigned).
uint64_t seed_at(const json& j, const std::string& key, const std::string& path, const std::string& field) {
  const json& v = j.at(key);
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (!v.is_number_integer()) throw InputError(path, field, fmt::format("wrong type: expected an integer, got {}", v.type_name()));
  if (v.get<int64_t>() < 0) throw InputError(path, field, fmt::format("must be in [0, 2^64), got {}", v.get<int64_t>()));
  return uint64_t(v.get<int64_t>());
}

int64_t int_at(const json& j, const std::string& key, const std::string& path, const std::string& field, int64_t min_value) {
  return int_value(j.at(key), path, field, min_value);
}

double number_at(const json& j, const std::string& key, const std::string& path, const std::string& field) {
  if (!j.at(key).is_number()) throw InputError(path, field, "wrong type: expected a number");
  return j.at(key).get<double>();
}

bool bool_at(const json& j, const std::string& key, const std::string& path, const std::string& field) {
  if (!j.at(key).is_boolean()) throw InputError(path, field, "wrong type: expected a boolean");
  return j.at(key).get<bool>();
}

std::string string_at(const json& j, const std::string& key, const std::string& path, const std::string& field) {
  if (!j.at(key).is_string()) throw InputError(path, field, "wrong type: expected a string");
  return j.at(key).get<std::string>();
}

std::vector<int64_t> ints_at(const json& j, const std::string& key, const std::string& path, const std::string& field, int64_t min_value) {
  if (!j.at(key).is_array()) throw InputError(path, field, "wrong type: expected an array of integers");
  std::vector<int64_t> out;
  for (size_t i = 0; i < j.at(key).size(); ++i) out.push_back(int_value(j.at(key)[i], path, fmt::format("{}[{}]", field, i), min_value));
  return out;
}

}  // namespace

torch::ScalarType lane_dtype(DtypeLane lane) {
  switch (lane) {
    case DtypeLane::kBf16: return torch::kBFloat16;
    case DtypeLane::kFp64: return torch::kFloat64;
    case DtypeLane::kFp32: return torch::kFloat32;
  }
  throw std::logic_error("lane_dtype: unknown lane");
}

Batch batch_for_step(const Case& c, int64_t step) {
  BatchSpec spec = c.data;
  spec.seed = c.data.seed + uint64_t(step);
  auto rotate = [step](std::vector<int64_t>& docs) {
    if (docs.size() < 2) return;
    std::rotate(docs.begin(), docs.begin() + ptrdiff_t(size_t(step) % docs.size()), docs.end());
  };
  rotate(spec.layout.document_lengths);
  for (auto& row : spec.rows) rotate(row.document_lengths);
  return make_batch(spec);
}

std::vector<Batch> micro_batches_for_step(const Case& c, int64_t step) {
  const auto whole = batch_for_step(c, step);
  if (c.micro_batches <= 1) return {whole};
  const int64_t rows = c.data.batch / c.micro_batches;  // validated: micro_batches divides data.batch
  auto cut = [&](const torch::Tensor& t, int64_t m) { return t.defined() ? t.narrow(0, m * rows, rows).contiguous() : t; };
  std::vector<Batch> out;
  for (int64_t m = 0; m < c.micro_batches; ++m)
    out.push_back({cut(whole.input_ids, m), cut(whole.labels, m), cut(whole.position_ids, m),
                   {cut(whole.meta.document_ids, m), cut(whole.meta.padding, m), cut(whole.meta.vision_group_ids, m)}});
  return out;
}

std::string to_string(DtypeLane lane) { return lane == DtypeLane::kBf16 ? "bf16" : lane == DtypeLane::kFp64 ? "fp64" : "fp32"; }

namespace {

void read_weights(const json& j, const std::string& path, Case& c) {
  const json& w = object_at(j, "weights", path, "weights");
  reject_unknown(w, {"init_seed", "checkpoint"}, path, "weights.");
  if (w.contains("init_seed") && w.contains("checkpoint"))  // the seed would be ignored: two sources, one used
    throw InputError(path, "weights", "give init_seed or checkpoint, not both (a checkpoint's weights ignore the seed)");
  if (w.contains("init_seed")) c.init_seed = seed_at(w, "init_seed", path, "weights.init_seed");
  if (w.contains("checkpoint")) {
    const auto named = string_at(w, "checkpoint", path, "weights.checkpoint");
    if (named.empty()) throw InputError(path, "weights.checkpoint", "empty path (leave the key out for the seeded init)");
    c.checkpoint = io::resolve_beside(path, named);
  }
}

// A row layout's keys (data.document_lengths / padding / vision_runs, or those of data.rows[b]); keys left out keep
// `layout`'s values. `prefix` names the object in errors ("data." or "data.rows[1].").
void read_layout(const json& d, const std::string& path, const std::string& prefix, int64_t seq_len, RowLayout& layout) {
  if (d.contains("padding")) {
    layout.padding = int_at(d, "padding", path, prefix + "padding", 0);
    if (layout.padding > seq_len)
      throw InputError(path, prefix + "padding", fmt::format("{} is longer than seq_len {}", layout.padding, seq_len));
  }
  if (d.contains("document_lengths")) {
    layout.document_lengths = ints_at(d, "document_lengths", path, prefix + "document_lengths", 1);
    if (layout.document_lengths.empty())  // says nothing; one document is said by leaving the key out
      throw InputError(path, prefix + "document_lengths", "empty: list the lengths (summing to seq_len - padding), or leave the key out for one document");
    for (size_t i = 0; i < layout.document_lengths.size(); ++i)
      if (layout.document_lengths[i] > seq_len)  // so that their sum cannot overflow
        throw InputError(path, fmt::format("{}document_lengths[{}]", prefix, i),
                         fmt::format("{} is longer than seq_len {}", layout.document_lengths[i], seq_len));
  }
  if (d.contains("vision_runs")) {
    const std::string key = prefix + "vision_runs";
    if (!d["vision_runs"].is_array()) throw InputError(path, key, "wrong type: expected an array of [start, length]");
    layout.vision_runs.clear();
    for (size_t i = 0; i < d["vision_runs"].size(); ++i) {
      const json& r = d["vision_runs"][i];
      const std::string field = fmt::format("{}[{}]", key, i);
      if (!r.is_array() || r.size() != 2 || !r[0].is_number_integer() || !r[1].is_number_integer())
        throw InputError(path, field, "expected [start, length]");
      const int64_t start = int_value(r[0], path, field + "[0]", std::numeric_limits<int64_t>::min());
      const int64_t length = int_value(r[1], path, field + "[1]", std::numeric_limits<int64_t>::min());
      if (start < 0 || length < 1 || start > seq_len || length > seq_len)  // (so start + length cannot overflow)
        throw InputError(path, field, fmt::format("[{}, {}]: start must be in [0, seq_len {}] and length in [1, seq_len]",
                                                  start, length, seq_len));
      layout.vision_runs.push_back({start, length});
    }
    // Transformers derives groups from contiguous vision tokens (train::vision_groups_problem): runs that touch or
    // overlap would be one group there, so the harness would judge masks no version computes.
    std::vector<size_t> by_start(layout.vision_runs.size());
    std::iota(by_start.begin(), by_start.end(), size_t(0));
    const auto& runs = layout.vision_runs;
    std::stable_sort(by_start.begin(), by_start.end(), [&](size_t x, size_t y) { return runs[x].start < runs[y].start; });
    for (size_t n = 1; n < by_start.size(); ++n) {
      const auto &a = runs[by_start[n - 1]], &b = runs[by_start[n]];
      if (a.start + a.length >= b.start)
        throw InputError(path, fmt::format("{}[{}]", key, by_start[n]),
                         fmt::format("[{}, {}] {} {}[{}] [{}, {}]: transformers derives vision groups from "
                                     "contiguous vision tokens, so they would be one group (write them as one run)",
                                     b.start, b.length, a.start + a.length > b.start ? "overlaps" : "touches", key,
                                     by_start[n - 1], a.start, a.length));
    }
  }
}

void read_data(const json& j, const std::string& path, Case& c) {
  const json& d = object_at(j, "data", path, "data");
  reject_unknown(d, {"batch", "seq_len", "document_lengths", "padding", "vision_runs", "rows", "seed"}, path, "data.");
  if (!d.contains("seq_len")) throw InputError(path, "data.seq_len", "missing required key");
  c.data.seq_len = int_at(d, "seq_len", path, "data.seq_len", 2);
  if (d.contains("batch")) c.data.batch = int_at(d, "batch", path, "data.batch", 1);
  if (d.contains("seed")) c.data.seed = seed_at(d, "seed", path, "data.seed");
  // Limits checked before the batch is made (it is allocated here): far above any CP recipe (the longest is 64k
  // tokens), so only a size no machine can hold is refused.
  if (c.data.seq_len > kMaxSeqLen)
    throw InputError(path, "data.seq_len", fmt::format("{} is more than this harness allows ({} tokens)", c.data.seq_len, kMaxSeqLen));
  if (c.data.batch > kMaxBatch)
    throw InputError(path, "data.batch", fmt::format("{} is more than this harness allows ({})", c.data.batch, kMaxBatch));
  if (c.data.batch * c.data.seq_len > kMaxTokens)
    throw InputError(path, "data", fmt::format("batch x seq_len = {} tokens is more than this harness allows ({})",
                                               c.data.batch * c.data.seq_len, kMaxTokens));
  read_layout(d, path, "data.", c.data.seq_len, c.data.layout);
  if (d.contains("rows")) {
    // One object per row; each key it leaves out is the shared layout's.
    const json& rows = d["rows"];
    if (!rows.is_array()) throw InputError(path, "data.rows", "wrong type: expected an array of row layouts, one per row");
    if (int64_t(rows.size()) != c.data.batch)
      throw InputError(path, "data.rows", fmt::format("{} row layouts for data.batch {} rows: give one per row",
                                                      rows.size(), c.data.batch));
    for (size_t b = 0; b < rows.size(); ++b) {
      const std::string prefix = fmt::format("data.rows[{}].", b);
      if (!rows[b].is_object())
        throw InputError(path, fmt::format("data.rows[{}]", b), "wrong type: expected an object with document_lengths, padding, vision_runs");
      reject_unknown(rows[b], {"document_lengths", "padding", "vision_runs"}, path, prefix);
      RowLayout row = c.data.layout;
      read_layout(rows[b], path, prefix, c.data.seq_len, row);
      c.data.rows.push_back(std::move(row));
    }
  }
  c.data.vocab_size = c.model.vocab_size;
  Batch batch;
  try {
    batch = make_batch(c.data);  // validates lengths, padding and runs against each other
  } catch (const InputError& e) {  // e names the layout's own key ("rows[1].document_lengths")
    throw InputError(path, "data." + e.subject(), e.reason());
  }
  // Every step's batch has the same documents and padding (only their order and tokens change): without a single
  // target there is no loss to train, and every check would judge zeros.
  if (!(model::shift_labels(batch.labels) != model::kIgnoreIndex).any().item<bool>())
    throw InputError(path, "data", "no token has a target (all padding or one-token documents): no loss to train on");
}

DtypeLane read_lane(const json& j, const std::string& path) {
  const auto lane = string_at(j, "dtype", path, "dtype");
  if (lane == "fp32") return DtypeLane::kFp32;
  if (lane == "bf16") return DtypeLane::kBf16;
  if (lane == "fp64") return DtypeLane::kFp64;
  throw InputError(path, "dtype", "expected \"fp32\", \"bf16\" or \"fp64\", got \"" + lane + "\"");
}

void read_optimizer(const json& j, const std::string& path, Case& c) {
  const json& o = object_at(j, "optimizer", path, "optimizer");
  reject_unknown(o, {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"}, path, "optimizer.");
  if (o.contains("max_grad_norm")) {
    c.optimizer.max_grad_norm = number_at(o, "max_grad_norm", path, "optimizer.max_grad_norm");
    if (!(c.optimizer.max_grad_norm > 0))
      throw InputError(path, "optimizer.max_grad_norm", "must be > 0 (leave it out for no clipping)");
  }
  if (o.contains("lr")) c.optimizer.lr = number_at(o, "lr", path, "optimizer.lr");
  if (o.contains("beta1")) c.optimizer.beta1 = number_at(o, "beta1", path, "optimizer.beta1");
  if (o.contains("beta2")) c.optimizer.beta2 = number_at(o, "beta2", path, "optimizer.beta2");
  if (o.contains("eps")) c.optimizer.eps = number_at(o, "eps", path, "optimizer.eps");
  if (o.contains("weight_decay")) c.optimizer.weight_decay = number_at(o, "weight_decay", path, "optimizer.weight_decay");
  // What AdamW accepts and what keeps every update finite; checked here, not by the optimizer mid-run.
  auto need = [&](bool ok, const char* field, double v, const char* range) {
    if (!ok) throw InputError(path, std::string("optimizer.") + field, fmt::format("must be {}, got {}", range, v));
  };
  const auto& opt = c.optimizer;
  need(std::isfinite(opt.lr) && opt.lr >= 0, "lr", opt.lr, "finite and >= 0");
  need(opt.beta1 >= 0 && opt.beta1 < 1, "beta1", opt.beta1, "in [0, 1)");
  need(opt.beta2 >= 0 && opt.beta2 < 1, "beta2", opt.beta2, "in [0, 1)");
  need(std::isfinite(opt.eps) && opt.eps > 0, "eps", opt.eps, "finite and > 0");
  need(std::isfinite(opt.weight_decay) && opt.weight_decay >= 0, "weight_decay", opt.weight_decay, "finite and >= 0");
  // AdamW's first step size, lr / (1 - beta1), is a scalar of the weights' dtype: past fp32's range libtorch
  // refuses it mid-run.
  const double step = opt.lr / (1 - opt.beta1);
  need(step <= double(std::numeric_limits<float>::max()), "lr", opt.lr, "such that lr / (1 - beta1) fits fp32");
}

void read_requires(const json& j, const std::string& path, Case& c) {
  if (!j["requires"].is_array()) throw InputError(path, "requires", "wrong type: expected an array of strings");
  for (auto& r : j["requires"]) {
    if (!r.is_string() || r != "cuda") throw InputError(path, "requires", "known requirements: \"cuda\"");
    c.requires_features.push_back(r.get<std::string>());
  }
}

void read_checks(const json& j, const std::string& path, Case& c) {
  if (!j["checks"].is_array()) throw InputError(path, "checks", "wrong type: expected an array of check names");
  if (j["checks"].empty()) throw InputError(path, "checks", "empty: it would select no check (leave the key out for every check)");
  for (size_t i = 0; i < j["checks"].size(); ++i) {
    const json& v = j["checks"][i];
    const std::string field = fmt::format("checks[{}]", i);
    if (!v.is_string()) throw InputError(path, field, "wrong type: expected a string");
    const auto name = v.get<std::string>();
    if (!is_check_selector(name))
      throw InputError(path, field,
                       "unknown check '" + name + "' (a catalogue name, e.g. 'train.loss_parity', or a prefix ending in '.', e.g. 'cache.')");
    c.checks.push_back(name);
  }
}

void read_tolerances(const json& j, const std::string& path, Case& c) {
  const json& t = object_at(j, "tolerances", path, "tolerances");
  reject_unknown(t, {"fp32_relative", "bf16_k", "bf16_floor", "cp_growth", "fp32_oracle_k", "activation_memory"}, path,
                 "tolerances.");
  if (t.contains("fp32_oracle_k")) c.tolerances.fp32_oracle_k = number_at(t, "fp32_oracle_k", path, "tolerances.fp32_oracle_k");
  if (t.contains("fp32_relative")) c.tolerances.fp32_relative = number_at(t, "fp32_relative", path, "tolerances.fp32_relative");
  if (t.contains("bf16_k")) c.tolerances.bf16_k = number_at(t, "bf16_k", path, "tolerances.bf16_k");
  if (t.contains("bf16_floor")) c.tolerances.bf16_floor = number_at(t, "bf16_floor", path, "tolerances.bf16_floor");
  if (t.contains("cp_growth")) c.tolerances.cp_growth = number_at(t, "cp_growth", path, "tolerances.cp_growth");
  if (t.contains("activation_memory"))
    c.tolerances.activation_memory = number_at(t, "activation_memory", path, "tolerances.activation_memory");
  for (const auto& [field, v] : {std::pair{"fp32_oracle_k", c.tolerances.fp32_oracle_k}, {"fp32_relative", c.tolerances.fp32_relative},
                                 {"bf16_k", c.tolerances.bf16_k}, {"bf16_floor", c.tolerances.bf16_floor}, {"cp_growth", c.tolerances.cp_growth},
                                 {"activation_memory", c.tolerances.activation_memory}})
    if (!(std::isfinite(v) && v >= 0))  // a negative tolerance fails every check; NaN passes none
      throw InputError(path, std::string("tolerances.") + field, fmt::format("must be finite and >= 0, got {}", v));
}

}  // namespace

std::optional<std::string> cp_size_problem(int64_t cp, int64_t seq_len) {
  if (cp > kMaxCp) return fmt::format("cp {} is more than this harness allows ({})", cp, kMaxCp);
  if (cp > seq_len) return fmt::format("cp {} is more than seq_len {}: every rank needs at least one token", cp, seq_len);
  return std::nullopt;
}

Case case_from_json(const json& j, const std::string& path) {
  if (!j.is_object()) throw InputError(path, "case", "expected a JSON object");
  reject_unknown(j, {"id", "description", "model", "weights", "data", "dtype", "steps", "optimizer", "cp", "requires", "checks",
                     "tolerances", "block_size", "gradient_bucket_elements", "block_mask_cache", "device", "loss_chunk_tokens", "reference_cp", "record_tensors",
                     "trained_exemptions", "ring", "sharding", "micro_batches", "activation_checkpointing",
                     "reference_checkpointing", "golden"}, path, "");
  Case c;
  c.path = path;
  c.raw = j;
  for (const char* required : {"id", "model", "data"})
    if (!j.contains(required)) throw InputError(path, required, "missing required key");
  c.id = string_at(j, "id", path, "id");
  if (c.id.empty()) throw InputError(path, "id", "must not be empty");
  if (c.id.size() > 200)  // it heads every progress line and names files: 100 KB of id was 500 KB of output
    throw InputError(path, "id", fmt::format("{} characters; at most 200", c.id.size()));
  // It is printed on terminals and drawn on the page as it is: control characters there (escape sequences, NUL, DEL)
  // or Unicode's bidi overrides would rewrite what a reader sees.
  for (size_t i = 0; i < c.id.size(); ++i) {
    const auto b = static_cast<unsigned char>(c.id[i]);
    const bool bidi = b == 0xE2 && i + 2 < c.id.size() && static_cast<unsigned char>(c.id[i + 1]) == 0x80 &&
                      ((static_cast<unsigned char>(c.id[i + 2]) >= 0xAA && static_cast<unsigned char>(c.id[i + 2]) <= 0xAE) ||
                       (static_cast<unsigned char>(c.id[i + 2]) >= 0x8E && static_cast<unsigned char>(c.id[i + 2]) <= 0x8F));
    const bool isolate = b == 0xE2 && i + 2 < c.id.size() && static_cast<unsigned char>(c.id[i + 1]) == 0x81 &&
                         static_cast<unsigned char>(c.id[i + 2]) >= 0xA6 && static_cast<unsigned char>(c.id[i + 2]) <= 0xA9;
    const bool c1 = b == 0xC2 && i + 1 < c.id.size() && static_cast<unsigned char>(c.id[i + 1]) >= 0x80 &&
                    static_cast<unsigned char>(c.id[i + 1]) <= 0x9F;
    if (b < 0x20 || b == 0x7F || c1 || bidi || isolate)
      throw InputError(path, "id", fmt::format("holds a control character at byte {} (an id is printed and drawn as it "
                                               "is: no control, escape or bidi characters)", i));
  }
  if (j.contains("description")) c.description = string_at(j, "description", path, "description");
  c.model = model::config_from_case_json(j.at("model"), path);
  if (j.contains("weights")) read_weights(j, path, c);
  read_data(j, path, c);
  if (j.contains("dtype")) c.dtype = read_lane(j, path);
  if (j.contains("steps")) c.steps = int_at(j, "steps", path, "steps", 1);
  if (c.steps > kMaxSteps)  // a parity case runs a few steps; a huge count is a typo that would look like a hang
    throw InputError(path, "steps", fmt::format("{} is more than this harness allows ({})", c.steps, kMaxSteps));
  if (j.contains("optimizer")) read_optimizer(j, path, c);
  if (j.contains("cp")) c.cp_sizes = ints_at(j, "cp", path, "cp", 1);
  if (c.cp_sizes.empty()) throw InputError(path, "cp", "empty: a case needs at least one candidate cp size");
  for (size_t i = 0; i < c.cp_sizes.size(); ++i) {
    if (auto why = cp_size_problem(c.cp_sizes[i], c.data.seq_len)) throw InputError(path, fmt::format("cp[{}]", i), *why);
    for (size_t k = 0; k < i; ++k)  // the candidate would run twice and its checks count twice
      if (c.cp_sizes[k] == c.cp_sizes[i])
        throw InputError(path, fmt::format("cp[{}]", i), fmt::format("{} is listed twice (cp[{}])", c.cp_sizes[i], k));
  }
  if (j.contains("requires")) read_requires(j, path, c);
  if (j.contains("checks")) read_checks(j, path, c);
  if (j.contains("golden")) {  // beside the case file; it need not exist yet (golden record writes it)
    const auto named = string_at(j, "golden", path, "golden");
    if (named.empty()) throw InputError(path, "golden", "empty path (leave the key out for no golden)");
    c.golden = io::resolve_beside(path, named);
  }
  if (j.contains("tolerances")) read_tolerances(j, path, c);
  if (j.contains("block_size")) {
    // One size for both, or {"q": n, "kv": m}: unequal blocks are how production masks often run (a q block of 128
    // against kv blocks of 64), and code that mixes the two up is right whenever they are equal.
    auto block_at = [&](const json& o, const char* key, const std::string& field) {
      const int64_t b = int_at(o, key, path, field, 1);
      if (b > kMaxSeqLen)  // a block longer than any sequence is a typo, not a block mask
        throw InputError(path, field, fmt::format("{} is more than this harness allows ({})", b, kMaxSeqLen));
      return b;
    };
    if (j["block_size"].is_object()) {
      const json& b = j["block_size"];
      reject_unknown(b, {"q", "kv"}, path, "block_size.");
      for (const char* key : {"q", "kv"})
        if (!b.contains(key)) throw InputError(path, std::string("block_size.") + key, "missing required key");
      c.q_block = block_at(b, "q", "block_size.q");
      c.kv_block = block_at(b, "kv", "block_size.kv");
    } else {
      if (!j["block_size"].is_number_integer())
        throw InputError(path, "block_size", "wrong type: expected a positive integer or {\"q\": n, \"kv\": m}");
      c.q_block = c.kv_block = block_at(j, "block_size", "block_size");
    }
  }
  if (j.contains("gradient_bucket_elements"))
    c.gradient_bucket_elements = int_at(j, "gradient_bucket_elements", path, "gradient_bucket_elements", 1);
  if (j.contains("block_mask_cache")) c.block_mask_cache = bool_at(j, "block_mask_cache", path, "block_mask_cache");
  if (j.contains("record_tensors")) c.record_tensors = bool_at(j, "record_tensors", path, "record_tensors");
  if (j.contains("ring")) {
    const json& r = object_at(j, "ring", path, "ring");
    reject_unknown(r, {"hop_limit", "mode"}, path, "ring.");
    if (r.contains("hop_limit")) c.ring_hop_limit = bool_at(r, "hop_limit", path, "ring.hop_limit");
    if (r.contains("mode")) {
      c.ring_mode = string_at(r, "mode", path, "ring.mode");
      if (c.ring_mode != "collect" && c.ring_mode != "stream")
        throw InputError(path, "ring.mode", "unknown mode '" + c.ring_mode + "': expected \"collect\" or \"stream\"");
    }
  }
  if (j.contains("activation_checkpointing")) {
    const json& a = j.at("activation_checkpointing");
    if (a.is_boolean()) {
      c.activation_checkpointing = a.get<bool>() ? model::ActivationCheckpointing::kKvHolder : model::ActivationCheckpointing::kOff;
    } else if (a.is_string()) {
      const auto mode = model::activation_checkpointing_from_string(a.get<std::string>());
      if (!mode)
        throw InputError(path, "activation_checkpointing", "unknown mode '" + a.get<std::string>() +
                                                               "': expected \"off\", \"kv_holder\" or \"layer_only\"");
      c.activation_checkpointing = *mode;
    } else {
      throw InputError(path, "activation_checkpointing", "wrong type: expected true, false or a mode name");
    }
  }
  if (j.contains("micro_batches")) {
    c.micro_batches = int_at(j, "micro_batches", path, "micro_batches", 1);
    if (c.data.batch % c.micro_batches)
      throw InputError(path, "micro_batches", fmt::format("{} micro-batches cannot split data.batch {} rows evenly",
                                                          c.micro_batches, c.data.batch));
  }
  if (j.contains("sharding")) {
    c.sharding = string_at(j, "sharding", path, "sharding");
    if (c.sharding != "contiguous" && c.sharding != "zigzag")
      throw InputError(path, "sharding", "unknown layout '" + c.sharding + "': expected \"contiguous\" or \"zigzag\"");
    // Under zigzag a rank's late sub-chunk reaches back into rank r + 1's, cp - 1 ring steps away: nothing to save.
    if (c.sharding == "zigzag" && c.ring_hop_limit)
      throw InputError(path, "ring.hop_limit", "needs \"sharding\": \"contiguous\" (under zigzag a window reaches rank r + 1, "
                                              "the last ring step)");
  }
  if (j.contains("trained_exemptions")) {
    const json& t = object_at(j, "trained_exemptions", path, "trained_exemptions");
    for (auto it = t.begin(); it != t.end(); ++it) {
      const std::string field = "trained_exemptions." + it.key();
      if (it.key() == "nonfinite")
        throw InputError(path, field, "a non-finite loss or grad norm fails every run; it cannot be waived");
      if (it.key() != kExemptZeroGradNorm && it.key() != kExemptLossFrozen && it.key() != kExemptOutputIgnoresInput)
        throw InputError(path, field, fmt::format("unknown: expected {}, {} or {}", kExemptZeroGradNorm, kExemptLossFrozen,
                                                  kExemptOutputIgnoresInput));
      if (!it->is_string() || it->get<std::string>().empty())
        throw InputError(path, field, "expected the reason, a non-empty string");
      c.trained_exemptions[it.key()] = it->get<std::string>();
    }
  }
  if (j.contains("reference_cp")) c.reference_cp = int_at(j, "reference_cp", path, "reference_cp", 1);
  if (auto why = cp_size_problem(c.reference_cp, c.data.seq_len)) throw InputError(path, "reference_cp", *why);
  if (j.contains("reference_checkpointing"))
    c.reference_checkpointing = bool_at(j, "reference_checkpointing", path, "reference_checkpointing");
  if (j.contains("loss_chunk_tokens")) c.loss_chunk_tokens = int_at(j, "loss_chunk_tokens", path, "loss_chunk_tokens", 1);
  if (j.contains("device")) {
    c.device = string_at(j, "device", path, "device");
    try {
      parse_device(c.device);
    } catch (const std::invalid_argument& e) {
      throw InputError(path, "device", e.what());
    }
  }
  // The checkpoint's headers against the model, now: a bad one is refused before any case runs (not after hours
  // of the others), and a config that lies about the geometry never gets a model built for it.
  if (!c.checkpoint.empty()) {
    try {
      c.checkpoint_contents = model::check_checkpoint(c.model, c.checkpoint);
    } catch (const InputError& e) {
      throw InputError(path, "weights.checkpoint", e.what());
    }
  }
  return c;
}

Case load_case(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) throw InputError(path, "case", "cannot read: " + ec.message());
  if (std::filesystem::exists(status) && !std::filesystem::is_regular_file(status))
    throw InputError(path, "case", "is not a regular file");
  std::ifstream in(path);
  if (!in) throw InputError(path, "case", std::string("cannot open file: ") + std::strerror(errno));
  return case_from_json(io::parse_input_json(in, path, "case"), path);
}

std::vector<Case> load_cases(const std::vector<std::string>& paths) {
  namespace fs = std::filesystem;
  std::vector<Case> cases;
  for (auto& p : paths) {
    std::error_code ec;
    const auto status = fs::status(p, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)  // a symlink loop, a path through a file, no permission
      throw InputError(p, "case", "cannot read: " + ec.message());
    if (fs::is_directory(status)) {
      std::vector<std::string> files;
      for (auto& entry : fs::directory_iterator(p, ec))
        if (entry.path().extension() == ".json") files.push_back(entry.path().string());
      if (ec) throw InputError(p, "cases", "cannot list the directory: " + ec.message());
      std::sort(files.begin(), files.end());
      if (files.empty()) throw InputError(p, "cases", "directory holds no *.json case");
      for (auto& f : files) cases.push_back(load_case(f));
    } else {
      cases.push_back(load_case(p));
    }
  }
  std::set<std::string> ids;
  for (auto& c : cases)
    if (!ids.insert(c.id).second) throw InputError(c.path, "id", "duplicate case id '" + c.id + "'");
  return cases;
}

}  // namespace cpharness::train
