#include "harness/check/hf_parity.h"

#include "harness/check/checks.h"
#include "harness/check/tolerance.h"
#include "kernels/relative_error.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <map>

namespace cpharness::check {
namespace {

using report::CheckResult;
using report::Policy;

double rel_l2(const torch::Tensor& a, const torch::Tensor& b) { return kernels::relative_error(a, b); }
double rel_scalar(double a, double b) { return kernels::relative_error(a, b); }

// A gradient against the golden's: ‖a − ref‖ over ‖ref‖, but never over less than `floor`. Gradients that are zero in
// exact arithmetic (a symmetry of the data: a vocabulary of 2 gives q and k none) are fp32 rounding noise in both
// runs, which moves with the CPU's kernels (AVX2 against AVX512: 2.5x the golden's noise, 1e-10 of the whole
// gradient). The floor is one fp32 rounding of the whole gradient's norm, read at the tolerance: a difference below
// 2^-24 x ‖whole‖ is below what fp32 resolves in the gradient, while any tensor above it keeps the relative bound.
// relative_error's conventions otherwise (a non-finite error is +inf).
double gradient_error(const torch::Tensor& a, const torch::Tensor& ref, double floor) {
  const auto a64 = a.to(torch::kFloat64), ref64 = ref.to(torch::kFloat64);
  const double e = kernels::relative_error_of_norms((a64 - ref64).norm().item<double>(),
                                                    std::max(ref64.norm().item<double>(), floor));
  return std::isfinite(e) ? e : INFINITY;
}

double whole_norm(const std::map<std::string, torch::Tensor>& grads) {
  double sum = 0;
  for (auto& [name, t] : grads) sum += t.to(torch::kFloat64).square().sum().item<double>();
  return std::sqrt(sum);
}

// The `floor` of gradient_error for a tolerance `tol`.
double gradient_floor(const std::map<std::string, torch::Tensor>& golden_grads, double tol) {
  return std::ldexp(1.0, -24) * whole_norm(golden_grads) / tol;
}

nlohmann::json base_details(const report::HfGolden& g, const report::HfRun& run) {
  return {{"golden", g.path},
          {"transformers_version", g.transformers_version},
          {"kv_share_mechanism", g.mechanism},
          {"kv_share_semantics", model::to_string(g.config.kv_share_semantics)},
          {"hf_use_cache", g.hf_use_cache},
          {"vision_mask", g.config.use_bidirectional_attention == "vision"
                              ? model::to_string(g.config.vision_mask)
                              : "none (no vision groups)"},
          {"document_ids", g.document_ids_from_positions ? "derived from position_ids restarts (transformers' packing)"
                           : g.batch.meta.document_ids.defined() ? "inputs/document_ids"
                                                                 : "one document per row"},
          {"holder", run.holder},
          {"seconds", run.seconds}};
}

}  // namespace

std::vector<CheckResult> check_hf_parity(const report::HfGolden& g, const report::HfRun& run, const HfParityTolerance& tol) {
  std::vector<CheckResult> out;
  const int cp = run.cp;
  auto details = base_details(g, run);

  auto d = details;
  d["cpp_loss"] = run.loss;
  d["hf_loss"] = g.loss();
  out.push_back(CheckResult::judge("hf.parity", cp, std::nullopt, "rel_loss", rel_scalar(run.loss, g.loss()), tol.loss,
                                   Policy::Fp32Relative, d));

  // Logits on real tokens: padded query rows see no key (uniform softmax in HF eager, zero in the ring), and no
  // loss reads them.
  const auto& ref_logits = g.dump.steps.at(0).logits;
  double logits_rel = NAN;
  if (run.logits.sizes() == ref_logits.sizes()) {
    auto valid = g.batch.meta.padding.defined() ? g.batch.meta.padding.logical_not().unsqueeze(-1)
                                                : torch::ones({1, 1, 1}, torch::kBool);
    logits_rel = rel_l2(run.logits * valid, ref_logits.to(torch::kFloat32) * valid);
  }
  d = details;
  d["shape_cpp"] = run.logits.sizes().vec();
  d["shape_hf"] = ref_logits.sizes().vec();
  out.push_back(CheckResult::judge("hf.parity", cp, std::nullopt, "rel_l2_logits", logits_rel, tol.logits,
                                   Policy::Fp32Relative, d));

  // Every gradient: the worst relative error is judged; missing or misshapen ones fail.
  const auto& ref_grads = g.dump.steps.at(0).grads;
  const double floor = gradient_floor(ref_grads, tol.grads);
  std::vector<std::pair<double, std::string>> rels;
  std::vector<std::string> problems;
  for (auto& [name, ref] : ref_grads) {
    auto it = run.grads.find(name);
    if (it == run.grads.end()) {
      problems.push_back(name + ": in the golden, not a parameter of the C++ model");
      continue;
    }
    if (it->second.sizes() != ref.sizes()) {
      problems.push_back(fmt::format("{}: shape [{}] vs golden [{}]", name, fmt::join(it->second.sizes(), ","),
                                     fmt::join(ref.sizes(), ",")));
      continue;
    }
    rels.emplace_back(gradient_error(it->second, ref, floor), name);
  }
  for (auto& [name, t] : run.grads)
    if (!ref_grads.count(name)) problems.push_back(name + ": a parameter of the C++ model without a gradient in the golden");
  std::sort(rels.begin(), rels.end(), [](auto& a, auto& b) { return a.first > b.first || (std::isnan(a.first) && !std::isnan(b.first)); });
  d = details;
  d["gradients_compared"] = rels.size();
  d["gradient_norm_floor"] = floor;
  nlohmann::json worst = nlohmann::json::array();
  for (size_t i = 0; i < std::min<size_t>(5, rels.size()); ++i) worst.push_back({{"name", rels[i].second}, {"rel_l2", rels[i].first}});
  d["worst"] = worst;
  if (!problems.empty()) d["problems"] = problems;
  const double worst_rel = !problems.empty() ? INFINITY : rels.empty() ? NAN : rels.front().first;
  auto grads = CheckResult::judge("hf.parity", cp, std::nullopt, "max_rel_l2_grad", worst_rel, tol.grads,
                                  Policy::Fp32Relative, d);
  if (!problems.empty()) grads.message += fmt::format("; {} gradient(s) unmatched, first: {}", problems.size(), problems.front());
  else if (!rels.empty()) grads.message += fmt::format(" (worst: {})", rels.front().second);
  out.push_back(grads);
  return out;
}

CheckResult judge_hf_grads_through_cp1(const report::HfGolden& g, const report::HfRun& run,
                                       const report::HfRun& run_fp64, const HfCp1Runs& cp1, const HfParityTolerance& tol) {
  const Tolerances lane;
  const auto& ref_grads = g.dump.steps.at(0).grads;
  double cp1_worst = 0, worst = 0;
  std::string cp1_worst_name, worst_name;
  const auto family = family_errors(cp1.fp32->grads, cp1.fp64->grads);  // cp 1's own fp32 error, per family
  const double golden_floor = gradient_floor(ref_grads, tol.grads);
  auto at = [](const std::map<std::string, torch::Tensor>& m, const std::string& name) -> const torch::Tensor* {
    auto it = m.find(name);
    return it == m.end() ? nullptr : &it->second;
  };
  for (auto& [name, ref] : ref_grads) {
    const auto* a = at(cp1.fp32->grads, name);
    const double e = a && a->sizes() == ref.sizes() ? gradient_error(*a, ref.to(torch::kFloat32), golden_floor) : INFINITY;
    if (!(e <= cp1_worst)) cp1_worst = e, cp1_worst_name = name;
  }
  // A gradient that is zero in exact arithmetic (by a symmetry of the data: a vocabulary of 2 gives every token one
  // id, and q/k then get none) is rounding noise in both fp64 runs, so its relative difference is ~1 however right
  // CP is. Relative to a tensor's own norm, but never to less than this share of the whole gradient's: a tensor that
  // small moves no weight, and any tensor above it is still judged at the lane's 1e-5.
  constexpr double kNegligibleGradientShare = 1e-8;
  const double norm_floor = kNegligibleGradientShare * whole_norm(cp1.fp64->grads);
  for (auto& [name, ref] : ref_grads) {
    const auto *c = at(run.grads, name), *c64 = at(run_fp64.grads, name), *a64 = at(cp1.fp64->grads, name);
    double ratio = INFINITY;
    if (c && c64 && a64 && c64->sizes() == a64->sizes()) {
      const double diff = (c64->to(torch::kFloat64) - a64->to(torch::kFloat64)).norm().item<double>();
      const double scale = std::max(a64->to(torch::kFloat64).norm().item<double>(), norm_floor);
      const double cp_fp64 = diff == 0 ? 0.0 : diff / scale / lane.fp32(run.cp);
      const double cp_fp32 = rel_l2(c->to(torch::kFloat64), *a64) /
                             (lane.fp32_rerun_headroom * lane.fp32_oracle(family.at(tensor_family(name)), run.cp));
      ratio = std::max(cp_fp64, cp_fp32);
    }
    if (std::isnan(ratio)) ratio = INFINITY;
    if (worst_name.empty() || ratio > worst) worst = ratio, worst_name = name;
  }
  for (auto& [name, t] : run.grads)
    if (!ref_grads.count(name)) worst = INFINITY, worst_name = name;
  const double observed = std::max(worst, cp1_worst / tol.grads);
  auto d = base_details(g, run);
  d["cp1_max_rel_l2_grad_vs_golden"] = cp1_worst;
  d["cp1_worst_tensor"] = cp1_worst_name;
  d["cp_worst_ratio"] = worst;
  d["cp_worst_tensor"] = worst_name;
  d["fp64_gradient_norm_floor"] = norm_floor;
  d["gradient_norm_floor"] = golden_floor;
  d["why"] = fmt::format("cp {} missed {} against the golden: the C++ model is judged at cp 1 against the golden, CP "
                         "between fp64 runs of cp 1 and cp {} from the golden's weights and batch, as the fp32 lane "
                         "judges it", run.cp, tol.grads, run.cp);
  auto res = CheckResult::judge("hf.parity", run.cp, std::nullopt, "max_grad_ratio_through_cp1", observed, 1.0,
                                Policy::Fp64Rerun, d);
  res.message += fmt::format(" (cp 1 against the golden: {:.3g}, worst {}; CP: ratio {:.3g}, worst {})", cp1_worst,
                             cp1_worst_name, worst, worst_name);
  return res;
}

CheckResult check_hf_kvshare_loss_parity(const report::HfGolden& g, const report::HfRun& correct, double tol) {
  auto d = base_details(g, correct);
  d["cpp_shared_loss"] = correct.loss;
  d["hf_loss"] = g.loss();
  return CheckResult::judge("kvshare.loss_parity", correct.cp, std::nullopt, "rel_abs_diff_loss",
                            rel_scalar(g.loss(), correct.loss), tol, Policy::Fp32Relative, d);
}

CheckResult check_hf_kvshare_bug_detected(const report::HfGolden& g, const report::HfRun& correct, double tol) {
  auto d = base_details(g, correct);
  const double moved = rel_scalar(g.loss(), correct.loss);
  d["cpp_shared_loss"] = correct.loss;
  d["hf_loss"] = g.loss();
  d["relative_shift"] = moved;
  // observed: the tolerance over the shift; below 1 means the export's loss moved beyond tolerance (bug visible).
  return CheckResult::judge("kvshare.bug_detected", correct.cp, std::nullopt, "tolerance_over_loss_shift",
                            moved > 0 ? tol / moved : INFINITY, 1.0, Policy::Fp32Relative, d);
}

}  // namespace cpharness::check
