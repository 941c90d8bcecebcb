#include "harness/report/compare.h"

#include "harness/model/parameter_order.h"
#include "kernels/relative_error.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>
#include <tuple>

namespace cpharness::report {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string num(double v) { return fmt::format("{:.3g}", v); }

std::string shape_str(const std::vector<std::int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

bool is_divergence(EntryStatus s) {
  return s == EntryStatus::kOutOfTolerance || s == EntryStatus::kNonFinite || s == EntryStatus::kShapeMismatch;
}

bool within(const Tolerance& tol, double diff, double ref, double max_abs) {
  if (std::isnan(diff)) return false;
  if (tol.kind == Tolerance::Kind::kExact) return max_abs == 0.0 && diff == 0.0;
  return diff <= tol.rel * ref + tol.abs;
}

double rel_of(double diff, double ref) { return kernels::relative_error_of_norms(diff, ref); }

std::int64_t count_nonfinite(const torch::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) return 0;
  if (t.numel() == 0) return 0;
  return (~torch::isfinite(t)).sum().item<std::int64_t>();
}

std::string tolerance_phrase(const CompareEntry& e) {
  if (e.tolerance.kind == Tolerance::Kind::kExact)
    return fmt::format("differs (abs {}, max abs {}; exact required)", num(e.abs_diff), num(e.max_abs_diff));
  return fmt::format("rel {} > {} (abs {}, max abs {})", num(e.rel_diff), e.tolerance.to_string(), num(e.abs_diff),
                     num(e.max_abs_diff));
}

CompareEntry make_entry(std::optional<std::int64_t> step, EntryKind kind, std::string name, std::string path,
                        const Tolerance& tol) {
  CompareEntry e;
  e.step = step;
  e.kind = kind;
  e.name = std::move(name);
  e.path = std::move(path);
  e.tolerance = tol;
  return e;
}

void set_missing(CompareEntry& e, bool in_a) {
  e.status = in_a ? EntryStatus::kMissingInB : EntryStatus::kMissingInA;
  e.abs_diff = e.rel_diff = e.max_abs_diff = kNaN;
  e.message = in_a ? "present in A only" : "present in B only";
  // A non-finite value fails under every policy, "missing:ok" included: it is never a missing entry allowed.
  if (const auto n = in_a ? e.nonfinite_a : e.nonfinite_b) {
    e.status = EntryStatus::kNonFinite;
    e.message += fmt::format(", with {} NaN/Inf element(s)", n);
  }
}

// Rows [B, S, ...] of a tensor with the padded positions zeroed (`keep`: [B, S] bool, true for real tokens), when the
// shapes line up; else the tensor unchanged.
torch::Tensor real_rows(const torch::Tensor& t, const torch::Tensor& keep) {
  if (!keep.defined() || t.dim() < 2 || t.size(0) != keep.size(0) || t.size(1) != keep.size(1)) return t;
  auto k = keep;
  while (k.dim() < t.dim()) k = k.unsqueeze(-1);
  return torch::where(k, t, torch::zeros_like(t));
}

void compare_tensor(CompareEntry& e, const torch::Tensor* a, const torch::Tensor* b, const torch::Tensor& keep = {}) {
  // NaN/Inf are counted everywhere, padded positions included: a non-finite value is never a detail to leave out.
  if (a) {
    e.shape_a = a->sizes().vec();
    e.dtype_a = c10::toString(a->scalar_type());
    e.nonfinite_a = count_nonfinite(*a);
  }
  if (b) {
    e.shape_b = b->sizes().vec();
    e.dtype_b = c10::toString(b->scalar_type());
    e.nonfinite_b = count_nonfinite(*b);
  }
  torch::Tensor ma, mb;  // padded positions excluded from the difference (hidden states and logits)
  if (keep.defined() && a && b) {
    ma = real_rows(a->detach().to(torch::kCPU), keep), mb = real_rows(b->detach().to(torch::kCPU), keep);
    a = &ma, b = &mb;
  }
  if (!a || !b) return set_missing(e, a != nullptr);
  if (e.shape_a != e.shape_b) {
    e.status = EntryStatus::kShapeMismatch;
    e.abs_diff = e.rel_diff = e.max_abs_diff = kNaN;
    e.message = fmt::format("shape {} in A vs {} in B", shape_str(e.shape_a), shape_str(e.shape_b));
    return;
  }
  const torch::Tensor da = a->detach().to(torch::kCPU).to(torch::kDouble);
  const torch::Tensor db = b->detach().to(torch::kCPU).to(torch::kDouble);
  if (da.numel() > 0) {
    const torch::Tensor diff = da - db;
    e.abs_diff = diff.norm().item<double>();
    e.max_abs_diff = diff.abs().max().item<double>();
    e.ref_norm = db.norm().item<double>();
  }
  e.rel_diff = rel_of(e.abs_diff, e.ref_norm);
  if (e.nonfinite_a || e.nonfinite_b) {
    e.status = EntryStatus::kNonFinite;
    e.message = fmt::format("{} NaN/Inf element(s) in A, {} in B", e.nonfinite_a, e.nonfinite_b);
  } else if (!within(e.tolerance, e.abs_diff, e.ref_norm, e.max_abs_diff)) {
    e.status = EntryStatus::kOutOfTolerance;
    e.message = tolerance_phrase(e);
  }
  if (e.status != EntryStatus::kNonFinite && e.dtype_a != e.dtype_b)
    e.message += (e.message.empty() ? "" : "; ") + fmt::format("dtype {} in A vs {} in B", e.dtype_a, e.dtype_b);
}

void compare_scalar(CompareEntry& e, std::optional<double> a, std::optional<double> b) {
  e.is_scalar = true;
  if (a) {
    e.a = *a;
    e.nonfinite_a = std::isfinite(*a) ? 0 : 1;
  }
  if (b) {
    e.b = *b;
    e.nonfinite_b = std::isfinite(*b) ? 0 : 1;
  }
  if (!a || !b) return set_missing(e, a.has_value());
  e.abs_diff = e.max_abs_diff = std::fabs(*a - *b);
  e.ref_norm = std::fabs(*b);
  e.rel_diff = rel_of(e.abs_diff, e.ref_norm);
  if (e.nonfinite_a || e.nonfinite_b) {
    e.status = EntryStatus::kNonFinite;
    e.message = fmt::format("non-finite value: A = {}, B = {}", *a, *b);
  } else if (!within(e.tolerance, e.abs_diff, e.ref_norm, e.max_abs_diff)) {
    e.status = EntryStatus::kOutOfTolerance;
    e.message = fmt::format("A = {:.17g}, B = {:.17g}: ", *a, *b) + tolerance_phrase(e);
  }
}

template <typename Map>
std::vector<typename Map::key_type> union_keys(const Map& a, const Map& b) {
  std::set<typename Map::key_type> s;
  for (const auto& kv : a) s.insert(kv.first);
  for (const auto& kv : b) s.insert(kv.first);
  return {s.begin(), s.end()};
}

template <typename Map>
const torch::Tensor* find_tensor(const Map& m, const typename Map::key_type& k) {
  auto it = m.find(k);
  return it == m.end() ? nullptr : &it->second;
}

Tolerance parse_tolerance(const std::string& v, const std::string& spec) {
  if (v == "exact") return Tolerance::exact();
  auto to_double = [&](const std::string& s) {
    std::size_t used = 0;
    double d = 0;
    try {
      d = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != s.size() || s.empty() || !(d >= 0.0) || !std::isfinite(d))
      throw std::invalid_argument("policy \"" + spec + "\": \"" + s + "\" is not a non-negative number");
    return d;
  };
  // "REL+ABS"; a '+' right after 'e'/'E' belongs to an exponent ("1e+5").
  for (std::size_t plus = v.find('+', 1); plus != std::string::npos; plus = v.find('+', plus + 1))
    if (v[plus - 1] != 'e' && v[plus - 1] != 'E')
      return Tolerance::relative(to_double(v.substr(0, plus)), to_double(v.substr(plus + 1)));
  return Tolerance::relative(to_double(v));
}

nlohmann::json jnum(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}

}  // namespace

