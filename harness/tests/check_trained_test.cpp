// train.trained: a run that did not train (dead, frozen or non-finite) fails, whatever the other checks say. And
// two parts of the training checks judged on synthetic runs: the step-0 gradients tensor by tensor, and the bf16
// lane's per-step bound.
#include <gtest/gtest.h>

#include <random>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <optional>

#include "harness/check/checks.h"
#include "harness/io/input_error.h"
#include "harness/train/case.h"

namespace cpharness::check {
namespace {

report::LaneRun run_of(std::vector<std::pair<double, double>> loss_and_grad_norm, int cp = 2) {
  report::LaneRun r;
  r.cp = cp;
  for (auto [loss, g] : loss_and_grad_norm) r.steps.push_back({loss, g, 1.0, 10});
  return r;
}

// The bounds are what cases/README.md says, at every cp size: a bound loosened in code (a scale that ignores
// cp_growth is 1 + log2(cp): 2x at cp 2, 3x at cp 4) passes every parity check and shows nowhere else.
TEST(Tolerances, BoundsAreTheDocumentedFormulaAtEveryCpSize) {
  const check::Tolerances fixed;  // the defaults: fp32 1e-5, bf16 2 x cp 1's error + 1e-3, no growth with cp
  for (int cp : {1, 2, 3, 4, 8, 16}) {
    SCOPED_TRACE(cp);
    EXPECT_EQ(fixed.scale(cp), 1.0);
    EXPECT_EQ(fixed.fp32(cp), 1e-5);
    EXPECT_EQ(fixed.bf16(0.01, cp), 2 * 0.01 + 1e-3);
    EXPECT_EQ(fixed.fp32_oracle(1e-4, cp), 2 * 1e-4 + 1e-5);
  }
  check::Tolerances growing;
  growing.cp_growth = 0.5;  // x (1 + 0.5 log2 cp)
  EXPECT_EQ(growing.scale(1), 1.0);
  EXPECT_EQ(growing.scale(2), 1.5);
  EXPECT_EQ(growing.scale(4), 2.0);
  EXPECT_EQ(growing.fp32(16), 1e-5 * 3.0);
}

TEST(CheckTrained, ARunThatTrainedPasses) {
  EXPECT_EQ(check_trained(run_of({{4.85, 0.3}, {4.80, 0.29}, {4.77, 0.31}})).status, report::Status::Pass);
  EXPECT_EQ(check_trained(run_of({{4.85, 0.3}})).status, report::Status::Pass);  // one step: no movement to ask for
}

// Two dead models agree perfectly: loss ln(vocab) on every step, grad norm exactly 0.
TEST(CheckTrained, ADeadModelFailsSayingWhy) {
  const double ln_vocab = std::log(128.0);
  const auto res = check_trained(run_of({{ln_vocab, 0.0}, {ln_vocab, 0.0}, {ln_vocab, 0.0}}, 4));
  EXPECT_EQ(res.status, report::Status::Fail);
  EXPECT_EQ(res.cp, 4);
  EXPECT_EQ(res.observed, 4.0);  // three zero grad norms and a frozen loss
  EXPECT_NE(res.message.find("did not train"), std::string::npos) << res.message;
  EXPECT_NE(res.message.find("grad norm exactly 0"), std::string::npos) << res.message;
  EXPECT_NE(res.message.find("on all 3 steps"), std::string::npos) << res.message;
}

TEST(CheckTrained, AFrozenLossFailsEvenWithGradients) {
  EXPECT_EQ(check_trained(run_of({{2.5, 0.1}, {2.5, 0.1}})).status, report::Status::Fail);
}

TEST(CheckTrained, NonFiniteLossOrGradNormFails) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(check_trained(run_of({{nan, 0.3}, {4.8, 0.3}})).status, report::Status::Fail);
  const auto res = check_trained(run_of({{4.85, inf}, {4.8, 0.3}}));
  EXPECT_EQ(res.status, report::Status::Fail);
  EXPECT_NE(res.message.find("non-finite"), std::string::npos) << res.message;
}

// A case may waive one part by naming it; the reason is in the message and details. Nothing else is waived, and a
// non-finite run fails whatever is waived.
TEST(CheckTrained, AnExemptionWaivesOnlyThePartItNamesAndShowsTheReason) {
  const std::map<std::string, std::string> frozen_ok = {{"loss_frozen", "lr 0 on one repeated batch"}};
  auto res = check_trained(run_of({{2.5, 0.1}, {2.5, 0.1}}), frozen_ok);
  EXPECT_EQ(res.status, report::Status::Pass) << res.message;
  EXPECT_NE(res.message.find("lr 0 on one repeated batch"), std::string::npos) << res.message;
  EXPECT_EQ(res.details.at("exemptions").at("loss_frozen"), "lr 0 on one repeated batch");
  EXPECT_EQ(check_trained(run_of({{2.5, 0.0}, {2.5, 0.0}}), frozen_ok).status, report::Status::Fail);
  const std::map<std::string, std::string> all = {
      {"loss_frozen", "a"}, {"zero_grad_norm", "b"}, {"output_ignores_input", "c"}};
  EXPECT_EQ(check_trained(run_of({{2.5, 0.0}, {2.5, 0.0}}), all).status, report::Status::Pass);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(check_trained(run_of({{nan, 0.1}, {2.4, 0.1}}), all).status, report::Status::Fail);
}

TEST(CheckTrained, ACaseNamesItsExemptionsWithAReasonAndCannotWaiveNonFinite) {
  auto parse = [](const std::string& exemptions) {
    return train::case_from_json(nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8},
        "trained_exemptions": )" + exemptions + "}"), "t.json");
  };
  EXPECT_EQ(parse(R"({"loss_frozen": "lr 0"})").trained_exemptions.at("loss_frozen"), "lr 0");
  auto field_of = [&](const std::string& exemptions) {
    try {
      parse(exemptions);
    } catch (const io::InputError& e) {
      return e.subject();
    }
    return std::string("(accepted)");
  };
  EXPECT_EQ(field_of(R"({"nonfinite": "it is fine"})"), "trained_exemptions.nonfinite");
  EXPECT_EQ(field_of(R"({"loss_frozen": ""})"), "trained_exemptions.loss_frozen");
  EXPECT_EQ(field_of(R"({"loss_frozen": true})"), "trained_exemptions.loss_frozen");
  EXPECT_EQ(field_of(R"({"sleepy": "x"})"), "trained_exemptions.sleepy");
  EXPECT_EQ(field_of(R"(["loss_frozen"])"), "trained_exemptions");
}

