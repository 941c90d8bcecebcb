// One training step on one process: forward, loss (sum over counted tokens / their count), backward, global
// grad norm, AdamW. The CP runtime wraps the same pieces with collectives.
#pragma once
#include <torch/torch.h>

#include <memory>

#include "harness/model/gemma4.h"
#include "harness/train/batch.h"

namespace cpharness::train {

struct OptimizerOptions {
  double lr = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // > 0: before the update, gradients are scaled so that their global L2 norm is at most this (torch's
  // clip_grad_norm_: coefficient max / (norm + 1e-6) when below 1). The recorded grad norm is the one before.
  double max_grad_norm = 0;
};

struct StepResult {
  double loss = 0;
  double grad_norm = 0;  // L2 norm over every parameter gradient, before the update
  int64_t counted_tokens = 0;
};

// AdamW over `parameters` with the case's options (the one place every trainer builds its optimizer).
std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<torch::Tensor>& parameters, const OptimizerOptions& options);

// The optimizer step: first clipping to options.max_grad_norm, given the global `grad_norm` already taken (after
// the all-reduce under CP, so every rank scales alike); then the AdamW update. With lr 0 AdamW changes no parameter
// (the update and the decoupled weight decay are both scaled by lr), so it is skipped, and AdamW never allocates its
// two state tensors per parameter: a real-size case that only checks forward/backward parity with "lr": 0 needs one
// copy of the weights, not three.
void optimizer_step(torch::optim::AdamW& optimizer, const OptimizerOptions& options, double grad_norm = 0);

// sqrt(sum over parameters of sum(grad^2)), accumulated in fp64.
double grad_norm(const std::vector<torch::Tensor>& parameters);

class Trainer {
 public:
  // `use_share_holder`: pass a fresh KV-share holder to every forward (matters for cache-gated semantics).
  Trainer(model::Gemma4Model model, const OptimizerOptions& options, bool use_share_holder = true);
  StepResult step(const Batch& batch, model::AttentionBackend& backend);
  model::Gemma4Model& model() { return model_; }

 private:
  model::Gemma4Model model_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  OptimizerOptions options_;
  bool use_share_holder_;
};

}  // namespace cpharness::train
