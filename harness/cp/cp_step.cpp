#include "harness/cp/cp_step.h"

#include <fmt/format.h>

#include <array>

#include "harness/model/chunked_loss.h"
#include "harness/model/weights.h"
#include "harness/train/device.h"

namespace cpharness::cp {

int64_t gradient_all_reduce_calls(const std::vector<torch::Tensor>& parameters, int64_t bucket_elements) {
  if (bucket_elements < 1) throw std::invalid_argument("gradient bucket must hold at least one element");
  int64_t total = 0;
  for (auto& p : parameters) total += p.numel();
  return (total + bucket_elements - 1) / bucket_elements;
}

void all_reduce_gradients(Comm& comm, const std::vector<torch::Tensor>& parameters, int64_t bucket_elements,
                          bool root_only) {
  const int64_t calls = gradient_all_reduce_calls(parameters, bucket_elements);
  if (calls == 0) return;
  // The gradients laid end to end in parameter order, reduced one window of that line at a time through one buffer
  // in the widest dtype present: the same sums, in the same order, as one flat collective, while the extra memory
  // stays one bucket (a real-size model's fp32 copy of every gradient would not fit beside the model).
  auto dtype = torch::kFloat32;
  for (auto& p : parameters)
    if (p.scalar_type() == torch::kFloat64) dtype = torch::kFloat64;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> flat;  // each gradient as a 1-D view (undefined gradients become zeros)
  int64_t total = 0;
  for (auto& p : parameters) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    else if (!p.grad().is_contiguous()) p.mutable_grad() = p.grad().contiguous();
    flat.push_back(p.grad().view({-1}));
    total += p.numel();
  }
  auto bucket = torch::empty({std::min(bucket_elements, total)}, parameters.front().options().dtype(dtype));
  size_t first = 0;        // the parameter the window starts in
  int64_t first_off = 0;   // and the offset in it
  for (int64_t start = 0; start < total; start += bucket_elements) {
    const int64_t len = std::min(bucket_elements, total - start);
    auto window = bucket.narrow(0, 0, len);
    // Each piece of the window: (parameter, offset in it, offset in the window, length).
    std::vector<std::array<int64_t, 4>> pieces;
    for (int64_t filled = 0; filled < len;) {
      const int64_t take = std::min(flat[first].numel() - first_off, len - filled);
      if (take > 0) {
        pieces.push_back({int64_t(first), first_off, filled, take});
        window.narrow(0, filled, take).copy_(flat[first].narrow(0, first_off, take));
      }
      filled += take;
      first_off += take;
      if (first_off == flat[first].numel()) ++first, first_off = 0;
    }
    comm.all_reduce(window);
    if (root_only && comm.rank() != 0) continue;  // the mutant
    for (auto& [param, offset, at, take] : pieces) flat[size_t(param)].narrow(0, offset, take).copy_(window.narrow(0, at, take));
  }
}

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

namespace {

// The perturbed token in a batch already prepared for `plan` (labels shifted on the full sequence).
BoundaryLabel boundary_label_in(const TokenBatch& prepared, const ShardPlan& plan) {
  std::vector<at::Tensor> labels_of(size_t(plan.cp()));  // [B, S_loc] per rank > 0, sharded once
  for (int r = 1; r < plan.cp(); ++r) labels_of[size_t(r)] = shard_batch(prepared, plan, r).labels.cpu();
  for (int64_t b = 0; b < prepared.labels.size(0); ++b)  // row 0 first; a later row where row 0 has none there
    for (int r = 1; r < plan.cp(); ++r) {
      const auto counted = (labels_of[size_t(r)].select(0, b) != model::kIgnoreIndex).nonzero();
      if (counted.numel() == 0) continue;
      const int64_t i = counted[0][0].item<int64_t>();
      return {r, b, i, plan.global_index(r, i)};
    }
  return {};
}

// Applies `f` in place to every gradient the model holds (the known-bad variants rescale them).
template <class F>
void each_gradient(model::Gemma4Model& model, F f) {
  torch::NoGradGuard no_grad;
  for (auto& p : model->parameters())
    if (p.grad().defined()) f(p.mutable_grad());
}

// KNOWN-BAD (selftest only): the shard's two zigzag halves in the wrong order, on every per-token tensor.
at::Tensor swap_halves(const at::Tensor& t) {
  if (!t.defined()) return t;
  const int64_t half = t.size(1) / 2;
  return at::cat({t.narrow(1, half, half), t.narrow(1, 0, half)}, 1);
}

TokenBatch swap_halves(const TokenBatch& b) {
  auto out = b;
  for (auto* t : {&out.input_ids, &out.labels, &out.padding_mask, &out.document_ids, &out.vision_group_ids,
                  &out.token_type_ids, &out.position_ids, &out.loss_mask, &out.per_layer_inputs, &out.inputs_embeds})
    *t = swap_halves(*t);
  return out;
}

}  // namespace