train::Case tiny_case();

// Final parameters of three runs that start alike: `rel` is each run's relative distance from `truth`.
report::LaneRun params_run(int cp, const torch::Tensor& truth, double rel, int seed) {
  report::LaneRun r = run_of({{4.8, 0.3}}, cp);
  torch::manual_seed(seed);
  const auto noise = torch::randn_like(truth);
  r.final_params["w"] = truth + noise * (rel * truth.norm() / noise.norm());
  r.final_params["b"] = truth * 2;
  return r;
}

// The fp32 lane's final parameters on weights AdamW makes noisy: cp 1 and cp N each 4e-5 from the truth (~6e-5
// apart) fail fp32_relative in fp32; rerun in fp64 (where they agree to 1e-12) they pass, with the fp32 error kept
// in the details. A CP bug is in the fp64 rerun as well and fails there; a tensor the fp32 candidate lacks fails.
TEST(FinalParams, TheFp32LaneJudgesNoisyParametersOnAnFp64RerunOfBothRuns) {
  const Tolerances tol;
  const auto truth = torch::randn({64, 32}, torch::kFloat64);
  const auto cp1 = params_run(1, truth, 4e-5, 1), cp4 = params_run(4, truth, 4e-5, 2);
  EXPECT_FALSE(final_params_within_fp32(tol, cp1, cp4));
  const auto fixed = judge_final_params(tol, cp1, cp4, nullptr, nullptr);
  EXPECT_EQ(fixed.status, report::Status::Fail);
  EXPECT_EQ(fixed.policy, report::Policy::Fp32Relative);

  const auto ref64 = params_run(1, truth, 1e-12, 3), cand64 = params_run(4, truth, 1e-12, 4);
  const Fp64Rerun rerun{&ref64, &cand64};
  const auto judged = judge_final_params(tol, cp1, cp4, nullptr, &rerun);
  EXPECT_EQ(judged.status, report::Status::Pass) << judged.message;
  EXPECT_EQ(judged.policy, report::Policy::Fp64Rerun);
  EXPECT_GT(judged.details.at("fp32_worst_rel_error_vs_cp1").get<double>(), 4e-5);
  EXPECT_LT(judged.details.at("worst_rel_error").get<double>(), 1e-10);

  const auto bug64 = params_run(4, truth, 1e-4, 5);
  const Fp64Rerun buggy{&ref64, &bug64};
  EXPECT_EQ(judge_final_params(tol, cp1, cp4, nullptr, &buggy).status, report::Status::Fail);
  auto missing = cp4;
  missing.final_params.erase("b");
  EXPECT_EQ(judge_final_params(tol, cp1, missing, nullptr, &rerun).status, report::Status::Fail);
  auto close = cp1;
  close.cp = 2;
  close.final_params["w"] = cp1.final_params.at("w") * (1 + 1e-7);
  EXPECT_TRUE(final_params_within_fp32(tol, cp1, close));
}

