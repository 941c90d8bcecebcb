// Memory at real size for ranks as threads: the gradient all-reduce goes in buckets (one bucket of extra memory,
// not an fp32 copy of every gradient), and the rank threads share one copy of the weights (each rank its own
// gradients, rank 0 alone updating the copy). Both must leave every number exactly as it was.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <random>

#include "harness/cp/comm.h"
#include "harness/cp/cp_step.h"
#include "harness/io/safetensors.h"
#include "harness/model/attention_backend.h"
#include "harness/model/weights.h"
#include "harness/runner/case_runner.h"
#include "harness/tests/model_fixtures.h"
#include "harness/train/case.h"

namespace cpharness {
namespace {

// Parameters of assorted shapes (one empty) with rank-specific random gradients, some absent.
std::vector<torch::Tensor> parameters_with_gradients(int rank, torch::ScalarType dtype, uint64_t seed) {
  torch::manual_seed(seed);  // the same shapes and absences on every rank
  std::mt19937_64 shapes(seed);
  std::vector<torch::Tensor> params;
  const int count = 3 + int(shapes() % 6);
  for (int i = 0; i < count; ++i) {
    const int64_t rows = int64_t(shapes() % 5), cols = 1 + int64_t(shapes() % 9);
    auto p = torch::zeros({rows, cols}, torch::dtype(dtype)).requires_grad_();
    if (shapes() % 4 != 0) p.mutable_grad() = torch::randn({rows, cols}, torch::dtype(torch::kFloat64)).mul(rank + 1).to(dtype);
    params.push_back(p);
  }
  return params;
}

TEST(GradientBuckets, AnyBucketSumsInRankOrderAsOneFlatCollectiveWould) {
  constexpr int kRanks = 3;
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    SCOPED_TRACE(seed);
    const auto dtype = seed % 2 ? torch::kBFloat16 : torch::kFloat32;
    // The oracle: each gradient summed in rank order in fp32 (absent ones as zeros), cast back.
    std::vector<std::vector<torch::Tensor>> inputs;
    for (int r = 0; r < kRanks; ++r) inputs.push_back(parameters_with_gradients(r, dtype, seed));
    std::vector<torch::Tensor> expected;
    int64_t total = 0;
    for (size_t i = 0; i < inputs[0].size(); ++i) {
      auto sum = torch::zeros(inputs[0][i].sizes(), torch::kFloat32);
      for (int r = 0; r < kRanks; ++r)
        if (inputs[size_t(r)][i].grad().defined()) sum = sum + inputs[size_t(r)][i].grad().to(torch::kFloat32);
      expected.push_back(sum.to(dtype));
      total += inputs[0][i].numel();
    }
    const int64_t bucket = 1 + int64_t(std::mt19937_64(seed * 7)() % uint64_t(total + 4));
    std::vector<int64_t> calls(kRanks);
    cp::run_local(kRanks, [&](cp::Comm& comm) {
      auto& mine = inputs[size_t(comm.rank())];
      cp::all_reduce_gradients(comm, mine, bucket);
      calls[size_t(comm.rank())] = comm.stats().ops(cp::CommOp::AllReduce);
    });
    for (int r = 0; r < kRanks; ++r) {
      EXPECT_EQ(calls[size_t(r)], (total + bucket - 1) / bucket);
      EXPECT_EQ(calls[size_t(r)], cp::gradient_all_reduce_calls(inputs[size_t(r)], bucket));
      for (size_t i = 0; i < expected.size(); ++i) {
        ASSERT_TRUE(inputs[size_t(r)][i].grad().defined());
        EXPECT_TRUE(torch::equal(inputs[size_t(r)][i].grad(), expected[i])) << "rank " << r << " parameter " << i;
      }
    }
  }
}

TEST(SharedWeights, ARankModelAliasesTheWeightsAndKeepsItsOwnGradients) {
  auto source = testing::make_model("tiny-e4b");
  auto alias = model::model_sharing_weights(source);
  const auto theirs = source->named_parameters();
  for (auto& p : alias->named_parameters()) {
    EXPECT_EQ(p.value().data_ptr(), theirs[p.key()].data_ptr()) << p.key();
    EXPECT_TRUE(p.value().requires_grad()) << p.key();
  }
  for (auto& b : alias->named_buffers()) EXPECT_EQ(b.value().data_ptr(), source->named_buffers()[b.key()].data_ptr());
  {
    torch::NoGradGuard no_grad;
    source->norm->weight.add_(1.0);  // an update through one model is an update of the other
  }
  EXPECT_TRUE(torch::equal(alias->norm->weight, source->norm->weight));
  const auto batch = testing::structured_batch(source->config());
  model::EagerAttention eager;
  auto logits = alias->forward(testing::inputs_of(batch), eager);
  logits.sum().backward();
  EXPECT_TRUE(alias->norm->weight.grad().defined());
  for (auto& p : source->parameters()) EXPECT_FALSE(p.grad().defined());
}

train::Case training_case(const std::string& preset, const std::string& ring_mode) {
  auto j = nlohmann::json::parse(R"({"id": "shared", "data": {"seq_len": 40, "document_lengths": [22, 12],
    "padding": 6, "seed": 4}, "steps": 3, "optimizer": {"lr": 0.001}, "block_size": 8})");
  j["model"] = {{"preset", preset}};
  j["ring"] = {{"mode", ring_mode}};
  return train::case_from_json(j, "shared.json");
}

