#include "harness/runner/case_runner.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <thread>

#include "harness/cp/cp_step.h"
#include "harness/runner/rank_records.h"
#include "harness/train/device.h"
#include "harness/train/host_memory.h"
#include "harness/train/trainer.h"
#include "harness/model/chunked_loss.h"
#include "harness/model/init.h"
#include "harness/model/weights.h"

namespace cpharness::runner {
namespace {

using Clock = std::chrono::steady_clock;

double param_norm(model::Gemma4Model& m) {
  torch::Tensor sum;  // fp64 where the parameters live, in parameter order, read once
  for (auto& p : m->parameters()) {
    auto s = p.detach().to(torch::kFloat64).pow(2).sum();
    sum = sum.defined() ? sum + s : s;
  }
  return sum.defined() ? std::sqrt(sum.item<double>()) : 0.0;
}

// Times one training step and reads the device's peak memory during it (the device's queue drained first).
// A step slower than this gets a line on stderr as it ends: at real sizes a lane runs for minutes, and its summary
// lines come only when it finishes. Toy steps (milliseconds) stay quiet.
constexpr double kSlowStepSeconds = 10.0;

void report_slow_step(const train::Case& c, train::DtypeLane lane, int cp, int64_t step, const TrainingStep& s) {
  if (s.seconds < kSlowStepSeconds) return;
  std::cerr << fmt::format("[{}] cp{} {} step {} of {} took {:.1f}s (loss {:.6f})\n", c.id, cp, train::to_string(lane),
                           step + 1, c.steps, s.seconds, s.loss);
}

class StepMeter {
 public:
  StepMeter(const torch::Device& device, bool owns_peak) : device_(device), owns_peak_(owns_peak) {
    train::synchronize(device_);
    if (owns_peak_) train::reset_peak_memory(device_);
    start_ = Clock::now();
  }
  void finish(TrainingStep& step) {
    train::synchronize(device_);
    step.seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    if (auto m = owns_peak_ ? train::peak_memory(device_) : std::nullopt)
      step.peak_allocated = m->peak_allocated, step.peak_reserved = m->peak_reserved;
  }

 private:
  torch::Device device_;
  bool owns_peak_;
  Clock::time_point start_;
};

void describe_device(LaneRun& run, const train::Case& c, const torch::Device& device, int devices) {
  run.device = device.str();
  run.device_name = train::device_name(device);
  run.devices = devices;
  run.tokens_per_step = c.data.batch * c.data.seq_len;
}

// slow@0: the reference step idles --timeout, in quarters with a sign of life after each, so that the solo work
// outlasts --timeout by as much as a test asks on a machine of any speed, while no silence exceeds a step's work.
void idle_if_slow(const RunOptions& options) {
  if (!options.fault || options.fault->kind != Fault::Kind::kSlow) return;
  for (int quarter = 0; quarter < 4; ++quarter) {
    std::this_thread::sleep_for(options.timeout / 4);
    if (options.root_alive) options.root_alive();
  }
}

}  // namespace

void inject_fault(const Fault& fault) {
  if (fault.kind == Fault::Kind::kSlow) throw std::logic_error("slow is no point fault: it acts in the reference's steps");
  if (fault.kind == Fault::Kind::kCrash) std::abort();  // a rank that dies without a word
  if (fault.kind == Fault::Kind::kStop) ::raise(SIGSTOP);  // a rank frozen by a debugger, a scheduler, ^Z
  if (fault.kind == Fault::Kind::kThrow)  // a bug nobody planned for: what does the report say?
    throw std::logic_error("injected fault: an unexpected exception\n(second line: a backtrace would follow here)");
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));  // a rank that hangs
}

Fault parse_fault(const std::string& spec) {
  // KIND@RANK[:STEP|:exit], e.g. crash@1, hang@0:1 or stop@1:exit
  const auto at = spec.find('@');
  if (at == std::string::npos) throw std::invalid_argument("expected KIND@RANK[:STEP], got '" + spec + "'");
  Fault f;
  const auto kind = spec.substr(0, at);
  if (kind == "crash") f.kind = Fault::Kind::kCrash;
  else if (kind == "hang") f.kind = Fault::Kind::kHang;
  else if (kind == "stop") f.kind = Fault::Kind::kStop;
  else if (kind == "throw") f.kind = Fault::Kind::kThrow;
  else if (kind == "slow") f.kind = Fault::Kind::kSlow;
  else throw std::invalid_argument("fault kind must be crash, hang, stop, throw or slow, got '" + kind + "'");
  const auto rest = spec.substr(at + 1);
  const auto colon = rest.find(':');
  try {
    size_t used = 0;
    f.rank = std::stoi(rest.substr(0, colon), &used);
    if (used != rest.substr(0, colon).size() || f.rank < 0) throw std::invalid_argument(rest);
    if (colon != std::string::npos && rest.substr(colon + 1) == "exit") {
      f.at_exit = true;
    } else if (colon != std::string::npos) {
      f.step = std::stoll(rest.substr(colon + 1), &used);
      if (used != rest.size() - colon - 1 || f.step < 0) throw std::invalid_argument(rest);
    }
  } catch (const std::logic_error&) {
    throw std::invalid_argument("expected KIND@RANK[:STEP|:exit] with non-negative integers, got '" + spec + "'");
  }
  return f;
}

