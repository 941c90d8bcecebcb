// Activation checkpointing of whole decoder layers with KV sharing (case key activation_checkpointing): the question
// the seed and upstream disagree on, settled by the harness's own checks. With the shared K/V crossing the checkpoint
// through the share holder (kv_holder) every check passes; with the layer alone checkpointed (layer_only, what
// torch.utils.checkpoint(use_reentrant=True) around each layer does) the gradient of the source layers' K/V
// projections loses every consumer's share, and only on a model that shares K/V.
#include <gtest/gtest.h>

#include "harness/io/input_error.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/selftest.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

using model::ActivationCheckpointing;

report::CaseReport run_with(train::Case c, ActivationCheckpointing checkpointing, std::vector<int64_t> cps) {
  c.activation_checkpointing = checkpointing;
  c.cp_sizes = std::move(cps);
  return run_case(c, SuiteOptions{});
}

TEST(ActivationCheckpointing, WithTheKvHolderEveryCheckPasses) {
  for (const char* variant : {"default", "stream", "micro_batches"}) {
    SCOPED_TRACE(variant);
    const auto rep = run_with(selftest_case(variant), ActivationCheckpointing::kKvHolder, {2, 3});
    ASSERT_FALSE(rep.error) << *rep.error;
    testing::expect_no_failed_check(rep);
    int parity = 0;
    for (auto& k : testing::results_of(rep, "train.grad_norm_parity")) parity += k.status == report::Status::Pass;
    EXPECT_GT(parity, 0);
  }
}

TEST(ActivationCheckpointing, TheLayerAloneLosesTheSharedKvGradientOnlyWithKvSharing) {
  auto sharing = selftest_case("default");  // layers 4..7 read the K/V of layers 2 and 3
  ASSERT_GT(sharing.model.num_kv_shared_layers, 0);
  sharing.checks = {"train.grad_norm_parity"};
  const auto rep = run_with(sharing, ActivationCheckpointing::kLayerOnly, {2});
  ASSERT_FALSE(rep.error) << *rep.error;
  int failures = 0;
  std::string first_divergence;
  for (auto& k : rep.checks)
    if (k.name == "train.grad_norm_parity" && k.status == report::Status::Fail) {
      ++failures;
      if (first_divergence.empty()) first_divergence = k.message;
    }
  EXPECT_GT(failures, 0);
  // The first tensor to diverge belongs to a source layer's K/V path (layer 2 or 3).
  EXPECT_TRUE(first_divergence.find("layers.2.") != std::string::npos ||
              first_divergence.find("layers.3.") != std::string::npos) << first_divergence;

  auto no_sharing = sharing;
  no_sharing.model.num_kv_shared_layers = 0;
  testing::expect_no_failed_check(run_with(no_sharing, ActivationCheckpointing::kLayerOnly, {2}));
}

TEST(ReferenceCheckpointing, TheReferenceRecomputingGivesTheNumbersOfTheOneThatKeepsActivations) {
  for (const char* variant : {"default", "micro_batches"}) {  // KV sharing through the holder; cache-gated semantics
    SCOPED_TRACE(variant);
    auto keeps = selftest_case(variant);
    ASSERT_GT(keeps.model.num_kv_shared_layers, 0);
    auto recomputes = keeps;
    recomputes.reference_checkpointing = true;
    const auto a = run_reference(keeps, train::DtypeLane::kFp32);
    const auto b = run_reference(recomputes, train::DtypeLane::kFp32);
    ASSERT_EQ(a.steps.size(), b.steps.size());
    for (size_t s = 0; s < a.steps.size(); ++s) {
      EXPECT_EQ(a.steps[s].loss, b.steps[s].loss) << "step " << s;
      EXPECT_EQ(a.steps[s].grad_norm, b.steps[s].grad_norm) << "step " << s;
      EXPECT_EQ(a.steps[s].param_norm, b.steps[s].param_norm) << "step " << s;
    }
    for (auto& [name, g] : a.grads) EXPECT_TRUE(torch::equal(b.grads.at(name), g)) << name;
    for (auto& [name, p] : a.final_params) EXPECT_TRUE(torch::equal(b.final_params.at(name), p)) << name;
    // The whole case, with the candidates checkpointing too: every check passes against it.
    recomputes.cp_sizes = {2};
    recomputes.activation_checkpointing = ActivationCheckpointing::kKvHolder;
    testing::expect_no_failed_check(run_case(recomputes, SuiteOptions{}));
  }
}

// The candidates' checkpointing is theirs to test: a ring reference (reference_cp > 1) must not inherit it, or the
// layer-only mode's lost K/V gradient would reach the run that judges it.
TEST(ReferenceCheckpointing, TheCandidatesLayerOnlyModeNeverReachesARingReference) {
  auto c = selftest_case("default");
  c.checks = {"train.grad_norm_parity"};
  c.reference_cp = 2;
  const auto plain = run_with(c, ActivationCheckpointing::kOff, {3});
  const auto layer_only = run_with(c, ActivationCheckpointing::kLayerOnly, {3});
  ASSERT_FALSE(plain.error) << *plain.error;
  ASSERT_FALSE(layer_only.error) << *layer_only.error;
  // The reference (cp 2) is the same run whatever the candidates do ...
  EXPECT_EQ(plain.trajectories.at(2).grad_norm, layer_only.trajectories.at(2).grad_norm);
  EXPECT_EQ(plain.trajectories.at(2).loss, layer_only.trajectories.at(2).loss);
  // ... and judges the layer-only candidate wrong.
  int failures = 0;
  for (auto& k : testing::results_of(layer_only, "train.grad_norm_parity")) failures += k.status == report::Status::Fail;
  EXPECT_GT(failures, 0);
}

TEST(ActivationCheckpointing, TheCaseKeyTakesABooleanOrAModeName) {
  auto j = nlohmann::json::parse(R"({"id": "ac", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 32}})");
  j["activation_checkpointing"] = true;
  EXPECT_EQ(train::case_from_json(j, "ac.json").activation_checkpointing, ActivationCheckpointing::kKvHolder);
  j["activation_checkpointing"] = "layer_only";
  EXPECT_EQ(train::case_from_json(j, "ac.json").activation_checkpointing, ActivationCheckpointing::kLayerOnly);
  for (auto bad : {nlohmann::json("everything"), nlohmann::json(1)}) {
    j["activation_checkpointing"] = bad;
    try {
      train::case_from_json(j, "ac.json");
      ADD_FAILURE() << "accepted " << bad.dump();
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.subject(), "activation_checkpointing") << e.what();
    }
  }
}

}  // namespace
}  // namespace cpharness::runner