// Both runs start from the same weights, so cp N's final parameters differ from cp 1's only by their updates, which
// AdamW makes ~lr (1e-4) of the weights: a wrong update (weight decay dropped on one side) is 1e-7 of the weights
// and passes fp32_relative measured against them. Judged against the size of cp 1's update (update_norms), a
// difference of 1e-3 of the update fails and one of 1e-7 passes, over random shapes and scales; a tensor with no
// update (no token reached it) is judged at 1e-8 of the whole update, not against zero; and a reference without
// update norms (reference_cp > 1) falls back to the weights.
TEST(FinalParams, AreJudgedByTheUpdateTheReferenceMadeNotByTheWeights) {
  const Tolerances tol;
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    SCOPED_TRACE(trial);
    torch::manual_seed(trial);
    report::LaneRun cp1 = run_of({{4.8, 0.3}}, 1);
    auto candidate = [&](double update_share) {
      report::LaneRun r = run_of({{4.8, 0.3}}, 2);
      for (auto& [name, p] : cp1.final_params) {
        const auto d = torch::randn_like(p);
        const double u = cp1.update_norms.at(name);
        r.final_params[name] = p + d * ((u > 0 ? u : 1e-30) * update_share / d.norm().item<double>());
      }
      return r;
    };
    for (const char* name : {"a", "b", "frozen"}) {
      const auto shape = std::vector<int64_t>{1 + int64_t(rng() % 40), 1 + int64_t(rng() % 40)};
      const auto initial = torch::randn(shape, torch::kFloat64) * (0.01 + double(rng() % 100) / 10.0);
      const bool frozen = std::string(name) == "frozen";
      const auto update = frozen ? torch::zeros_like(initial) : torch::randn_like(initial) * (1e-4 * initial.norm() / initial.numel());
      cp1.final_params[name] = initial + update;
      cp1.update_norms[name] = update.norm().item<double>();
    }
    const auto wrong = candidate(1e-3), right = candidate(1e-7);
    const auto judged_wrong = judge_final_params(tol, cp1, wrong, nullptr, nullptr);
    EXPECT_EQ(judged_wrong.status, report::Status::Fail) << judged_wrong.message;
    EXPECT_FALSE(final_params_within_fp32(tol, cp1, wrong));
    const auto judged_right = judge_final_params(tol, cp1, right, nullptr, nullptr);
    EXPECT_EQ(judged_right.status, report::Status::Pass) << judged_right.message;
    EXPECT_TRUE(final_params_within_fp32(tol, cp1, right));
    // The frozen tensor: rounding noise far below 1e-8 of the whole update passes; a millionth of it fails.
    double whole = 0;
    for (auto& [name, u] : cp1.update_norms) whole += u * u;
    whole = std::sqrt(whole);
    auto noisy = right;
    noisy.final_params["frozen"] = cp1.final_params.at("frozen") + 1e-16 * whole / std::sqrt(double(cp1.final_params.at("frozen").numel()));
    EXPECT_EQ(judge_final_params(tol, cp1, noisy, nullptr, nullptr).status, report::Status::Pass);
    noisy.final_params["frozen"] = cp1.final_params.at("frozen") + 1e-6 * whole / std::sqrt(double(cp1.final_params.at("frozen").numel()));
    EXPECT_EQ(judge_final_params(tol, cp1, noisy, nullptr, nullptr).status, report::Status::Fail);
    // Without the reference's update norms the weights are the scale, and the wrong update hides under them.
    auto no_norms = cp1;
    no_norms.update_norms.clear();
    EXPECT_EQ(judge_final_params(tol, no_norms, wrong, nullptr, nullptr).status, report::Status::Pass);
  }
}