namespace {

// What identifies a checkpoint's contents for the cache: its path and, for it or each file in its directory, size
// and modification time (a file rewritten under the same name between two cases is read again).
std::string checkpoint_identity(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) return "";
  std::string id = path;
  std::error_code ec;
  auto add = [&](const fs::path& f) {
    const auto size = fs::file_size(f, ec);
    const auto time = fs::last_write_time(f, ec).time_since_epoch().count();
    id += fmt::format("|{}:{}:{}", f.filename().string(), ec ? -1 : int64_t(size), ec ? 0 : int64_t(time));
  };
  if (fs::is_directory(path, ec)) {
    std::vector<fs::path> files;
    for (auto& e : fs::directory_iterator(path, ec)) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (auto& f : files) add(f);
  } else {
    add(path);
  }
  return id;
}

// The initial weights of the last case built, fp32 on the host, by tensor name: a case builds its model many times
// (reference, oracle, every candidate, the cache and power checks' extra steps, the repeat run), and at real size one
// seeded initialisation is minutes of host time while a copy is seconds. A tensor's initial value depends only on its
// name, shape, the seed and the checkpoint, so the K/V-sharing semantics (which add or drop the shared layers' own K/V
// weights) share one entry. One case at a time: the next case replaces it.
class InitialWeights {
 public:
  // Copies the initial weights into `m` (built from `config`), drawing them first when this case has not yet.
  void copy_into(model::Gemma4Model& m, uint64_t seed, const std::string& checkpoint) {
    auto shape_only = m->config();
    shape_only.kv_share_semantics = model::ModelConfig{}.kv_share_semantics;
    const auto key = fmt::format("{}|{}|{}", shape_only.to_json().dump(), seed, checkpoint_identity(checkpoint));
    std::lock_guard<std::mutex> lock(mu_);
    if (key != key_) {
      tensors_.clear();  // the previous case's weights go before the next ones are made
      key_ = key;
    }
    const auto params = m->named_parameters();
    const auto buffers = m->named_buffers();
    bool complete = true;
    for (auto* dict : {&params, &buffers})
      for (auto& t : *dict) complete = complete && tensors_.count(t.key());
    if (!complete) {
      model::Gemma4Model drawn(m->config());
      model::init_weights(drawn, seed);
      if (!checkpoint.empty()) model::load_checkpoint(drawn, checkpoint);
      for (auto& t : drawn->named_parameters()) tensors_.emplace(t.key(), t.value().detach());
      for (auto& t : drawn->named_buffers()) tensors_.emplace(t.key(), t.value().detach());
    }
    torch::NoGradGuard no_grad;
    for (auto* dict : {&params, &buffers})
      for (auto& t : *dict) t.value().copy_(tensors_.at(t.key()));
  }

 private:
  std::mutex mu_;
  std::string key_;
  std::map<std::string, torch::Tensor> tensors_;
};

InitialWeights& initial_weights() {
  static InitialWeights cache;
  return cache;
}

}  // namespace

model::Gemma4Model build_model(const train::Case& c, torch::ScalarType dtype, std::optional<model::KvShareSemantics> semantics,
                               const torch::Device& device, bool zero_weights, bool zero_final_norm) {
  auto config = c.model;
  if (semantics) config.kv_share_semantics = *semantics;
  model::Gemma4Model m(config);
  initial_weights().copy_into(m, c.init_seed, c.checkpoint);
  {
    torch::NoGradGuard no_grad;
    if (zero_weights)
      for (auto& p : m->parameters()) p.zero_();
    if (zero_final_norm) m->norm->weight.zero_();
  }
  m->to(dtype);
  if (!device.is_cpu()) m->to(device);
  return m;
}

void prepare_initial_weights(const train::Case& c) {
  model::Gemma4Model m(c.model);
  initial_weights().copy_into(m, c.init_seed, c.checkpoint);
}