BoundaryLabel boundary_label_target(const train::Batch& batch, int cp, int64_t pad_token_id, Sharding sharding) {
  const ShardPlan plan(batch.input_ids.size(1), cp, sharding);
  return boundary_label_in(prepare_cp_batch(token_batch_of(batch), plan, pad_token_id), plan);
}

std::string boundary_label_text(const BoundaryLabel& target) {
  if (target.rank < 0) return "dropping a boundary label";
  return fmt::format("dropping the label of token {}{} (the first counted target of rank {}'s shard)",
                     target.global_index, target.row > 0 ? fmt::format(" of row {}", target.row) : "", target.rank);
}

CpForwardResult cp_forward_backward(Comm& comm, model::Gemma4Model& model, RingAttention& ring, const train::Batch& batch,
                                    uint64_t generation, const CpStepOptions& step_options) {
  const int n = comm.size(), rank = comm.rank();
  CpForwardResult result;
  result.plan = ShardPlan(batch.input_ids.size(1), n, step_options.sharding);
  auto full = token_batch_of(batch);
  full.labels_shifted = step_options.shift_labels_after_sharding;  // the mutant skips the full-sequence shift
  const auto prepared = prepare_cp_batch(full, result.plan, model->config().pad_fill_id());
  auto shard = shard_batch(prepared, result.plan, rank);
  // Where each local token came from, sharded by the same path as the data (the shard.layout check reads it).
  result.token_index = result.plan.shard(at::arange(result.plan.padded_len(), at::kLong).unsqueeze(0), rank).squeeze(0);
  if (step_options.swap_zigzag_halves) {
    shard = swap_halves(shard);
    result.token_index = swap_halves(result.token_index.unsqueeze(0)).squeeze(0);
  }
  if (step_options.shift_labels_after_sharding) shard.labels = shift_labels(shard.labels);
  if (step_options.drop_boundary_label) {
    const auto target = boundary_label_in(prepared, result.plan);
    if (target.rank == rank) {
      shard.labels = shard.labels.clone();
      shard.labels.index_put_({target.row, target.local_index}, model::kIgnoreIndex);
    }
  }

  ring.begin_batch(generation, result.plan.local_len(), result.plan.sharding());
  model::KvShareHolder holder;
  model::ForwardOptions options;
  if (step_options.use_share_holder) options.holder = &holder;
  options.hidden_states = step_options.hidden_states;
  options.checkpointing = step_options.activation_checkpointing;
  kernels::TokenMetadata meta{shard.document_ids, shard.padding_mask, shard.vision_group_ids};
  torch::Tensor logits;
  auto loss = model::forward_loss(model, {shard.input_ids, shard.position_ids, meta, {}}, ring, options, shard.labels,
                                  step_options.chunked_loss_ignored ? 0 : step_options.loss_chunk_tokens, &logits);  // labels were shifted on the full sequence

  auto stats = torch::tensor({loss.sum.item<double>(), double(loss.count)}, torch::kFloat64);
  {
    CommTimer timer(ring);
    comm.all_reduce(stats);
  }
  const double global_sum = stats[0].item<double>();
  result.counted_tokens = int64_t(stats[1].item<double>());
  const int64_t step_tokens = step_options.step_counted_tokens >= 0 ? step_options.step_counted_tokens : result.counted_tokens;
  const double denominator = double(std::max<int64_t>(step_tokens, 1));
  auto scaled = loss.sum / denominator;
  if (step_options.before_backward) step_options.before_backward(scaled);
  scaled.backward();
  if (!step_options.reduce_gradients) {  // an accumulating micro-batch: the last one's all-reduce sums them all
    result.loss = global_sum / denominator;
    result.local_logits = logits;
    return result;
  }
  if (step_options.local_gradients) *step_options.local_gradients = model::gradient_copies(model, torch::kFloat64);
  if (step_options.predivide_gradients) each_gradient(model, [n](torch::Tensor& g) { g.div_(double(n)); });
  {
    CommTimer timer(ring);
    all_reduce_gradients(comm, model->parameters(), step_options.gradient_bucket_elements,
                         step_options.reduce_to_rank_zero_only);
  }
  if (step_options.predivide_gradients) each_gradient(model, [n](torch::Tensor& g) { g.mul_(double(n)); });
  if (step_options.average_gradients)  // the mutant: a mean where the global-token normalisation needs a sum
    each_gradient(model, [n](torch::Tensor& g) { g.div_(double(n)); });
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
                                  std::map<std::string, torch::Tensor>* gradients,
                                  std::map<std::string, torch::Tensor>* local_gradients) {
  optimizer_->zero_grad();
  auto options = step_options_;
  options.hidden_states = hidden_states;
  options.local_gradients = local_gradients;
  auto r = cp_forward_backward(comm_, model_, ring_, batch, ++generation_, options);
  if (forward) *forward = r;
  return finish_step(r.loss, r.counted_tokens, gradients);
}

