#include "harness/runner/case_runner.h"

#include <chrono>
#include <mutex>

#include "harness/cp/cp_step.h"
#include "harness/model/init.h"
#include "harness/model/weights.h"

namespace cpharness::runner {
namespace {

using Clock = std::chrono::steady_clock;

double param_norm(model::Gemma4Model& m) {
  double sum = 0;
  for (auto& p : m->parameters()) sum += p.detach().to(torch::kFloat64).pow(2).sum().item<double>();
  return std::sqrt(sum);
}

std::map<std::string, torch::Tensor> grads_of(model::Gemma4Model& m) {
  std::map<std::string, torch::Tensor> out;
  for (auto& p : m->named_parameters())
    out[p.key()] = p.value().grad().defined() ? p.value().grad().detach().to(torch::kFloat64).clone()
                                              : torch::zeros(p.value().sizes(), torch::kFloat64);
  return out;
}

std::map<std::string, torch::Tensor> params_of(model::Gemma4Model& m) {
  std::map<std::string, torch::Tensor> out;
  for (auto& p : m->named_parameters()) out[p.key()] = p.value().detach().to(torch::kFloat64).clone();
  return out;
}

std::unique_ptr<torch::optim::AdamW> make_optimizer(model::Gemma4Model& m, const train::OptimizerOptions& o) {
  auto options = torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(o.weight_decay);
  return std::make_unique<torch::optim::AdamW>(m->parameters(), options);
}

}  // namespace

torch::ScalarType lane_dtype(const std::string& lane) {
  if (lane == "bf16") return torch::kBFloat16;
  return lane == "fp64" ? torch::kFloat64 : torch::kFloat32;
}

train::Batch batch_for_step(const train::Case& c, int64_t step) {
  train::BatchSpec spec = c.data;
  spec.seed = c.data.seed + uint64_t(step);
  if (spec.document_lengths.size() > 1) {
    const auto k = size_t(step) % spec.document_lengths.size();
    std::rotate(spec.document_lengths.begin(), spec.document_lengths.begin() + k, spec.document_lengths.end());
  }
  return train::make_batch(spec);
}

model::Gemma4Model build_model(const train::Case& c, torch::ScalarType dtype, std::optional<model::KvShareSemantics> semantics) {
  auto config = c.model;
  if (semantics) config.kv_share_semantics = *semantics;
  model::Gemma4Model m(config);
  model::init_weights(m, c.init_seed);
  if (!c.checkpoint.empty()) model::load_checkpoint(m, c.checkpoint);
  m->to(dtype);
  return m;
}

LaneRun run_reference(const train::Case& c, const std::string& lane, const RunOptions& options) {
  const auto start = Clock::now();
  LaneRun run;
  run.cp = 1;
  run.lane = lane;
  auto m = build_model(c, lane_dtype(lane), options.semantics);
  auto optimizer = make_optimizer(m, c.optimizer);
  model::EagerAttention eager;
  for (int64_t step = 0; step < c.steps; ++step) {
    auto batch = batch_for_step(c, step);
    optimizer->zero_grad();
    model::KvShareHolder holder;
    model::ForwardOptions fo;
    if (options.use_share_holder) fo.holder = &holder;
    std::vector<torch::Tensor> hidden;
    if (step == 0 && options.record_tensors) fo.hidden_states = &hidden;
    auto logits = m->forward({batch.input_ids, batch.position_ids, batch.meta, {}}, eager, fo);
    auto loss = model::token_loss(logits, model::shift_labels(batch.labels));
    auto mean = loss.sum / double(std::max<int64_t>(loss.count, 1));
    mean.backward();
    StepRecord rec{mean.item<double>(), train::grad_norm(m->parameters()), 0, loss.count};
    if (step == 0 && options.record_tensors) {
      run.logits = logits.detach().to(torch::kFloat64);
      for (auto& h : hidden) run.hidden.push_back(h.detach().to(torch::kFloat64));
      run.grads = grads_of(m);
    }
    optimizer->step();
    rec.param_norm = param_norm(m);
    run.steps.push_back(rec);
  }
  run.final_params = params_of(m);
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return run;
}

LaneRun run_cp(const train::Case& c, const std::string& lane, int n, const RunOptions& options) {
  const auto start = Clock::now();
  LaneRun run;
  run.cp = n;
  run.lane = lane;
  run.cache.assign(size_t(c.steps), std::vector<kernels::BlockMaskCacheCounters>(size_t(n)));
  run.traces.resize(size_t(n));
  run.comm_step0.resize(size_t(n));
  std::vector<torch::Tensor> logits(n);
  std::vector<std::vector<torch::Tensor>> hidden(n);
  std::mutex mu;
  cp::run_local(n, [&](cp::Comm& comm) {
    const int r = comm.rank();
    auto m = build_model(c, lane_dtype(lane), options.semantics);
    cp::CpStepOptions step_options;
    step_options.use_share_holder = options.use_share_holder;
    step_options.shift_labels_after_sharding = options.step_mutation == StepMutation::kShiftLabelsAfterSharding;
    cp::CpTrainer trainer(comm, m, c.optimizer, options.ring, step_options);
    std::vector<StepRecord> steps;
    for (int64_t step = 0; step < c.steps; ++step) {
      auto batch = batch_for_step(c, step);
      std::vector<torch::Tensor> h;
      // The trainer's options are fixed; step 0 records hidden states through a one-off step.
      cp::CpForwardResult fwd;
      comm.reset_stats();
      trainer.ring().trace().clear();
      const bool record = step == 0 && options.record_tensors;
      auto result = trainer.step(batch, &fwd, record ? &h : nullptr);
      auto counters = trainer.ring().cache().take_counters();
      StepRecord rec{result.loss, result.grad_norm, param_norm(trainer.model()), result.counted_tokens};
      std::lock_guard<std::mutex> lock(mu);
      run.cache[size_t(step)][size_t(r)] = counters;
      if (step == 0) {
        run.traces[size_t(r)] = trainer.ring().trace();
        run.comm_step0[size_t(r)] = comm.stats();
        if (options.record_tensors) {
          logits[r] = fwd.local_logits.to(torch::kFloat64);
          for (auto& t : h) hidden[r].push_back(t.detach().to(torch::kFloat64));
          if (r == 0) run.grads = grads_of(trainer.model());  // all-reduced: identical on every rank
        }
      }
      if (r == 0) run.steps.push_back(rec);
    }
    if (r == 0) run.final_params = params_of(trainer.model());
  }, options.timeout);
  if (options.record_tensors) {
    cp::ShardPlan plan(c.data.seq_len, n);
    run.logits = plan.unshard(logits);
    for (size_t layer = 0; layer < hidden[0].size(); ++layer) {
      std::vector<torch::Tensor> per_rank;
      for (int r = 0; r < n; ++r) per_rank.push_back(hidden[r][layer]);
      run.hidden.push_back(plan.unshard(per_rank));
    }
  }
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return run;
}

}  // namespace cpharness::runner
