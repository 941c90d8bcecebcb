// The optimizer the case's `optimizer` block configures is AdamW as torch.optim.AdamW defines it, checked against
// the update written out by hand in fp64. cp N and cp 1 share this code, so a wrong beta or bias correction moves
// both alike: no parity check sees it, and goldens only barely (swapped betas moved three steps at lr 1e-4 by
// ~2e-5 against a 1e-5 tolerance).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "harness/train/trainer.h"

namespace cpharness {
namespace {

// p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
// p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   (torch.optim.AdamW, amsgrad off)
struct HandAdamW {
  train::OptimizerOptions o;
  torch::Tensor m, v;
  int t = 0;
  void step(torch::Tensor& p, const torch::Tensor& g) {
    if (!m.defined()) m = torch::zeros_like(p), v = torch::zeros_like(p);
    ++t;
    p = p * (1 - o.lr * o.weight_decay);
    m = o.beta1 * m + (1 - o.beta1) * g;
    v = o.beta2 * v + (1 - o.beta2) * g * g;
    const double c1 = 1 - std::pow(o.beta1, t), c2 = 1 - std::pow(o.beta2, t);
    p = p - o.lr * (m / c1) / ((v / c2).sqrt() + o.eps);
  }
};

TEST(Optimizer, IsAdamWAsTorchDefinesItForEveryOption) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 6; ++trial) {
    train::OptimizerOptions o;
    // Distinct betas far apart, so swapping them or dropping a bias correction is visible at every step.
    o.lr = 1e-3 * (1 + trial);
    o.beta1 = 0.5 + 0.05 * trial;
    o.beta2 = 0.99 - 0.01 * trial;
    o.eps = trial % 2 ? 1e-8 : 1e-3;
    o.weight_decay = 0.1 * (trial % 3);
    SCOPED_TRACE(::testing::Message() << "lr " << o.lr << " betas " << o.beta1 << "/" << o.beta2 << " eps " << o.eps
                                      << " wd " << o.weight_decay);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rng());
    auto start = torch::randn({7, 3}, gen, torch::kFloat64);
    auto p = start.clone().requires_grad_();
    auto adamw = train::make_adamw({p}, o);
    HandAdamW hand{o};
    auto expected = start.clone();
    for (int step = 0; step < 4; ++step) {
      const auto g = torch::randn({7, 3}, gen, torch::kFloat64) * (step + 1);  // gradient scale changes per step
      p.mutable_grad() = g.clone();
      train::optimizer_step(*adamw, o, g.norm().item<double>());
      hand.step(expected, g);
      EXPECT_TRUE(torch::allclose(p.detach(), expected, 1e-12, 1e-14))
          << "step " << step + 1 << ": max difference " << (p.detach() - expected).abs().max().item<double>();
    }
  }
}

}  // namespace
}  // namespace cpharness