static int64_t counted_targets(const train::Batch& batch) {
  return (model::shift_labels(batch.labels) != model::kIgnoreIndex).sum().item<int64_t>();
}

train::StepResult CpTrainer::step(const std::vector<train::Batch>& micro_batches, CpForwardResult* forward,
                                  std::vector<torch::Tensor>* hidden_states,
                                  std::map<std::string, torch::Tensor>* gradients,
                                  std::map<std::string, torch::Tensor>* local_gradients) {
  if (micro_batches.size() == 1) return step(micro_batches.front(), forward, hidden_states, gradients, local_gradients);
  if (micro_batches.empty()) throw std::invalid_argument("CpTrainer::step: no micro-batch");
  // Every rank holds every micro-batch whole before sharding, so the step's token count needs no collective.
  int64_t step_tokens = 0;
  for (auto& b : micro_batches) step_tokens += counted_targets(b);
  optimizer_->zero_grad();
  double loss = 0;
  std::vector<torch::Tensor> logits;
  std::vector<std::vector<torch::Tensor>> hidden(micro_batches.size());
  for (size_t m = 0; m < micro_batches.size(); ++m) {
    auto options = step_options_;
    options.step_counted_tokens = step_tokens;
    if (step_options_.micro_batch_mean_of_means)  // the mutant: right only when every micro-batch counts alike
      options.step_counted_tokens = counted_targets(micro_batches[m]) * int64_t(micro_batches.size());
    options.reduce_gradients = m + 1 == micro_batches.size();
    options.local_gradients = local_gradients;  // recorded by the last, before the sum
    options.drop_boundary_label = step_options_.drop_boundary_label && m == 0;  // one perturbed token per step
    options.hidden_states = hidden_states ? &hidden[m] : nullptr;
    if (step_options_.zero_grad_per_micro_batch) optimizer_->zero_grad();  // the mutant: earlier micro-batches lost
    auto r = cp_forward_backward(comm_, model_, ring_, micro_batches[m], ++generation_, options);
    loss += r.loss;
    if (r.local_logits.defined()) logits.push_back(r.local_logits);
    if (forward && m == 0) *forward = r;
  }
  if (forward && logits.size() == micro_batches.size()) forward->local_logits = torch::cat(logits, 0);
  if (hidden_states) {
    hidden_states->clear();
    for (size_t layer = 0; layer < hidden.front().size(); ++layer) {
      std::vector<torch::Tensor> parts;
      for (auto& h : hidden) parts.push_back(h.at(layer));
      hidden_states->push_back(torch::cat(parts, 0));
    }
  }
  return finish_step(loss, step_tokens, gradients);
}

train::StepResult CpTrainer::finish_step(double loss, int64_t counted_tokens, std::map<std::string, torch::Tensor>* gradients) {
  train::StepResult result{loss, train::grad_norm(model_->parameters()), counted_tokens};
  if (gradients) *gradients = model::gradient_copies(model_, torch::kFloat64);  // before clipping, as cp 1 records them
  // One update, written once for both layouts (a line that differs between them would be tested by one backend
  // only): with weights of its own every rank applies it; with one shared copy (ranks as threads), whose summed
  // gradients every rank holds alike, rank 0 applies it for all.
  const bool shared = step_options_.shared_weights;
  if (!shared || comm_.rank() == 0) {
    train::optimizer_step(*optimizer_, optimizer_options_, result.grad_norm);
    const auto parameters = model_->parameters();
    if (shared && !parameters.empty()) train::synchronize(parameters.front().device());  // done before others read
  }
  if (shared) comm_.barrier();
  return result;
}

}  // namespace cpharness::cp
