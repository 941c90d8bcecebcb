#include "harness/train/trainer.h"

#include <cmath>

namespace cpharness::train {

double grad_norm(const std::vector<torch::Tensor>& parameters) {
  // Summed in fp64 where the gradients live, in parameter order, read once (one device sync, not one per tensor).
  torch::Tensor sum;
  for (auto& p : parameters)
    if (p.grad().defined()) {
      auto s = p.grad().to(torch::kFloat64).pow(2).sum();
      sum = sum.defined() ? sum + s : s;
    }
  return sum.defined() ? std::sqrt(sum.item<double>()) : 0.0;
}

std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<torch::Tensor>& parameters, const OptimizerOptions& o) {
  auto options = torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(o.weight_decay);
  return std::make_unique<torch::optim::AdamW>(parameters, options);
}

void optimizer_step(torch::optim::AdamW& optimizer, const OptimizerOptions& options, double grad_norm) {
  if (options.max_grad_norm > 0 && std::isfinite(grad_norm)) {
    const double coefficient = options.max_grad_norm / (grad_norm + 1e-6);
    if (coefficient < 1) {
      torch::NoGradGuard no_grad;
      for (auto& group : optimizer.param_groups())
        for (auto& p : group.params())
          if (p.grad().defined()) p.mutable_grad().mul_(coefficient);
    }
  }
  if (options.lr != 0) optimizer.step();
}

Trainer::Trainer(model::Gemma4Model model, const OptimizerOptions& o, bool use_share_holder)
    : model_(std::move(model)), options_(o), use_share_holder_(use_share_holder) {
  optimizer_ = make_adamw(model_->parameters(), o);
}

StepResult Trainer::step(const Batch& batch, model::AttentionBackend& backend) {
  optimizer_->zero_grad();
  model::KvShareHolder holder;
  model::ForwardOptions options;
  if (use_share_holder_) options.holder = &holder;
  model::ModelInputs inputs{batch.input_ids, batch.position_ids, batch.meta, {}};
  auto logits = model_->forward(inputs, backend, options);
  auto loss = model::token_loss(logits, model::shift_labels(batch.labels));
  auto mean = loss.sum / double(std::max<int64_t>(loss.count, 1));
  mean.backward();
  StepResult result{mean.item<double>(), grad_norm(model_->parameters()), loss.count};
  optimizer_step(*optimizer_, options_, result.grad_norm);
  return result;
}

}  // namespace cpharness::train