TEST(SharedWeights, RanksSharingOneCopyTrainExactlyAsRanksWithModelsOfTheirOwn) {
  for (const auto& [preset, mode, n] : std::vector<std::tuple<std::string, std::string, int>>{
           {"tiny-e4b", "collect", 3}, {"tiny-31b", "stream", 2}}) {
    SCOPED_TRACE(preset + " " + mode);
    const auto c = training_case(preset, mode);
    runner::RunOptions o;
    o.ring.q_block = c.q_block;
    o.ring.kv_block = c.kv_block;
    o.ring.mode = mode == "stream" ? cp::RingMode::kStream : cp::RingMode::kCollect;
    const auto shared = runner::run_cp(c, train::DtypeLane::kFp32, n, o);
    std::vector<report::CpRankRecord> ranks(static_cast<size_t>(n));
    cp::run_local(n, [&](cp::Comm& comm) { ranks[size_t(comm.rank())] = runner::run_cp_rank(comm, c, train::DtypeLane::kFp32, o); });
    const auto own = runner::assemble_cp_run(c, train::DtypeLane::kFp32, cp::Sharding::kContiguous, std::move(ranks), 0,
                                             torch::kCPU, 1);
    ASSERT_EQ(shared.steps.size(), own.steps.size());
    for (size_t s = 0; s < own.steps.size(); ++s) {
      EXPECT_EQ(shared.steps[s].loss, own.steps[s].loss) << "step " << s;
      EXPECT_EQ(shared.steps[s].grad_norm, own.steps[s].grad_norm) << "step " << s;
      EXPECT_EQ(shared.steps[s].param_norm, own.steps[s].param_norm) << "step " << s;  // one update, not n
    }
    ASSERT_EQ(shared.final_params.size(), own.final_params.size());
    for (auto& [name, value] : own.final_params) EXPECT_TRUE(torch::equal(shared.final_params.at(name), value)) << name;
    for (auto& [name, value] : own.grads) EXPECT_TRUE(torch::equal(shared.grads.at(name), value)) << name;
  }
}

}  // namespace
}  // namespace cpharness

namespace cpharness {
namespace {

// Builds copy one cached initialisation per case; a checkpoint rewritten under the same name must be read again.
TEST(InitialWeightsCache, ACheckpointRewrittenUnderTheSameNameIsReadAgain) {
  const auto dir = std::filesystem::temp_directory_path() / ("cpharness-initial-weights-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto file = (dir / "model.safetensors").string();
  auto c = training_case("tiny-e2b", "collect");
  auto write = [&](uint64_t seed) {
    auto m = testing::make_model(c.model, torch::kFloat32, seed);
    io::write_safetensors(file, model::model_tensors(m));
    return model::parameter_copies(m, torch::kFloat32);
  };
  c.checkpoint = file;
  const auto first = write(11);
  auto a = runner::build_model(c, torch::kFloat32);
  for (auto& [name, value] : model::parameter_copies(a, torch::kFloat32)) EXPECT_TRUE(torch::equal(value, first.at(name))) << name;
  const auto second = write(12);
  auto b = runner::build_model(c, torch::kFloat32);
  for (auto& [name, value] : model::parameter_copies(b, torch::kFloat32)) EXPECT_TRUE(torch::equal(value, second.at(name))) << name;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace cpharness
