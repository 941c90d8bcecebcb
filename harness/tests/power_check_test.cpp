// The power check (can a case see a CP-shaped bug?) and the did-it-train check on a dead model.
#include <gtest/gtest.h>

#include <random>

#include "harness/cp/cp_step.h"
#include "harness/cp/shard_plan.h"
#include "harness/model/gemma4.h"
#include "harness/model/weights.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

train::Case make_case(const std::string& extra = "{}") {
  auto j = nlohmann::json::parse(R"({"id": "p", "model": {"preset": "tiny-31b"},
    "data": {"seq_len": 32, "document_lengths": [14, 12], "padding": 6, "seed": 3}, "steps": 2, "cp": [2, 4]})");
  j.merge_patch(nlohmann::json::parse(extra));
  return train::case_from_json(j, "p.json");
}

std::vector<const report::CheckResult*> named(const report::CaseReport& r, const std::string& name) {
  std::vector<const report::CheckResult*> out;
  for (auto& k : r.checks)
    if (k.name == name) out.push_back(&k);
  return out;
}

TEST(PowerCheck, ACaseWithTheLanesTolerancesSeesADroppedBoundaryLabel) {
  const auto r = run_case(make_case(), SuiteOptions{});
  ASSERT_FALSE(r.error) << *r.error;
  const auto power = named(r, "power.boundary_label");
  ASSERT_EQ(power.size(), 2u);  // one per cp
  for (auto* k : power) {
    EXPECT_EQ(k->status, report::Status::Pass) << k->message;
    EXPECT_NE(k->details["seen_by"].dump().find("train.loss_parity"), std::string::npos) << k->details.dump();
  }
  EXPECT_EQ(r.status(), report::Status::Pass);
}

TEST(PowerCheck, ToleranceOfOneMakesTheCaseInsensitive) {
  const auto r = run_case(make_case(R"({"tolerances": {"fp32_relative": 1}})"), SuiteOptions{});
  ASSERT_FALSE(r.error) << *r.error;
  const auto power = named(r, "power.boundary_label");
  ASSERT_FALSE(power.empty());
  for (auto* k : power) {
    EXPECT_EQ(k->status, report::Status::Fail);
    EXPECT_NE(k->message.find("insensitive"), std::string::npos) << k->message;
    EXPECT_NE(k->message.find("dropping the label of token"), std::string::npos) << k->message;
  }
  EXPECT_EQ(r.status(), report::Status::Fail);
}

// The bf16 lane's slack (k x cp 1's error + floor) hides one dropped label from the loss and the grad norm; the
// step-0 gradients, tensor by tensor, see it (the label's row of the tied embedding moves by about 10%).
TEST(PowerCheck, TheBf16LaneSeesItThroughTheStep0Gradients) {
  const auto c = make_case(R"({"model": {"preset": "tiny-e4b"}, "dtype": "bf16", "cp": [2], "tolerances": {"bf16_k": 3},
    "data": {"seq_len": 48, "document_lengths": [20, 22], "padding": 6}})");
  const auto r = run_case(c, SuiteOptions{});
  ASSERT_FALSE(r.error) << *r.error;
  const auto power = named(r, "power.boundary_label");
  ASSERT_EQ(power.size(), 1u);
  EXPECT_EQ(power[0]->status, report::Status::Pass) << power[0]->message;
  EXPECT_NE(power[0]->details["seen_by"].dump().find("train.grad_norm_parity"), std::string::npos) << power[0]->details.dump();
  // How near the perturbed run came to each selected check's bound: past it where seen, under it where not.
  const auto& nearest = power[0]->details.at("perturbed_nearest_to_bound");
  EXPECT_GT(nearest.at("train.grad_norm_parity").at("observed_over_threshold").get<double>(), 1.0) << nearest.dump();
  EXPECT_LE(nearest.at("train.loss_parity").at("observed_over_threshold").get<double>(), 1.0) << nearest.dump();
  int gradient_results = 0;
  for (auto* k : named(r, "train.grad_norm_parity"))
    if (k->metric == "grad_tensors_worst_ratio_step0") {
      ++gradient_results;
      EXPECT_EQ(k->status, report::Status::Pass) << k->message;  // the unperturbed candidate is within the bound
    }
  EXPECT_EQ(gradient_results, 1);
}

TEST(PowerCheck, CountChecksAloneMakeItNotApplicable) {
  const auto r = run_case(make_case(R"({"checks": ["cache.", "ring."]})"), SuiteOptions{});
  ASSERT_FALSE(r.error) << *r.error;
  const auto power = named(r, "power.boundary_label");
  ASSERT_FALSE(power.empty());
  for (auto* k : power) {
    EXPECT_EQ(k->status, report::Status::Skipped);
    EXPECT_NE(k->message.find("not applicable"), std::string::npos) << k->message;
  }
}