// Step-0 gradients of an ill-conditioned tensor: cp 1 is 6e-6 and cp N 1.1e-5 from the fp64 truth (1.25e-5 apart:
// beyond fp32_relative). Against the fp64 oracle cp N may be k x cp 1's own error + fp32_relative (2.2e-5): pass;
// a 1e-3 bug fails.
TEST(StepZeroGradients, TheFp32LaneJudgesNoisyGradientsAgainstAnFp64Oracle) {
  const Tolerances tol;
  const auto c = tiny_case();
  const auto truth = torch::randn({48, 16}, torch::kFloat64);
  auto with_grad = [&](int cp, double rel_err, int seed) {
    auto r = params_run(cp, truth, 0.0, seed);
    r.final_params.clear();
    torch::manual_seed(seed);
    auto noise = torch::randn_like(truth);
    r.grads["layers.0.self_attn.k_norm.weight"] = truth + noise * (rel_err * truth.norm() / noise.norm());
    return r;
  };
  const auto cp1 = with_grad(1, 6e-6, 11), cp2 = with_grad(2, 1.1e-5, 12), oracle = with_grad(1, 0.0, 13);
  ASSERT_FALSE(step0_grads_within_fp32(tol, cp1, cp2));
  auto grads_result = [&](const report::LaneRun& cand, const Fp64Rerun* fp64) {
    for (auto& r : check_training(c, tol, cp1, cand, nullptr, "", fp64))
      if (r.metric == "grad_tensors_worst_ratio_step0") return r;
    return CheckResult{};
  };
  EXPECT_EQ(grads_result(cp2, nullptr).status, report::Status::Fail);
  const Fp64Rerun fp64{&oracle, nullptr};
  const auto judged = grads_result(cp2, &fp64);
  EXPECT_EQ(judged.status, report::Status::Pass) << judged.message;
  EXPECT_EQ(judged.policy, report::Policy::Fp32OracleRelative);
  EXPECT_NEAR(judged.details.at("worst_allowed").get<double>(), 2 * 6e-6 + 1e-5, 1e-7);
  EXPECT_EQ(grads_result(with_grad(2, 1e-3, 14), &fp64).status, report::Status::Fail);

  // cp N 3.7 x beyond cp 1's error (CP's own rounding stages; a 35-layer checkpoint at cp 3): past the oracle
  // bound. With the cp N fp64 rerun, the CP arithmetic is judged there (1e-12 from the oracle: pass) and the fp32
  // error may be fp32_rerun_headroom x its bound; a bug in the rerun, or an fp32 error past the headroom, fails.
  const auto cp3 = with_grad(3, 6e-6 * 3.7, 15);
  EXPECT_FALSE(step0_grads_within_oracle(tol, cp1, cp3, oracle));
  EXPECT_TRUE(step0_grads_within_oracle(tol, cp1, cp2, oracle));
  EXPECT_EQ(grads_result(cp3, &fp64).status, report::Status::Fail);
  const auto cand64 = with_grad(3, 1e-12, 16), bug64 = with_grad(3, 1e-4, 17);
  const Fp64Rerun rerun{&oracle, &cand64};
  const auto on_rerun = grads_result(cp3, &rerun);
  EXPECT_EQ(on_rerun.status, report::Status::Pass) << on_rerun.message;
  EXPECT_EQ(on_rerun.policy, report::Policy::Fp64Rerun);
  EXPECT_EQ(on_rerun.details.at("tensors_judged_on_fp64_rerun").get<int>(), 1);
  EXPECT_GT(on_rerun.details.at("fp32_worst_ratio_of_those").get<double>(), 1.0);
  const Fp64Rerun buggy{&oracle, &bug64};
  EXPECT_EQ(grads_result(cp3, &buggy).status, report::Status::Fail);
  EXPECT_EQ(grads_result(with_grad(3, 1e-3, 18), &rerun).status, report::Status::Fail);  // 45 x its bound in fp32
  EXPECT_EQ(grads_result(cp2, &rerun).policy, report::Policy::Fp32OracleRelative);  // within the bound: not rerun
}

