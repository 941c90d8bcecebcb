#include "harness/cp/cp_step.h"

#include "harness/model/chunked_loss.h"
#include "harness/model/weights.h"

namespace cpharness::cp {

void all_reduce_gradients(Comm& comm, const std::vector<torch::Tensor>& parameters) {
  if (parameters.empty()) return;
  // One flat buffer in the widest dtype present, so one collective serves every tensor.
  auto dtype = torch::kFloat32;
  for (auto& p : parameters)
    if (p.scalar_type() == torch::kFloat64) dtype = torch::kFloat64;
  std::vector<torch::Tensor> flat;
  for (auto& p : parameters)
    flat.push_back(p.grad().defined() ? p.grad().reshape({-1}).to(dtype) : torch::zeros({p.numel()}, p.options().dtype(dtype)));
  auto buffer = torch::cat(flat).contiguous();
  comm.all_reduce(buffer);
  int64_t offset = 0;
  torch::NoGradGuard no_grad;
  for (auto& p : parameters) {
    auto slice = buffer.narrow(0, offset, p.numel()).view(p.sizes()).to(p.scalar_type());
    if (p.grad().defined()) p.mutable_grad().copy_(slice);
    else p.mutable_grad() = slice.clone();
    offset += p.numel();
  }
}

namespace {

// The training batch as the shard plan takes it (labels not yet shifted).
TokenBatch token_batch_of(const train::Batch& batch) {
  TokenBatch full;
  full.input_ids = batch.input_ids;
  full.labels = batch.labels;
  full.position_ids = batch.position_ids;
  full.padding_mask = batch.meta.padding;
  full.document_ids = batch.meta.document_ids;
  full.vision_group_ids = batch.meta.vision_group_ids;
  return full;
}

// The perturbed token in a batch already prepared for `plan` (labels shifted on the full sequence).
BoundaryLabel boundary_label_in(const TokenBatch& prepared, const ShardPlan& plan) {
  for (int r = 1; r < plan.cp(); ++r) {
    const auto labels = shard_batch(prepared, plan, r).labels.select(0, 0).cpu();
    const auto counted = (labels != model::kIgnoreIndex).nonzero();
    if (counted.numel() == 0) continue;
    const int64_t i = counted[0][0].item<int64_t>();
    return {r, i, r * plan.local_len() + i};
  }
  return {};
}

}  // namespace

BoundaryLabel boundary_label_target(const train::Batch& batch, int cp, int64_t pad_token_id) {
  const ShardPlan plan(batch.input_ids.size(1), cp);
  return boundary_label_in(prepare_cp_batch(token_batch_of(batch), plan, pad_token_id), plan);
}

CpForwardResult cp_forward_backward(Comm& comm, model::Gemma4Model& model, RingAttention& ring, const train::Batch& batch,
                                    uint64_t generation, const CpStepOptions& step_options) {
  const int n = comm.size(), rank = comm.rank();
  CpForwardResult result;
  result.plan = ShardPlan(batch.input_ids.size(1), n);
  auto full = token_batch_of(batch);
  full.labels_shifted = step_options.shift_labels_after_sharding;  // the mutant skips the full-sequence shift
  const auto prepared = prepare_cp_batch(full, result.plan, model->config().pad_token_id);
  auto shard = shard_batch(prepared, result.plan, rank);
  if (step_options.shift_labels_after_sharding) shard.labels = shift_labels(shard.labels);
  if (step_options.drop_boundary_label) {
    const auto target = boundary_label_in(prepared, result.plan);
    if (target.rank == rank) {
      shard.labels = shard.labels.clone();
      shard.labels.index_put_({0, target.local_index}, model::kIgnoreIndex);
    }
  }

  ring.begin_batch(generation, result.plan.local_len());
  model::KvShareHolder holder;
  model::ForwardOptions options;
  if (step_options.use_share_holder) options.holder = &holder;
  options.hidden_states = step_options.hidden_states;
  kernels::TokenMetadata meta{shard.document_ids, shard.padding_mask, shard.vision_group_ids};
  torch::Tensor logits;
  auto loss = model::forward_loss(model, {shard.input_ids, shard.position_ids, meta, {}}, ring, options, shard.labels,
                                  step_options.loss_chunk_tokens, &logits);  // labels were shifted on the full sequence

  auto stats = torch::tensor({loss.sum.item<double>(), double(loss.count)}, torch::kFloat64);
  {
    CommTimer timer(ring);
    comm.all_reduce(stats);
  }
  const double global_sum = stats[0].item<double>();
  result.counted_tokens = int64_t(stats[1].item<double>());
  const double denominator = double(std::max<int64_t>(result.counted_tokens, 1));
  (loss.sum / denominator).backward();
  {
    CommTimer timer(ring);
    all_reduce_gradients(comm, model->parameters());
  }
  if (step_options.average_gradients) {  // the mutant: a mean where the global-token normalisation needs a sum
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters())
      if (p.grad().defined()) p.mutable_grad().div_(double(comm.size()));
  }
  result.loss = global_sum / denominator;
  result.local_logits = logits;
  return result;
}

CpTrainer::CpTrainer(Comm& comm, model::Gemma4Model model, const train::OptimizerOptions& o, RingOptions ring_options,
                     CpStepOptions step_options)
    : comm_(comm), model_(std::move(model)), ring_(comm, ring_options), step_options_(step_options),
      optimizer_options_(o) {
  optimizer_ = train::make_adamw(model_->parameters(), o);
}

train::StepResult CpTrainer::step(const train::Batch& batch, CpForwardResult* forward,
                                  std::vector<torch::Tensor>* hidden_states,
                                  std::map<std::string, torch::Tensor>* gradients) {
  optimizer_->zero_grad();
  auto options = step_options_;
  options.hidden_states = hidden_states;
  auto r = cp_forward_backward(comm_, model_, ring_, batch, ++generation_, options);
  if (forward) *forward = r;
  train::StepResult result{r.loss, train::grad_norm(model_->parameters()), r.counted_tokens};
  if (gradients) *gradients = model::gradient_copies(model_, torch::kFloat64);  // before clipping, as cp 1 records them
  train::optimizer_step(*optimizer_, optimizer_options_, result.grad_norm);
  return result;
}

}  // namespace cpharness::cp