std::string Tolerance::to_string() const {
  if (kind == Kind::kExact) return "exact";
  if (abs == 0.0) return fmt::format("rel {:g}", rel);
  return fmt::format("rel {:g} + abs {:g}", rel, abs);
}

ComparePolicy ComparePolicy::exact() {
  ComparePolicy p;
  for (Tolerance* t : {&p.inputs, &p.weights, &p.hidden, &p.logits, &p.loss, &p.grads, &p.grad_norm, &p.param_norm})
    *t = Tolerance::exact();
  return p;
}

ComparePolicy ComparePolicy::relative(double rel) {
  ComparePolicy p;
  for (Tolerance* t : {&p.weights, &p.hidden, &p.logits, &p.loss, &p.grads, &p.grad_norm, &p.param_norm})
    *t = Tolerance::relative(rel);
  return p;
}

ComparePolicy ComparePolicy::parse(const std::string& spec) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : spec) {
    if (c == ',') {
      parts.push_back(cur);
      cur.clear();
    } else if (c != ' ') {
      cur.push_back(c);
    }
  }
  parts.push_back(cur);
  ComparePolicy p;
  const std::string& base = parts.front();
  if (base == "fp32" || base.empty()) {
    p = fp32();
  } else if (base == "exact") {
    p = exact();
  } else if (base.rfind("rel:", 0) == 0) {
    Tolerance t = parse_tolerance(base.substr(4), spec);
    p = relative(t.rel);
    for (Tolerance* x : {&p.weights, &p.hidden, &p.logits, &p.loss, &p.grads, &p.grad_norm, &p.param_norm}) *x = t;
  } else {
    throw std::invalid_argument("policy \"" + spec + "\": base must be fp32, exact or rel:X, got \"" + base + "\"");
  }
  std::set<std::string> given;
  for (std::size_t i = 1; i < parts.size(); ++i) {
    const std::string& o = parts[i];
    const std::size_t colon = o.find(':');
    if (colon == std::string::npos)
      throw std::invalid_argument("policy \"" + spec + "\": override \"" + o + "\" is not CATEGORY:VALUE");
    const std::string cat = o.substr(0, colon), val = o.substr(colon + 1);
    if (!given.insert(cat).second)  // one of the two values would be dropped without a word
      throw std::invalid_argument("policy \"" + spec + "\": " + cat + " is given twice");
    if (cat == "missing") {
      if (val != "ok" && val != "fail")
        throw std::invalid_argument("policy \"" + spec + "\": missing must be ok or fail, got \"" + val + "\"");
      p.missing_is_failure = val == "fail";
      continue;
    }
    Tolerance* t = cat == "inputs"       ? &p.inputs
                   : cat == "weights"    ? &p.weights
                   : cat == "hidden"     ? &p.hidden
                   : cat == "logits"     ? &p.logits
                   : cat == "loss"       ? &p.loss
                   : cat == "grads"      ? &p.grads
                   : cat == "grad_norm"  ? &p.grad_norm
                   : cat == "param_norm" ? &p.param_norm
                                         : nullptr;
    if (!t)
      throw std::invalid_argument("policy \"" + spec + "\": unknown category \"" + cat +
                                  "\" (inputs weights hidden logits loss grads grad_norm param_norm missing)");
    *t = parse_tolerance(val, spec);
  }
  return p;
}