// Step-0 logits that miss fp32_relative against cp 1 are judged against the fp64 oracle at k x cp 1's own error +
// fp32_relative: cp 1's error, never the candidate's (with the candidate's own, an escalated result could not fail).
TEST(StepZeroLogits, TheOracleBoundIsSetByCp1sOwnError) {
  const Tolerances tol;
  const auto c = tiny_case();
  const auto truth = torch::randn({c.data.batch, c.data.seq_len, c.model.vocab_size}, torch::kFloat64);
  auto with_logits = [&](int cp, double rel_err, int seed) {
    auto r = run_of({{4.8, 0.3}}, cp);
    torch::manual_seed(seed);
    const auto noise = torch::randn_like(truth);
    r.logits = truth + noise * (rel_err * truth.norm() / noise.norm());
    return r;
  };
  auto logits_result = [&](const report::LaneRun& cp1, const report::LaneRun& cand, const Fp64Rerun* fp64) {
    for (auto& r : check_training(c, tol, cp1, cand, nullptr, "", fp64))
      if (r.metric.rfind("logits_rel_l2_step0", 0) == 0) return r;
    return CheckResult{};
  };
  const auto cp1 = with_logits(1, 1e-5, 21), oracle = with_logits(1, 0.0, 22);
  const Fp64Rerun fp64{&oracle, nullptr};
  const auto near = logits_result(cp1, with_logits(2, 1.5e-5, 23), &fp64);  // misses 1e-5 against cp 1, not the bound
  EXPECT_EQ(near.metric, "logits_rel_l2_step0_vs_fp64_oracle");
  EXPECT_EQ(near.status, report::Status::Pass) << near.message;
  const double bound = (tol.fp32_oracle_k * 1e-5 + tol.fp32_relative) * tol.scale(2);  // cp 1's 1e-5, at cp 2
  EXPECT_NEAR(near.threshold, bound, 1e-9);
  const auto far = logits_result(cp1, with_logits(2, 1e-3, 24), &fp64);  // 33 x the bound
  EXPECT_EQ(far.metric, "logits_rel_l2_step0_vs_fp64_oracle");
  EXPECT_EQ(far.status, report::Status::Fail) << far.message;
  EXPECT_NEAR(far.threshold, bound, 1e-9);
}

// From step 1 on, the fp32 runs train weights that AdamW's noise moved apart (what makes the final parameters a
// matter for fp64 reruns): a checkpoint's step-1 grad norm was 1.5e-5 off at cp 2 on a correct run. Where the reruns
// were made, steps >= 1 are judged between them (policy fp64_rerun, the fp32 figures kept); step 0 (same weights)
// stays in fp32; a bug that is in the reruns fails, at any step.
TEST(LaterSteps, TheFp32LaneJudgesStepsAfterTheFirstOnTheFp64Reruns) {
  const Tolerances tol;
  const auto c = tiny_case();
  auto steps = [](double loss1, double grad_norm1, double grad_norm0 = 0.5, int cp = 2) {
    report::LaneRun r = run_of({{4.8, grad_norm0}, {loss1, grad_norm1}, {4.7, 0.45}}, cp);
    return r;
  };
  const auto cp1 = steps(4.75, 0.4, 0.5, 1), cp2 = steps(4.75, 0.4 * (1 + 1.5e-5));
  EXPECT_FALSE(steps_within_fp32(tol, cp1, cp2, 1));
  EXPECT_TRUE(steps_within_fp32(tol, cp1, cp2, 0) == false);
  EXPECT_TRUE(steps_within_fp32(tol, cp1, steps(4.75, 0.4 * (1 + 1e-6)), 1));
  auto step_result = [&](const report::LaneRun& cand, const Fp64Rerun* fp64, int step) {
    for (auto& r : check_training(c, tol, cp1, cand, nullptr, "", fp64))
      if (r.name == "train.grad_norm_parity" && r.step == step) return r;
    return CheckResult{};
  };
  EXPECT_EQ(step_result(cp2, nullptr, 1).status, report::Status::Fail);
  const auto ref64 = steps(4.75, 0.41, 0.5, 1), cand64 = steps(4.75, 0.41 * (1 + 1e-12));
  const Fp64Rerun rerun{&ref64, &cand64};
  const auto judged = step_result(cp2, &rerun, 1);
  EXPECT_EQ(judged.status, report::Status::Pass) << judged.message;
  EXPECT_EQ(judged.policy, report::Policy::Fp64Rerun);
  EXPECT_NEAR(judged.details.at("fp32_rel_error").get<double>(), 1.5e-5, 1e-7);
  EXPECT_EQ(step_result(cp2, &rerun, 0).policy, report::Policy::Fp32Relative);  // step 0: the same weights
  EXPECT_EQ(step_result(steps(4.75, 0.4, 0.5 * (1 + 2e-5)), &rerun, 0).status, report::Status::Fail);
  const auto bug64 = steps(4.75, 0.41 * (1 + 1e-4));
  const Fp64Rerun buggy{&ref64, &bug64};
  EXPECT_EQ(step_result(cp2, &buggy, 1).status, report::Status::Fail);
  const auto loss_bug64 = steps(4.75 * (1 + 1e-4), 0.41);
  const Fp64Rerun loss_buggy{&ref64, &loss_bug64};
  bool loss_failed = false;
  for (auto& r : check_training(c, tol, cp1, cp2, nullptr, "", &loss_buggy))
    loss_failed |= r.name == "train.loss_parity" && r.step == 1 && r.status == report::Status::Fail;
  EXPECT_TRUE(loss_failed);

  // Step 0 on an ill-conditioned checkpoint (35 layers): cp 1's fp32 grad norm 0.87 % from the fp64 oracle, cp 3's
  // 0.8 % the other way (1.7 % from cp 1). Against the oracle: k x cp 1's error + fp32_relative; 5 % fails.
  const auto truth0 = steps(4.75, 0.41, 951.43, 1), cp1_0 = steps(4.75, 0.41, 951.43 * (1 - 0.0087), 1);
  const Fp64Rerun oracle_only{&truth0, nullptr};
  auto step0 = [&](double grad_norm0) {
    for (auto& r : check_training(c, tol, cp1_0, steps(4.75, 0.41, grad_norm0, 3), nullptr, "", &oracle_only))
      if (r.name == "train.grad_norm_parity" && r.step == 0) return r;
    return CheckResult{};
  };
  EXPECT_FALSE(steps_within_fp32(tol, cp1_0, steps(4.75, 0.41, 951.43 * 1.008, 3), 0));
  const auto noisy = step0(951.43 * 1.008);
  EXPECT_EQ(noisy.status, report::Status::Pass) << noisy.message;
  EXPECT_EQ(noisy.policy, report::Policy::Fp32OracleRelative);
  EXPECT_EQ(step0(951.43 * 1.05).status, report::Status::Fail);
  EXPECT_EQ(step0(951.43 * (1 - 0.0087) * (1 + 1e-6)).policy, report::Policy::Fp32Relative);  // within 1e-5 of cp 1
}

