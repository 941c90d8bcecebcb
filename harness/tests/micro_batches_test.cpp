// Gradient accumulation (case key micro_batches): the batch's rows in M micro-batches, every micro-batch's loss sum
// divided by the global count of counted tokens of the whole step (over micro-batches and ranks), gradients summed
// over the ranks once, the grad norm taken on the sum before clipping. The oracle is the whole batch in one pass.
#include <gtest/gtest.h>

#include "harness/cp/cp_step.h"
#include "harness/io/input_error.h"
#include "harness/model/weights.h"
#include "harness/runner/selftest.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/tests/model_fixtures.h"
#include "harness/train/case.h"

namespace cpharness {
namespace {

train::Batch rows_of(const model::ModelConfig& c, int64_t padding, uint64_t seed) {
  train::BatchSpec spec;
  spec.seq_len = 40;
  spec.layout.padding = padding;
  spec.layout.document_lengths = {20, 20 - padding};
  spec.vocab_size = c.vocab_size;
  spec.seed = seed;
  return train::make_batch(spec);
}

train::Batch cat_rows(const train::Batch& a, const train::Batch& b) {
  auto cat = [](const torch::Tensor& x, const torch::Tensor& y) { return torch::cat({x, y}, 0); };
  return {cat(a.input_ids, b.input_ids), cat(a.labels, b.labels), cat(a.position_ids, b.position_ids),
          {cat(a.meta.document_ids, b.meta.document_ids), cat(a.meta.padding, b.meta.padding), {}}};
}

TEST(MicroBatches, TheStepTokenCountNormalisesMicroBatchesOfUnequalCounts) {
  const auto config = model::preset_config("tiny-e2b");
  // Unequal counted tokens (no padding, 12 padding tokens): a mean of micro-batch means would weigh them unequally.
  const auto a = rows_of(config, 0, 1), b = rows_of(config, 12, 2);
  const auto count = [](const train::Batch& x) { return (model::shift_labels(x.labels) != model::kIgnoreIndex).sum().item<int64_t>(); };
  ASSERT_NE(count(a), count(b));

  // The oracle: both rows in one batch, one pass, cp 1, fp64.
  auto ref = testing::make_model(config, torch::kFloat64);
  model::EagerAttention eager;
  model::KvShareHolder holder;
  model::ForwardOptions fo;
  fo.holder = &holder;
  const auto whole = cat_rows(a, b);
  auto loss = model::token_loss(ref->forward(testing::inputs_of(whole), eager, fo), model::shift_labels(whole.labels));
  auto mean = loss.sum / double(loss.count);
  mean.backward();
  const auto ref_grads = model::gradient_copies(ref, torch::kFloat64);
  const double ref_norm = train::grad_norm(ref->parameters());

  for (int cp : {1, 2, 3}) {
    SCOPED_TRACE(cp);
    std::vector<train::StepResult> results(static_cast<size_t>(cp));
    std::map<std::string, torch::Tensor> grads;
    cp::run_local(cp, [&](cp::Comm& comm) {
      train::OptimizerOptions o;
      o.lr = 0;  // the step's numbers, not the update
      cp::CpTrainer trainer(comm, testing::make_model(config, torch::kFloat64), o);
      std::map<std::string, torch::Tensor> mine;
      results[size_t(comm.rank())] = trainer.step(std::vector<train::Batch>{a, b}, nullptr, nullptr, &mine);
      if (comm.rank() == 0) grads = mine;
    });
    EXPECT_NEAR(results[0].loss, mean.item<double>(), 1e-12 * mean.item<double>());
    EXPECT_EQ(results[0].counted_tokens, loss.count);
    EXPECT_NEAR(results[0].grad_norm, ref_norm, 1e-10 * ref_norm);
    for (auto& [name, g] : ref_grads) {
      const double denom = g.norm().item<double>();
      const double err = (grads.at(name) - g).norm().item<double>();
      EXPECT_LE(denom > 0 ? err / denom : err, 1e-10) << name;
    }
  }
}

// The micro-batches of a step are its batch cut along the rows, in order: with two rows each, put back together they
// are the batch of the same case without micro-batches.
TEST(MicroBatches, TheMicroBatchesOfAStepPutTogetherAreItsBatch) {
  auto j = nlohmann::json::parse(R"({"id": "mb", "model": {"preset": "tiny-31b"},
    "data": {"batch": 6, "seq_len": 24, "document_lengths": [10, 9], "padding": 5, "seed": 4}, "steps": 2})");
  const auto whole = train::case_from_json(j, "mb.json");
  j["micro_batches"] = 3;
  const auto split = train::case_from_json(j, "mb.json");
  for (int64_t step : {0, 1}) {
    const auto full = train::micro_batches_for_step(whole, step);
    const auto parts = train::micro_batches_for_step(split, step);
    ASSERT_EQ(full.size(), 1u);
    ASSERT_EQ(parts.size(), 3u);
    std::vector<torch::Tensor> ids, labels, positions;
    for (auto& p : parts) {
      EXPECT_EQ(p.input_ids.size(0), 2);
      ids.push_back(p.input_ids), labels.push_back(p.labels), positions.push_back(p.position_ids);
    }
    EXPECT_TRUE(torch::equal(torch::cat(ids, 0), full[0].input_ids)) << step;
    EXPECT_TRUE(torch::equal(torch::cat(labels, 0), full[0].labels)) << step;
    EXPECT_TRUE(torch::equal(torch::cat(positions, 0), full[0].position_ids)) << step;
  }
}

TEST(MicroBatches, TheCaseKeyMustSplitTheRowsEvenly) {
  auto j = nlohmann::json::parse(R"({"id": "mb", "model": {"preset": "tiny-e2b"}, "data": {"batch": 4, "seq_len": 32}})");
  j["micro_batches"] = 2;
  EXPECT_EQ(train::case_from_json(j, "mb.json").micro_batches, 2);
  EXPECT_EQ(train::micro_batches_for_step(train::case_from_json(j, "mb.json"), 0).size(), 2u);
  for (auto bad : {nlohmann::json(3), nlohmann::json(0), nlohmann::json("2")}) {
    j["micro_batches"] = bad;
    try {
      train::case_from_json(j, "mb.json");
      ADD_FAILURE() << "accepted micro_batches " << bad.dump();
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.subject(), "micro_batches") << e.what();
    }
  }
}

TEST(MicroBatches, EveryCheckPassesAndCountsScaleWithTheMicroBatches) {
  auto c = runner::selftest_case("micro_batches");
  c.cp_sizes = {2, 3};
  const auto rep = runner::run_case(c, runner::SuiteOptions{});
  ASSERT_FALSE(rep.error) << *rep.error;
  testing::expect_no_failed_check(rep);
  const auto resets = testing::results_of(rep, "cache.generation_reset");
  for (auto& k : resets) EXPECT_EQ(k.details.at("expected_resets_per_step"), 2);
  EXPECT_EQ(resets.size(), 2u + 3u);
}

}  // namespace
}  // namespace cpharness