const char* to_string(EntryKind k) {
  switch (k) {
    case EntryKind::kInput: return "input";
    case EntryKind::kWeight: return "weight";
    case EntryKind::kHidden: return "hidden";
    case EntryKind::kLogits: return "logits";
    case EntryKind::kLoss: return "loss";
    case EntryKind::kGrad: return "grad";
    case EntryKind::kGradNorm: return "grad_norm";
    case EntryKind::kParamNorm: return "param_norm";
  }
  return "?";
}

const char* to_string(EntryStatus s) {
  switch (s) {
    case EntryStatus::kPass: return "pass";
    case EntryStatus::kOutOfTolerance: return "out_of_tolerance";
    case EntryStatus::kNonFinite: return "nonfinite";
    case EntryStatus::kShapeMismatch: return "shape_mismatch";
    case EntryStatus::kMissingInA: return "missing_in_a";
    case EntryStatus::kMissingInB: return "missing_in_b";
  }
  return "?";
}

namespace {

// Inputs and weights, by name.
void compare_inputs_and_weights(const RunDump& a, const RunDump& b, const ComparePolicy& policy,
                                std::vector<CompareEntry>& out) {
  for (const auto& name : union_keys(a.inputs, b.inputs)) {
    auto e = make_entry(std::nullopt, EntryKind::kInput, name, "inputs/" + name, policy.inputs);
    compare_tensor(e, find_tensor(a.inputs, name), find_tensor(b.inputs, name));
    out.push_back(std::move(e));
  }
  for (const auto& name : union_keys(a.weights, b.weights)) {
    auto e = make_entry(std::nullopt, EntryKind::kWeight, name, "weights/" + name, policy.weights);
    e.layer = model::layer_index_of(name);
    compare_tensor(e, find_tensor(a.weights, name), find_tensor(b.weights, name));
    out.push_back(std::move(e));
  }
}

// One step in data-flow order: hidden states by layer, logits, loss, gradients in backward order, norms.
void compare_step(std::int64_t k, const StepRecord* sa_in, const StepRecord* sb_in, const ComparePolicy& policy,
                  const torch::Tensor& keep, std::vector<CompareEntry>& out) {
  static const StepRecord empty;
  const StepRecord& sa = sa_in ? *sa_in : empty;
  const StepRecord& sb = sb_in ? *sb_in : empty;
  const std::string sp = fmt::format("steps/{}/", k);
  for (std::int64_t i : union_keys(sa.hidden, sb.hidden)) {
    auto e = make_entry(k, EntryKind::kHidden, std::to_string(i), fmt::format("{}hidden/{}", sp, i), policy.hidden);
    e.layer = i;
    compare_tensor(e, find_tensor(sa.hidden, i), find_tensor(sb.hidden, i), keep);
    out.push_back(std::move(e));
  }
  if (sa.logits.defined() || sb.logits.defined()) {
    auto e = make_entry(k, EntryKind::kLogits, "logits", sp + "logits", policy.logits);
    compare_tensor(e, sa.logits.defined() ? &sa.logits : nullptr, sb.logits.defined() ? &sb.logits : nullptr, keep);
    out.push_back(std::move(e));
  }
  {
    auto e = make_entry(k, EntryKind::kLoss, "loss", sp + "loss", policy.loss);
    compare_scalar(e, sa_in ? std::optional<double>(sa.loss) : std::nullopt,
                   sb_in ? std::optional<double>(sb.loss) : std::nullopt);
    out.push_back(std::move(e));
  }
  for (const auto& name : model::grad_backward_order(union_keys(sa.grads, sb.grads))) {
    auto e = make_entry(k, EntryKind::kGrad, name, sp + "grads/" + name, policy.grads);
    e.layer = model::layer_index_of(name);
    compare_tensor(e, find_tensor(sa.grads, name), find_tensor(sb.grads, name));
    out.push_back(std::move(e));
  }
  if (sa.grad_norm || sb.grad_norm) {
    auto e = make_entry(k, EntryKind::kGradNorm, "grad_norm", sp + "grad_norm", policy.grad_norm);
    compare_scalar(e, sa.grad_norm, sb.grad_norm);
    out.push_back(std::move(e));
  }
  if (sa.param_norm || sb.param_norm) {
    auto e = make_entry(k, EntryKind::kParamNorm, "param_norm", sp + "param_norm", policy.param_norm);
    compare_scalar(e, sa.param_norm, sb.param_norm);
    out.push_back(std::move(e));
  }
}

}  // namespace