namespace {

// The update each final weight took from `initial` (final - initial, per tensor): the scale train.param_parity
// judges candidates by when `run` is a reference.
void record_update_norms(LaneRun& run, const std::map<std::string, torch::Tensor>& initial) {
  for (auto& [name, p] : run.final_params) run.update_norms[name] = (p - initial.at(name)).norm().item<double>();
}

}  // namespace

LaneRun run_reference(const train::Case& c, train::DtypeLane lane, const RunOptions& options) {
  const auto start = Clock::now();
  train::HostMemoryScope counted;  // this lane's allocations are counted (its activation bytes)
  LaneRun run;
  run.cp = 1;
  run.lane = lane;
  describe_device(run, c, options.device, 1);
  auto m = build_model(c, train::lane_dtype(lane), options.semantics, options.device, options.zero_weights,
                       options.zero_final_norm);
  auto optimizer = train::make_adamw(m->parameters(), c.optimizer);
  model::EagerAttention eager;
  // The weights before the first update, so that train.param_parity can judge cp N's parameters by the update this
  // run made (the initial weights, the same in every run, would hide a wrong update under their own size).
  std::map<std::string, torch::Tensor> initial;
  if (options.record_tensors) initial = model::parameter_copies(m, torch::kFloat64);
  for (int64_t step = 0; step < c.steps; ++step) {
    auto batch = train::to_device(train::batch_for_step(c, step), options.device);
    StepMeter meter(options.device, true);
    optimizer->zero_grad();
    const int64_t live_before = options.device.is_cpu() ? train::host_bytes_live() : -1;
    model::KvShareHolder holder;
    model::ForwardOptions fo;
    if (options.use_share_holder) fo.holder = &holder;
    if (c.reference_checkpointing && !options.skip_reference_checkpointing)
      fo.checkpointing = model::ActivationCheckpointing::kKvHolder;
    std::vector<torch::Tensor> hidden;
    if (step == 0 && options.record_tensors) fo.hidden_states = &hidden;
    torch::Tensor logits;
    auto loss = model::forward_loss(m, {batch.input_ids, batch.position_ids, batch.meta, {}}, eager, fo,
                                    model::shift_labels(batch.labels), c.loss_chunk_tokens, &logits);
    auto mean = loss.sum / double(std::max<int64_t>(loss.count, 1));
    const int64_t activation_bytes = live_before >= 0 ? train::host_bytes_live() - live_before : -1;
    mean.backward();
    TrainingStep rec{mean.item<double>(), train::grad_norm(m->parameters()), 0, loss.count};
    rec.activation_bytes = activation_bytes;
    if (step == 0 && options.record_tensors) {
      if (logits.defined()) run.logits = logits.to(torch::kCPU, torch::kFloat64);
      for (auto& h : hidden) run.hidden.push_back(h.detach().to(torch::kCPU, torch::kFloat64));
      run.grads = model::gradient_copies(m, torch::kFloat64);
    }
    train::optimizer_step(*optimizer, c.optimizer, rec.grad_norm);
    idle_if_slow(options);
    meter.finish(rec);
    report_slow_step(c, lane, 1, step, rec);
    rec.param_norm = param_norm(m);
    run.steps.push_back(rec);
    if (options.root_alive) options.root_alive();
  }
  if (options.record_tensors) {
    run.final_params = model::parameter_copies(m, torch::kFloat64);
    record_update_norms(run, initial);
  }
  optimizer.reset();
  m = nullptr;
  train::release_cached_memory(options.device);
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return run;
}