train::Case tiny_case() {
  return train::case_from_json(nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8}})"),
                               "t.json");
}

std::optional<CheckResult> step0_gradients(const std::vector<CheckResult>& results) {
  for (auto& r : results)
    if (r.metric == "grad_tensors_worst_ratio_step0") return r;
  return std::nullopt;
}

// One tensor of many off by 1e-4 (the fp32 lane allows 1e-5) fails, naming it, though the norm of all of them
// barely moves; a candidate that lacks a gradient fails too.
TEST(StepZeroGradients, OneTensorOutOfToleranceFailsAndIsNamed) {
  torch::manual_seed(3);
  report::LaneRun ref = run_of({{4.8, 1.0}}, 1), cand = run_of({{4.8, 1.0}}, 2);
  for (int i = 0; i < 20; ++i) {
    const auto g = torch::randn({16, 8}, torch::kFloat64);
    ref.grads["w" + std::to_string(i)] = g;
    cand.grads["w" + std::to_string(i)] = i == 7 ? g * (1 + 1e-4) : g.clone();
  }
  const auto c = tiny_case();
  auto res = step0_gradients(check_training(c, Tolerances{}, ref, cand, nullptr, ""));
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->name, "train.grad_norm_parity");
  EXPECT_EQ(res->status, report::Status::Fail);
  EXPECT_NEAR(res->observed, 10.0, 1e-6);  // 1e-4 / 1e-5
  EXPECT_EQ(res->details["worst_tensor"], "w7");
  cand.grads["w7"] = ref.grads["w7"].clone();
  EXPECT_EQ(step0_gradients(check_training(c, Tolerances{}, ref, cand, nullptr, ""))->status, report::Status::Pass);
  cand.grads.erase("w3");
  res = step0_gradients(check_training(c, Tolerances{}, ref, cand, nullptr, ""));
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, report::Status::Fail);
  EXPECT_EQ(res->details["worst_tensor"], "w3");
}

// bf16: a step at which cp 1 happens to land near the oracle does not shrink the bound below the error scale the
// earlier steps showed; a candidate above k x that scale still fails.
TEST(Bf16Bound, ALuckyStepKeepsTheErrorScaleOfTheStepsBefore) {
  auto oracle = run_of({{5.0, 1.0}, {4.9, 1.0}}, 1), ref = run_of({{5.0, 1.01}, {4.9, 1.0001}}, 1);
  oracle.lane = train::DtypeLane::kFp32;
  ref.lane = train::DtypeLane::kBf16;
  auto cand = run_of({{5.0, 1.01}, {4.9, 1.02}}, 2);
  cand.lane = train::DtypeLane::kBf16;
  Tolerances tol;
  tol.bf16_k = 3;
  auto step1 = [&](const report::LaneRun& k) {
    for (auto& r : check_training(tiny_case(), tol, ref, k, &oracle, ""))
      if (r.name == "train.grad_norm_parity" && r.step == 1) return r;
    return CheckResult{};
  };
  auto r = step1(cand);
  EXPECT_EQ(r.status, report::Status::Pass) << r.message;  // 0.02 <= 3 x 0.01 + 1e-3, not 3 x 1e-4 + 1e-3
  EXPECT_NEAR(r.threshold, 0.031, 1e-9);
  cand.steps[1].grad_norm = 1.04;
  EXPECT_EQ(step1(cand).status, report::Status::Fail);
}