void recount(CompareResult& r) {
  r.counts = CompareCounts{};
  r.first_divergence.reset();
  CompareCounts& c = r.counts;
  c.entries = r.entries.size();
  for (std::size_t i = 0; i < r.entries.size(); ++i) {
    const CompareEntry& e = r.entries[i];
    switch (e.status) {
      case EntryStatus::kPass: ++c.passed; if (e.differs()) ++c.differing_within_tolerance; break;
      case EntryStatus::kOutOfTolerance: ++c.out_of_tolerance; break;
      case EntryStatus::kNonFinite: ++c.nonfinite; break;
      case EntryStatus::kShapeMismatch: ++c.shape_mismatch; break;
      case EntryStatus::kMissingInA:
      case EntryStatus::kMissingInB: ++c.missing; break;
    }
    if (!r.first_divergence && is_divergence(e.status)) r.first_divergence = i;
  }
  // Nothing in common compares nothing: never a pass, whatever missing:ok allows.
  r.passed = c.out_of_tolerance == 0 && c.nonfinite == 0 && c.shape_mismatch == 0 &&
             (!r.policy.missing_is_failure || c.missing == 0) && c.passed > 0;
}

namespace {

std::vector<ProvenanceDiff> provenance_diffs(const RunDump& a, const RunDump& b) {
  std::vector<ProvenanceDiff> out;
  for (const auto& key : union_keys(a.provenance, b.provenance)) {
    auto pa = a.provenance.find(key), pb = b.provenance.find(key);
    std::optional<std::string> va, vb;
    if (pa != a.provenance.end()) va = pa->second;
    if (pb != b.provenance.end()) vb = pb->second;
    if (va != vb) out.push_back({key, va, vb});
  }
  return out;
}

}  // namespace