CpRankRecord run_cp_rank(cp::Comm& comm, const train::Case& c, train::DtypeLane lane, const RunOptions& options,
                         const std::function<model::Gemma4Model()>& shared_model) {
  CpRankRecord rec;
  rec.rank = comm.rank();
  auto m = shared_model ? shared_model()
                        : build_model(c, train::lane_dtype(lane), options.semantics, options.device, options.zero_weights,
                                      options.zero_final_norm);
  cp::CpStepOptions step_options;
  step_options.shared_weights = bool(shared_model);
  step_options.use_share_holder = options.use_share_holder;
  step_options.shift_labels_after_sharding = options.step_mutation == StepMutation::kShiftLabelsAfterSharding;
  step_options.average_gradients = options.step_mutation == StepMutation::kAverageGradients;
  step_options.reduce_to_rank_zero_only = options.step_mutation == StepMutation::kGradientsReducedToRankZero;
  step_options.swap_zigzag_halves = options.step_mutation == StepMutation::kSwapZigzagHalves;
  step_options.sharding = options.sharding;
  step_options.activation_checkpointing = c.activation_checkpointing;
  step_options.zero_grad_per_micro_batch = options.step_mutation == StepMutation::kZeroGradPerMicroBatch;
  step_options.micro_batch_mean_of_means = options.step_mutation == StepMutation::kMeanOfMicroBatchMeans;
  step_options.predivide_gradients = options.step_mutation == StepMutation::kGradientsPredivided;
  step_options.loss_chunk_tokens = c.loss_chunk_tokens;
  step_options.chunked_loss_ignored = options.step_mutation == StepMutation::kChunkedLossIgnored;
  if (c.gradient_bucket_elements > 0) step_options.gradient_bucket_elements = c.gradient_bucket_elements;
  step_options.drop_boundary_label = options.drop_boundary_label;
  rec.gradient_all_reduces = cp::gradient_all_reduce_calls(m->parameters(), step_options.gradient_bucket_elements);
  auto optimizer_options = c.optimizer;
  if (options.step_mutation == StepMutation::kCandidatesWithoutWeightDecay) optimizer_options.weight_decay = 0;
  cp::CpTrainer trainer(comm, m, optimizer_options, options.ring, step_options);
  for (int64_t step = 0; step < c.steps; ++step) {
    if (options.fault && (options.fault->kind == Fault::Kind::kCrash || options.fault->kind == Fault::Kind::kHang) &&
        options.fault->rank == rec.rank && !options.fault->at_exit && options.fault->step == step)
      inject_fault(*options.fault);
    std::vector<train::Batch> batch;
    for (auto& micro : train::micro_batches_for_step(c, step)) batch.push_back(train::to_device(micro, options.device));
    std::vector<torch::Tensor> h;
    cp::CpForwardResult fwd;
    comm.reset_stats();
    trainer.ring().trace().clear();
    const bool record = step == 0 && options.record_tensors;
    // Rank 0 alone resets and reads the device's peak (ranks as threads share one device's allocator).
    StepMeter meter(options.device, rec.rank == 0);
    std::map<std::string, torch::Tensor> grads, local_grads;
    auto result = trainer.step(batch, &fwd, record ? &h : nullptr, record && rec.rank == 0 ? &grads : nullptr,
                               record ? &local_grads : nullptr);
    TrainingStep figures;
    meter.finish(figures);
    figures.loss = result.loss;
    if (rec.rank == 0) report_slow_step(c, lane, comm.size(), step, figures);
    if (rec.rank == 0 && options.root_alive) options.root_alive();
    rec.cache.push_back(trainer.ring().cache().take_counters());
    rec.steps.push_back({result.loss, result.grad_norm, param_norm(trainer.model()), result.counted_tokens,
                         figures.seconds, figures.peak_allocated, figures.peak_reserved});
    // Under the chunked loss no rank may form [B, S_loc, V] logits: the numbers would agree (chunking moves only the
    // summation order), while the memory the option exists to save at a 262k vocabulary would be spent unseen.
    if (c.loss_chunk_tokens > 0 && fwd.local_logits.defined())
      throw std::logic_error(fmt::format("loss_chunk_tokens {}: rank {} formed its [batch, S_loc, vocab] logits at step {}: "
                                         "the chunked loss was not applied", c.loss_chunk_tokens, rec.rank, step));
    if (step == 0) {
      rec.trace = trainer.ring().trace();
      rec.comm_step0 = comm.stats();
      const auto index = fwd.token_index.to(torch::kCPU).contiguous();
      rec.token_index.assign(index.data_ptr<int64_t>(), index.data_ptr<int64_t>() + index.numel());
      if (record) {
        if (fwd.local_logits.defined()) rec.logits = fwd.local_logits.to(torch::kCPU, torch::kFloat64);
        for (auto& t : h) rec.hidden.push_back(t.detach().to(torch::kCPU, torch::kFloat64));
        if (rec.rank == 0) rec.grads = std::move(grads);  // all-reduced: identical on every rank
        rec.local_grads = std::move(local_grads);
      }
    }
  }
  if (rec.rank == 0 && options.record_tensors) rec.final_params = model::parameter_copies(trainer.model(), torch::kFloat64);
  return rec;
}