// bf16 on weights the harness did not condition: one scalar draw or one tensor's draw is no error scale. The grad
// norm's bound starts from cp 1's error on the whole gradient vector (which bounds a norm's error), and a tensor's
// from the largest cp 1 error of the same tensor in any layer.
TEST(Bf16Bound, ScalesComeFromTheWholeGradientAndTheTensorsFamily) {
  torch::manual_seed(3);
  auto with_grads = [](report::LaneRun r, const std::map<std::string, torch::Tensor>& g) {
    r.grads = g;
    return r;
  };
  const auto truth = std::map<std::string, torch::Tensor>{
      {"layers.0.self_attn.q_norm.weight", torch::randn({64}, torch::kFloat64)},
      {"layers.1.self_attn.q_norm.weight", torch::randn({64}, torch::kFloat64)},
      {"embed_tokens.weight", torch::randn({32, 8}, torch::kFloat64)}};
  auto off = [&](double layer0, double layer1, double embed, int seed) {
    torch::manual_seed(seed);
    std::map<std::string, torch::Tensor> g;
    for (auto& [name, t] : truth) {
      const double e = name.rfind("layers.0", 0) == 0 ? layer0 : name.rfind("layers.1", 0) == 0 ? layer1 : embed;
      auto n = torch::randn_like(t);
      g[name] = t + n * (e * t.norm() / n.norm());
    }
    return g;
  };
  auto oracle = with_grads(run_of({{5.0, 1.0}}, 1), truth);
  oracle.lane = train::DtypeLane::kFp32;
  // cp 1: lucky in layer 0's q_norm (0.1 %) and in the scalar grad norm (1e-5), 10 % in layer 1's q_norm.
  auto ref = with_grads(run_of({{5.0, 1.00001}}, 1), off(0.001, 0.10, 0.01, 1));
  ref.lane = train::DtypeLane::kBf16;
  auto judged = [&](double layer0, double embed, double grad_norm) {
    auto cand = with_grads(run_of({{5.0, grad_norm}}, 2), off(layer0, 0.10, embed, 2));
    cand.lane = train::DtypeLane::kBf16;
    std::map<std::string, report::Status> out;
    for (auto& r : check_training(tiny_case(), Tolerances{}, ref, cand, &oracle, ""))
      if (r.name == "train.grad_norm_parity") out[r.metric] = r.status;
    return out;
  };
  auto ok = judged(0.08, 0.012, 1.004);
  EXPECT_EQ(ok["grad_tensors_worst_ratio_step0"], report::Status::Pass);  // 8 % <= 2 x 10 % (its family) + 1e-3
  EXPECT_EQ(ok["rel_abs_diff"], report::Status::Pass);                   // 0.4 % <= 2 x cp 1's vector error + 1e-3
  EXPECT_EQ(judged(0.08, 0.05, 1.004)["grad_tensors_worst_ratio_step0"], report::Status::Fail);  // the embedding's own scale
  EXPECT_EQ(judged(0.08, 0.012, 1.5)["rel_abs_diff"], report::Status::Fail);
}