CompareResult compare_dumps(const RunDump& a, const RunDump& b, const ComparePolicy& policy) {
  CompareResult r;
  r.policy = policy;
  compare_inputs_and_weights(a, b, policy, r.entries);
  // Padded positions carry no loss, and what a stack computes there is its own affair (transformers' masks let
  // padded query rows attend; the harness zeroes them): hidden states and logits are judged on real tokens only.
  // The padding of B (the reference), else A's; inputs/padding itself is compared like any input.
  torch::Tensor keep;
  const torch::Tensor* padding = find_tensor(b.inputs, "padding");
  if (!padding) padding = find_tensor(a.inputs, "padding");
  if (padding && padding->dim() == 2) {
    keep = padding->to(torch::kCPU).to(torch::kBool).logical_not();
    r.padded_positions_excluded = padding->to(torch::kBool).sum().item<std::int64_t>();
  }
  for (std::int64_t k : union_keys(a.steps, b.steps)) {
    auto ia = a.steps.find(k), ib = b.steps.find(k);
    compare_step(k, ia != a.steps.end() ? &ia->second : nullptr, ib != b.steps.end() ? &ib->second : nullptr, policy,
                 keep, r.entries);
  }
  recount(r);
  r.provenance_diffs = provenance_diffs(a, b);
  return r;
}

nlohmann::json to_json(const Tolerance& t) {
  if (t.kind == Tolerance::Kind::kExact) return {{"kind", "exact"}};
  return {{"kind", "relative"}, {"rel", t.rel}, {"abs", t.abs}};
}

nlohmann::json to_json(const ComparePolicy& p) {
  return {{"inputs", to_json(p.inputs)},       {"weights", to_json(p.weights)},
          {"hidden", to_json(p.hidden)},       {"logits", to_json(p.logits)},
          {"loss", to_json(p.loss)},           {"grads", to_json(p.grads)},
          {"grad_norm", to_json(p.grad_norm)}, {"param_norm", to_json(p.param_norm)},
          {"missing_is_failure", p.missing_is_failure}};
}

nlohmann::json to_json(const CompareEntry& e) {
  nlohmann::json j;
  j["step"] = e.step ? nlohmann::json(*e.step) : nlohmann::json(nullptr);
  j["kind"] = to_string(e.kind);
  j["name"] = e.name;
  j["path"] = e.path;
  j["layer"] = e.layer ? nlohmann::json(*e.layer) : nlohmann::json(nullptr);
  j["status"] = to_string(e.status);
  if (e.is_scalar) {
    j["a"] = e.status == EntryStatus::kMissingInA ? nlohmann::json(nullptr) : jnum(e.a);
    j["b"] = e.status == EntryStatus::kMissingInB ? nlohmann::json(nullptr) : jnum(e.b);
  } else {
    j["shape_a"] = e.shape_a;
    j["shape_b"] = e.shape_b;
    j["dtype_a"] = e.dtype_a;
    j["dtype_b"] = e.dtype_b;
    j["max_abs_diff"] = jnum(e.max_abs_diff);
    j["ref_norm"] = jnum(e.ref_norm);
  }
  j["abs_diff"] = jnum(e.abs_diff);
  j["rel_diff"] = jnum(e.rel_diff);
  j["nonfinite_a"] = e.nonfinite_a;
  j["nonfinite_b"] = e.nonfinite_b;
  j["tolerance"] = to_json(e.tolerance);
  j["message"] = e.message;
  return j;
}

nlohmann::json to_json(const CompareResult& r, bool include_all) {
  nlohmann::json j;
  j["status"] = r.status();
  const CompareCounts& c = r.counts;
  j["counts"] = {{"entries", c.entries},
                 {"passed", c.passed},
                 {"differing_within_tolerance", c.differing_within_tolerance},
                 {"out_of_tolerance", c.out_of_tolerance},
                 {"nonfinite", c.nonfinite},
                 {"shape_mismatch", c.shape_mismatch},
                 {"missing", c.missing}};
  j["padded_positions_excluded"] = r.padded_positions_excluded;
  j["policy"] = to_json(r.policy);
  j["first_divergence"] = r.first_divergence ? to_json(r.entries[*r.first_divergence]) : nlohmann::json(nullptr);
  nlohmann::json entries = nlohmann::json::array();
  for (const auto& e : r.entries)
    if (include_all || e.differs()) entries.push_back(to_json(e));
  j["entries"] = std::move(entries);
  nlohmann::json prov = nlohmann::json::array();
  for (const auto& d : r.provenance_diffs) {
    nlohmann::json item = nlohmann::json::object();
    item["key"] = d.key;
    item["a"] = d.a ? nlohmann::json(*d.a) : nlohmann::json(nullptr);
    item["b"] = d.b ? nlohmann::json(*d.b) : nlohmann::json(nullptr);
    prov.push_back(std::move(item));
  }
  j["provenance_diffs"] = std::move(prov);
  return j;
}