LaneRun assemble_cp_run(const train::Case& c, train::DtypeLane lane, cp::Sharding sharding, std::vector<CpRankRecord> ranks, double seconds,
                        const torch::Device& device, int devices) {
  const int n = int(ranks.size());
  LaneRun run;
  describe_device(run, c, device, devices);
  run.cp = n;
  run.lane = lane;
  run.seconds = seconds;
  for (int r = 0; r < n; ++r)
    if (ranks[size_t(r)].rank != r) throw std::runtime_error("rank records out of order");
  auto& root = ranks.front();
  run.steps = root.steps;  // global values: identical on every rank
  run.gradient_all_reduces = root.gradient_all_reduces;
  run.grads = std::move(root.grads);
  run.final_params = std::move(root.final_params);
  run.cache.assign(root.cache.size(), std::vector<kernels::BlockMaskCacheCounters>(size_t(n)));
  for (int r = 0; r < n; ++r) {
    const auto& rec = ranks[size_t(r)];
    for (size_t s = 0; s < rec.cache.size() && s < run.cache.size(); ++s) run.cache[s][size_t(r)] = rec.cache[s];
    run.traces.push_back(rec.trace);
    run.comm_step0.push_back(rec.comm_step0);
    run.token_index.push_back(rec.token_index);
    run.rank_steps.push_back(rec.steps);
    run.local_grads.push_back(std::move(ranks[size_t(r)].local_grads));
  }
  // None recorded (tensors not recorded): none to judge. One rank's missing map stays, and fails the check.
  if (std::all_of(run.local_grads.begin(), run.local_grads.end(), [](auto& m) { return m.empty(); })) run.local_grads.clear();
  const cp::ShardPlan plan(c.data.seq_len, n, sharding);
  if (root.logits.defined()) {
    std::vector<torch::Tensor> logits;
    for (auto& rec : ranks) logits.push_back(rec.logits);
    run.logits = plan.unshard(logits);
  }
  for (size_t layer = 0; layer < root.hidden.size(); ++layer) {
    std::vector<torch::Tensor> per_rank;
    for (auto& rec : ranks) per_rank.push_back(rec.hidden.at(layer));
    run.hidden.push_back(plan.unshard(per_rank));
  }
  return run;
}

LaneRun run_cp(const train::Case& c, train::DtypeLane lane, int n, const RunOptions& options) {
  const auto start = Clock::now();
  std::vector<CpRankRecord> ranks(static_cast<size_t>(n));
  // One copy of the weights for every rank thread (each keeps its own gradients): memory is one model plus cp
  // gradient buffers, not cp models. Rank 0 trains the copy itself; the others' models alias it. All are built
  // before any rank starts, one at a time, so that no rank waits on a peer still building (a collective's timeout)
  // and no two transient host initialisations coexist.
  std::vector<model::Gemma4Model> models{build_model(c, train::lane_dtype(lane), options.semantics, options.device,
                                                     options.zero_weights, options.zero_final_norm)};
  for (int r = 1; r < n; ++r) models.push_back(model::model_sharing_weights(models.front()));
  train::synchronize(options.device);  // the weights are complete before rank streams (which do not wait) read them
  // The update each weight took, as run_reference records it: a reference_cp > 1 reference is the scale
  // train.param_parity judges a candidate's final weights by (judge_final_params), and its weights would hide a
  // wrong update (a weight decay dropped: 3e-6 of the weights after three steps) under their own size.
  std::map<std::string, torch::Tensor> initial;
  if (options.record_tensors && options.record_update) initial = model::parameter_copies(models.front(), torch::kFloat64);
  cp::run_local(n, [&](cp::Comm& comm) {
    // On a GPU each rank queues on a stream of its own; the local comm orders what crosses between them.
    train::OwnStream own_stream(options.device);
    ranks[size_t(comm.rank())] = run_cp_rank(comm, c, lane, options, [&] { return models[size_t(comm.rank())]; });
  }, options.timeout);
  models.clear();
  train::release_cached_memory(options.device);
  auto run = assemble_cp_run(c, lane, options.sharding, std::move(ranks),
                             std::chrono::duration<double>(Clock::now() - start).count(), options.device, 1);
  if (!initial.empty()) record_update_norms(run, initial);
  return run;
}

std::optional<LaneRun> run_cp_on(cp::Comm& world, const train::Case& c, train::DtypeLane lane, const RunOptions& options) {
  const auto start = Clock::now();
  auto mine = run_cp_rank(world, c, lane, options);
  train::release_cached_memory(options.device);
  auto all = gather_rank_records(world, mine);
  if (world.rank() != 0) return std::nullopt;
  // One process per rank: each has a device of its own when on CUDA (nccl), or shares the host (mpi on the CPU).
  return assemble_cp_run(c, lane, options.sharding, std::move(all), std::chrono::duration<double>(Clock::now() - start).count(),
                         options.device, options.device.is_cpu() ? 1 : world.size());
}

}  // namespace cpharness::runner
