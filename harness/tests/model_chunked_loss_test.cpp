// The chunked LM head + cross entropy against the plain path (softcap(linear(h, W)) then token_loss): loss and
// both gradients, random shapes, chunk sizes from 1 to beyond the token count, with and without the softcap and
// ignored labels; and whole-model training steps with the case option against the plain loss.
#include <gtest/gtest.h>

#include <random>

#include "harness/model/chunked_loss.h"
#include "harness/runner/case_runner.h"
#include "harness/train/case.h"

namespace cpharness::model {
namespace {

struct Grads {
  double loss;
  int64_t count;
  torch::Tensor dh, dw;
};

Grads run(const torch::Tensor& h0, const torch::Tensor& w0, const torch::Tensor& labels, std::optional<double> cap,
          int64_t chunk) {
  auto h = h0.detach().requires_grad_(true), w = w0.detach().requires_grad_(true);
  TokenLoss loss;
  if (chunk == 0) {
    auto logits = torch::linear(h, w);
    if (cap) logits = softcap(logits, *cap);
    loss = token_loss(logits, labels);
  } else {
    loss = chunked_token_loss(h, w, cap, labels, chunk);
  }
  (loss.sum * 0.37).backward();  // a non-unit upstream gradient reaches every chunk
  return {loss.sum.item<double>(), loss.count, h.grad(), w.grad()};
}

double rel(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).norm().item<double>() / b.norm().item<double>(); }

TEST(ChunkedLoss, EqualsThePlainLossAndItsGradientsOnRandomProblems) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t B = 1 + int64_t(rng() % 2), S = 1 + int64_t(rng() % 37), H = 4 + int64_t(rng() % 13),
                  V = 5 + int64_t(rng() % 60);
    const auto dtype = trial % 2 ? torch::kFloat64 : torch::kFloat32;
    torch::manual_seed(trial);
    auto h = torch::randn({B, S, H}, dtype), w = torch::randn({V, H}, dtype) * 0.5;
    auto labels = torch::randint(0, V, {B, S}, torch::kInt64);
    labels.masked_fill_(torch::rand({B, S}) < 0.3, kIgnoreIndex);
    const std::optional<double> cap = trial % 3 ? std::optional<double>(30.0) : std::nullopt;
    const auto plain = run(h, w, labels, cap, 0);
    const double tol = dtype == torch::kFloat64 ? 1e-12 : 2e-6;
    for (int64_t chunk : {int64_t(1), int64_t(1 + rng() % 9), B * S, B * S + 5}) {
      const auto c = run(h, w, labels, cap, chunk);
      const std::string what = "trial " + std::to_string(trial) + " chunk " + std::to_string(chunk);
      EXPECT_EQ(c.count, plain.count) << what;
      EXPECT_NEAR(c.loss, plain.loss, tol * std::max(1.0, std::abs(plain.loss))) << what;
      if (plain.count == 0) continue;
      EXPECT_LE(rel(c.dh, plain.dh), tol) << what;
      EXPECT_LE(rel(c.dw, plain.dw), tol) << what;
    }
  }
}

TEST(ChunkedLoss, RejectsABadChunkSize) {
  auto h = torch::randn({1, 3, 4}), w = torch::randn({5, 4});
  auto labels = torch::zeros({1, 3}, torch::kInt64);
  EXPECT_THROW(chunked_token_loss(h, w, 30.0, labels, 0), c10::Error);
}

// A whole case trained with "loss_chunk_tokens" against the same case with the plain loss: the cp 1 reference and
// a cp 2 candidate, fp64 (summation order is the only difference).
TEST(ChunkedLoss, TrainingWithTheCaseOptionMatchesThePlainLoss) {
  auto j = nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"},
    "data": {"seq_len": 32, "document_lengths": [20, 12], "seed": 4}, "steps": 2, "dtype": "fp64"})");
  const auto plain = train::case_from_json(j, "plain.json");
  j["loss_chunk_tokens"] = 5;
  const auto chunked = train::case_from_json(j, "chunked.json");
  EXPECT_EQ(chunked.loss_chunk_tokens, 5);
  const auto a = runner::run_reference(plain, train::DtypeLane::kFp64);
  const auto b = runner::run_reference(chunked, train::DtypeLane::kFp64);
  const auto ca = runner::run_cp(plain, train::DtypeLane::kFp64, 2);
  const auto cb = runner::run_cp(chunked, train::DtypeLane::kFp64, 2);
  for (size_t s = 0; s < a.steps.size(); ++s) {
    EXPECT_NEAR(b.steps[s].loss, a.steps[s].loss, 1e-12 * a.steps[s].loss);
    EXPECT_NEAR(b.steps[s].grad_norm, a.steps[s].grad_norm, 1e-10 * a.steps[s].grad_norm);
    EXPECT_NEAR(cb.steps[s].loss, ca.steps[s].loss, 1e-12 * ca.steps[s].loss);
    EXPECT_NEAR(cb.steps[s].grad_norm, ca.steps[s].grad_norm, 1e-10 * ca.steps[s].grad_norm);
  }
  EXPECT_TRUE(a.logits.defined());
  EXPECT_FALSE(b.logits.defined()) << "the chunked loss never makes the logits";
  EXPECT_EQ(b.hidden.size(), a.hidden.size());
  EXPECT_EQ(cb.hidden.size(), ca.hidden.size());
}

TEST(ChunkedLoss, TheCaseKeyIsValidated) {
  auto j = nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8}})");
  j["loss_chunk_tokens"] = 0;
  EXPECT_THROW(train::case_from_json(j, "c.json"), std::exception);
  j["loss_chunk_tokens"] = "many";
  EXPECT_THROW(train::case_from_json(j, "c.json"), std::exception);
}

}  // namespace
}  // namespace cpharness::model