std::string render_text(const CompareResult& r, const std::string& a_label, const std::string& b_label,
                        std::size_t max_rows) {
  const CompareCounts& c = r.counts;
  std::string s = fmt::format("compare: {}   A = {}, B = {} (reference)\n", r.passed ? "PASS" : "FAIL", a_label,
                              b_label);
  s += fmt::format("  {} entries: {} pass ({} differ within tolerance), {} out of tolerance, {} nonfinite, "
                   "{} shape mismatch, {} missing{}\n",
                   c.entries, c.passed, c.differing_within_tolerance, c.out_of_tolerance, c.nonfinite,
                   c.shape_mismatch, c.missing, c.missing && !r.policy.missing_is_failure ? " (allowed)" : "");
  if (r.padded_positions_excluded)
    s += fmt::format("  {} padded position(s) (inputs/padding) excluded from hidden states and logits\n",
                     r.padded_positions_excluded);
  auto label = [](const CompareEntry& e) {
    std::string where = e.step ? fmt::format("step {} ", *e.step) : std::string();
    return where + to_string(e.kind) + " " + e.name;
  };
  if (r.first_divergence) {
    const CompareEntry& e = r.entries[*r.first_divergence];
    s += fmt::format("  first divergence: {} ({}): {}\n", label(e), e.path, e.message);
  } else {
    s += "  first divergence: none\n";
  }
  auto clip = [](const std::string& v) { return v.size() > 48 ? v.substr(0, 45) + "..." : v; };
  for (const auto& d : r.provenance_diffs)
    s += fmt::format("  provenance {}: {} vs {}\n", d.key, d.a ? clip(*d.a) : "(absent)", d.b ? clip(*d.b) : "(absent)");

  std::vector<std::size_t> failing;
  for (std::size_t i = 0; i < r.entries.size(); ++i)
    if (r.entries[i].failed()) failing.push_back(i);
  // Differences first (in data-flow order), entries present on one side only after them: a module that exists in
  // one version only would otherwise push the real divergences out of the table.
  std::stable_partition(failing.begin(), failing.end(), [&](std::size_t i) {
    return r.entries[i].status != EntryStatus::kMissingInA && r.entries[i].status != EntryStatus::kMissingInB;
  });
  if (!failing.empty()) {
    s += fmt::format("  {:1} {:>5} {:<10} {:<44} {:<16} {:>10} {:>10} {}\n", "", "step", "kind", "name", "status",
                     "rel diff", "max abs", "tolerance");
    for (std::size_t n = 0; n < failing.size() && n < max_rows; ++n) {
      const CompareEntry& e = r.entries[failing[n]];
      const bool first = r.first_divergence && *r.first_divergence == failing[n];
      const bool missing = e.status == EntryStatus::kMissingInA || e.status == EntryStatus::kMissingInB;
      s += fmt::format("  {:1} {:>5} {:<10} {:<44} {:<16} {:>10} {:>10} {}\n", first ? ">" : "",
                       e.step ? std::to_string(*e.step) : "-", to_string(e.kind), clip(e.name), to_string(e.status),
                       missing ? "-" : num(e.rel_diff), missing ? "-" : num(e.max_abs_diff), e.tolerance.to_string());
    }
    if (failing.size() > max_rows) s += fmt::format("  ... and {} more failing entries\n", failing.size() - max_rows);
  }
  const CompareEntry* worst = nullptr;
  for (const auto& e : r.entries)
    if (!e.failed() && e.differs() && (!worst || e.rel_diff > worst->rel_diff)) worst = &e;
  if (worst)
    s += fmt::format("  largest difference within tolerance: {} rel {} (max abs {})\n", label(*worst),
                     num(worst->rel_diff), num(worst->max_abs_diff));
  return s;
}

}  // namespace cpharness::report