// kvshare.loss_parity holds cp N's loss (with the share holder) to cp 1's; kvshare.bug_detected is its power: the
// dead-K/V path (no holder) must move the loss beyond the same tolerance, or the parity pass proves nothing. Judged
// against the lane's tolerance: fp32 1e-5, bf16 its floor.
TEST(KvShare, TheDeadKvPathMustMoveTheLossBeyondTheToleranceTheParityUses) {
  const train::Case c = tiny_case();
  ASSERT_GT(c.model.num_kv_shared_layers, 0);
  auto judged = [&](train::DtypeLane lane, double with_holder, double without) {
    auto ref = run_of({{5.0, 1.0}}, 1), with = run_of({{5.0 * (1 + with_holder), 1.0}}), dead = run_of({{5.0 * (1 + without), 1.0}});
    ref.lane = with.lane = dead.lane = lane;
    std::map<std::string, CheckResult> out;
    for (auto& r : check_kvshare(c, 2, Tolerances{}, ref, with, dead, true)) out.emplace(r.name, r);
    EXPECT_EQ(out.size(), 2u);
    return out;
  };
  const auto fp32 = train::DtypeLane::kFp32, bf16 = train::DtypeLane::kBf16;
  auto ok = judged(fp32, 0.0, 1e-3);
  EXPECT_EQ(ok.at("kvshare.loss_parity").status, report::Status::Pass);
  EXPECT_EQ(ok.at("kvshare.bug_detected").status, report::Status::Pass);
  EXPECT_EQ(judged(fp32, 2e-5, 1e-3).at("kvshare.loss_parity").status, report::Status::Fail);

  // A bug the case cannot see fails, saying why and what would make the case sensitive.
  const auto blind = judged(fp32, 0.0, 2e-6).at("kvshare.bug_detected");
  EXPECT_EQ(blind.status, report::Status::Fail);
  EXPECT_NEAR(blind.observed, 5.0, 1e-6);  // tolerance 1e-5 over a shift of 2e-6
  EXPECT_NE(blind.message.find("cannot see that bug"), std::string::npos) << blind.message;
  EXPECT_NE(blind.message.find("trained weights would"), std::string::npos) << blind.message;

  // bf16: the floor (1e-3) is the tolerance, for the parity and its power alike.
  EXPECT_EQ(judged(bf16, 5e-4, 5e-3).at("kvshare.loss_parity").status, report::Status::Pass);
  EXPECT_EQ(judged(bf16, 2e-3, 5e-3).at("kvshare.loss_parity").status, report::Status::Fail);
  EXPECT_EQ(judged(bf16, 0.0, 5e-3).at("kvshare.bug_detected").status, report::Status::Pass);
  const auto bf16_blind = judged(bf16, 0.0, 5e-4).at("kvshare.bug_detected");
  EXPECT_EQ(bf16_blind.status, report::Status::Fail);
  EXPECT_NE(bf16_blind.message.find("the fp32 lane would"), std::string::npos) << bf16_blind.message;
}

// train.rank_agreement: ranks that hold rank 0's figures bit for bit pass; one figure of one step a rounding off on
// one rank fails that rank alone, naming the step and the figure; a NaN on both sides agrees; a rank that recorded
// fewer steps fails.
TEST(RankAgreement, EveryRankHoldsRankZerosFiguresBitForBit) {
  auto run = run_of({{4.85, 0.3}, {4.80, 0.29}, {4.77, 0.31}}, 4);
  run.rank_steps.assign(4, run.steps);
  auto failing_ranks = [](const std::vector<CheckResult>& results) {
    std::vector<int> out;
    for (auto& r : results) {
      EXPECT_EQ(r.name, "train.rank_agreement");
      if (r.status != report::Status::Pass) out.push_back(r.rank.value_or(-1));
    }
    return out;
  };
  const auto all = check_rank_agreement(run);
  ASSERT_EQ(all.size(), 3u);  // ranks 1, 2, 3
  EXPECT_TRUE(failing_ranks(all).empty());
  auto off = run;
  off.rank_steps[2][1].grad_norm = std::nextafter(0.29, 1.0);
  const auto one = check_rank_agreement(off);
  EXPECT_EQ(failing_ranks(one), std::vector<int>{2});
  EXPECT_EQ(one[1].observed, 1.0);
  EXPECT_EQ(one[1].details.at("first_difference").at("step"), 1);
  EXPECT_EQ(one[1].details.at("first_difference").at("figure"), "grad_norm");
  auto nan = run;
  for (auto& rank : nan.rank_steps) rank[0].loss = std::nan("");
  EXPECT_TRUE(failing_ranks(check_rank_agreement(nan)).empty());
  nan.rank_steps[3][0].loss = 4.85;
  EXPECT_EQ(failing_ranks(check_rank_agreement(nan)), std::vector<int>{3});
  auto short_run = run;
  short_run.rank_steps[1].pop_back();
  EXPECT_EQ(failing_ranks(check_rank_agreement(short_run)), std::vector<int>{1});
  auto missing = run;
  missing.rank_steps.resize(2);  // ranks 2 and 3 recorded nothing
  EXPECT_EQ(failing_ranks(check_rank_agreement(missing)), (std::vector<int>{2, 3}));
}

}  // namespace
}  // namespace cpharness::check