// The perturbed token against a brute-force oracle: labels shifted on the whole sequence, cut into contiguous
// shards of the plan's length; the first counted target of the first rank > 0 that has one, in row 0, else in the
// first later row with one there (rows laid out apart: row 0 may be padding past its first shard).
TEST(PowerCheck, TheBoundaryLabelIsTheFirstCountedTargetOfTheFirstRankAfterZero) {
  std::mt19937_64 rng(11);
  int later_rows = 0, none = 0;
  for (int trial = 0; trial < 120; ++trial) {
    const int64_t S = 4 + int64_t(rng() % 60), B = 1 + int64_t(rng() % 3);
    const int cp = 2 + int(rng() % std::min<int64_t>(6, S - 1));
    nlohmann::json j = {{"id", "b"}, {"model", {{"preset", "tiny-e2b"}}},
                        {"data", {{"seq_len", S}, {"batch", B}, {"seed", trial}}}};
    nlohmann::json rows = nlohmann::json::array();
    for (int64_t b = 0; b < B; ++b) {
      // Up to all but two tokens padding, so that rows whose real tokens end in shard 0 are common.
      const int64_t pad = int64_t(rng() % size_t(S - 1));
      nlohmann::json row = {{"padding", pad}};
      if (rng() % 2 && S - pad >= 4) row["document_lengths"] = {(S - pad) / 2, S - pad - (S - pad) / 2};
      rows.push_back(row);
    }
    j["data"]["rows"] = rows;
    const auto c = train::case_from_json(j, "b.json");
    const auto batch = train::batch_for_step(c, 0);
    const auto got = cp::boundary_label_target(batch, cp, 0);
    const cp::ShardPlan plan(S, cp);
    const auto shifted = model::shift_labels(batch.labels);
    cp::BoundaryLabel want;
    for (int64_t b = 0; b < B && want.rank < 0; ++b)
      for (int r = 1; r < cp && want.rank < 0; ++r)
        for (int64_t i = 0; i < plan.local_len(); ++i) {
          const int64_t g = r * plan.local_len() + i;
          if (g < S && shifted[b][g].item<int64_t>() != model::kIgnoreIndex) {
            want = {r, b, i, g};
            break;
          }
        }
    later_rows += want.row > 0;
    none += want.rank < 0;
    EXPECT_EQ(got.rank, want.rank) << "trial " << trial;
    EXPECT_EQ(got.row, want.row) << "trial " << trial;
    EXPECT_EQ(got.local_index, want.local_index) << "trial " << trial;
    EXPECT_EQ(got.global_index, want.global_index) << "trial " << trial;
  }
  EXPECT_GT(later_rows, 5);  // the oracle's cases include targets past row 0, and batches with none at all
  EXPECT_GT(none, 0);
}

TEST(TrainedCheck, TwoDeadModelsAgreeingFailEveryRun) {
  SuiteOptions o;
  o.run.zero_weights = true;
  const auto r = run_case(make_case(), o);
  ASSERT_FALSE(r.error) << *r.error;
  const auto trained = named(r, "train.trained");
  ASSERT_EQ(trained.size(), 3u);  // the reference and both candidates
  for (auto* k : trained) {
    EXPECT_EQ(k->status, report::Status::Fail) << k->message;
    EXPECT_NE(k->message.find("did not train"), std::string::npos) << k->message;
  }
  EXPECT_EQ(r.status(), report::Status::Fail);
}

// "record_tensors": false keeps no tensors (real sizes): the checks that need them say so instead of passing.
TEST(RecordTensors, OffSkipsTheTensorChecksAndSaysSo) {
  const auto r = run_case(make_case(R"({"record_tensors": false})"), SuiteOptions{});
  ASSERT_FALSE(r.error) << *r.error;
  int skipped_params = 0;
  for (auto* k : named(r, "train.param_parity"))
    if (k->status == report::Status::Skipped) {
      ++skipped_params;
      EXPECT_NE(k->message.find("not recorded"), std::string::npos) << k->message;
    }
  EXPECT_EQ(skipped_params, 2);  // one per cp size
  for (auto* k : named(r, "train.loss_parity")) EXPECT_NE(k->metric, "logits_rel_l2_step0");
  EXPECT_EQ(r.status(), report::Status::Pass);
}

// lr 0: the optimizer step is skipped (AdamW would change nothing and allocate two states per parameter); the weights
// stay bit for bit, and every step still trains on its own batch.
TEST(ZeroLr, SkipsTheOptimizerAndKeepsEveryParameter) {
  const auto c = make_case(R"({"optimizer": {"lr": 0}, "steps": 3})");
  auto model = build_model(c, torch::kFloat32);
  const auto initial = model::parameter_copies(model, torch::kFloat64);
  const auto run = run_reference(c, train::DtypeLane::kFp32);
  ASSERT_EQ(run.final_params.size(), initial.size());
  for (auto& [name, p] : initial) EXPECT_TRUE(torch::equal(run.final_params.at(name), p)) << name;
  for (auto& s : run.steps) EXPECT_EQ(s.param_norm, run.steps[0].param_norm);
  EXPECT_NE(run.steps[1].loss, run.steps[0].loss);
  const auto cand = run_cp(c, train::DtypeLane::kFp32, 2);
  for (auto& [name, p] : initial) EXPECT_TRUE(torch::equal(cand.final_params.at(name), p)) << name;
}

}  // namespace
}  // namespace cpharness::runner
