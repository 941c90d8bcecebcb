#include "harness/runner/suite.h"

#include "harness/runner/golden.h"
#include "harness/runner/root_wait.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <set>

#include "harness/cp/comm.h"
#include "harness/cp/cp_step.h"
#include "harness/cp/launcher.h"
#include "harness/io/error_text.h"
#include "harness/io/input_error.h"
#include "harness/report/environment.h"
#include "harness/report/json_report.h"
#include "harness/train/check_names.h"

namespace cpharness::runner {
namespace {

using Clock = std::chrono::steady_clock;

check::Tolerances tolerances_of(const train::Case& c) {
  check::Tolerances t;  // (by name: a field added to either struct cannot shift the others)
  t.fp32_relative = c.tolerances.fp32_relative;
  t.bf16_k = c.tolerances.bf16_k;
  t.bf16_floor = c.tolerances.bf16_floor;
  t.cp_growth = c.tolerances.cp_growth;
  t.fp32_oracle_k = c.tolerances.fp32_oracle_k;
  t.activation_memory = c.tolerances.activation_memory;
  return t;
}

void progress(const train::Case& c, const LaneRun& run) {
  for (size_t s = 0; s < run.steps.size(); ++s) {
    const auto& st = run.steps[s];
    const bool finite = std::isfinite(st.loss) && std::isfinite(st.grad_norm);
    std::cerr << fmt::format("[{}] cp{} {} step {}: loss {:.6f} grad_norm {:.6f} {}\n", c.id, run.cp, train::to_string(run.lane), s, st.loss,
                             st.grad_norm, finite ? "ok" : "NON-FINITE");
  }
}

report::Trajectory trajectory_of(const LaneRun& run) {
  report::Trajectory t;
  for (auto& s : run.steps) t.loss.push_back(s.loss), t.grad_norm.push_back(s.grad_norm), t.param_norm.push_back(s.param_norm);
  return t;
}

report::Performance performance_of(const LaneRun& run) {
  report::Performance p;
  p.device = run.device;
  p.device_name = run.device_name;
  p.devices = run.devices;
  p.tokens_per_step = run.tokens_per_step;
  for (auto& s : run.steps) {
    p.step_seconds.push_back(s.seconds);
    p.peak_allocated_bytes.push_back(s.peak_allocated >= 0 ? std::optional<int64_t>(s.peak_allocated) : std::nullopt);
    p.peak_reserved_bytes.push_back(s.peak_reserved >= 0 ? std::optional<int64_t>(s.peak_reserved) : std::nullopt);
  }
  return p;
}

void append(std::vector<report::CheckResult>& out, const train::Case& c, std::vector<report::CheckResult> more) {
  for (auto& r : more)
    if (wants_check(c, r.name)) out.push_back(std::move(r));
}

}  // namespace

bool wants_check(const train::Case& c, const std::string& check) {
  // A check outside the catalogue could never be selected by name (case files are validated against it).
  if (!train::is_check_name(check)) throw std::logic_error("check '" + check + "' is missing from train::kCheckNames");
  if (c.checks.empty()) return true;
  for (auto& want : c.checks)
    if (train::selector_matches(want, check)) return true;
  return false;
}

namespace {

// Why `run` can never put `check` in this case's report (neither judged nor skipped with a reason), or nullopt.
std::optional<std::string> never_in_report(const train::Case& c, std::string_view check) {
  if (check.substr(0, 8) == "kvshare." && c.model.num_kv_shared_layers == 0) return "the model has no KV-shared layers";
  if ((check == "golden.match" || check == "memory.activations") && c.golden.empty())
    return "the case names no golden (key golden; `golden verify CASE F.h5` judges a file)";
  if (check == "train.grad_reduction" && !c.record_tensors)
    return "record_tensors is false: the ranks' own gradients are not kept";
  if (check == "hf.parity") return "hf.parity judges goldens exported from transformers, with `cpharness hf-parity`";
  return std::nullopt;
}

}  // namespace

namespace {

// The ring's trace and the cache counters of a candidate, in the report's form.
void record_ring_and_cache(report::CaseReport& rep, int n, const LaneRun& candidate, cp::RingMode mode) {
  auto& cache = rep.block_mask_cache[n];
  cache.assign(size_t(n), {});
  for (size_t s = 0; s < candidate.cache.size(); ++s)
    for (int r = 0; r < n; ++r) {
      const auto& k = candidate.cache[s][size_t(r)];
      cache[size_t(r)].push_back({k.lookups, k.builds, k.hits, k.evictions, k.resets});
    }
  report::RingTrace trace;
  for (int r = 0; r < n; ++r) {
    const auto& entries = candidate.traces[size_t(r)];
    trace.owners.push_back(entries.empty() ? std::vector<int>{} : entries.front().owners);
  }
  for (const char* pass : {"forward", "backward"})  // the owners of each pass, from its first layer
    for (int r = 0; r < n; ++r)
      for (auto& e : candidate.traces[size_t(r)])
        if (e.pass == pass) {
          auto& table = trace.owners_by_pass[pass];
          table.resize(size_t(n));
          table[size_t(r)] = e.owners;
          break;
        }
  for (const char* pass : {"forward", "backward"}) {
    report::RingPass p{pass, 0, 0};
    for (int r = 0; r < n; ++r)
      for (auto& e : candidate.traces[size_t(r)])
        if (e.pass == pass) {
          p.comm_ops += e.ring_exchanges + e.grad_returns, p.bytes += e.bytes_sent;
          p.peak_chunks = std::max(p.peak_chunks, e.peak_chunks);
        }
    trace.passes.push_back(p);
  }
  trace.mode = cp::to_string(mode);
  rep.ring[n] = trace;
}

// The two one-step cp N runs the kvshare checks judge, under cache-gated semantics: with the holder as the
// candidate passes it, and without it (the 5.5.0-style dead K/V).
std::vector<report::CheckResult> kvshare_checks(const train::Case& c, int n, const check::Tolerances& tol,
                                                const LaneRun& reference, const RunOptions& options) {
  if (c.model.num_kv_shared_layers == 0) return {};
  RunOptions gated = options;
  gated.semantics = model::KvShareSemantics::kCacheGated;
  gated.record_tensors = false;
  gated.fault.reset();
  auto one_step = c;
  one_step.steps = 1;
  const auto with_holder = run_cp(one_step, reference.lane, n, gated);
  gated.use_share_holder = false;
  const auto without = run_cp(one_step, reference.lane, n, gated);
  return check::check_kvshare(c, n, tol, reference, with_holder, without, options.use_share_holder);
}

// Runs `body`, turning what it throws into the case's error (the first one wins).
// A communication failure also reports the peer it was waiting for (`failed_peer`).
template <typename Body>
void guarded(report::CaseReport& rep, Body&& body, int* failed_peer = nullptr) {
  try {
    body();
  } catch (const cp::CommError& e) {
    if (failed_peer) *failed_peer = e.peer();
    // (A rank's own failure, out of memory say, comes as one too, with no operation: not the communication's.)
    if (!rep.error) rep.error = (e.op().empty() ? "" : "communication failed: ") + io::one_line(e);
  } catch (const io::InputError& e) {
    if (!rep.error) rep.error = e.what();
  } catch (const std::exception& e) {
    if (!rep.error) rep.error = std::string("internal error: ") + io::one_line(e);
  }
}

// The runs of one case, as the three phases make them.
struct CaseRuns {
  std::optional<LaneRun> reference, oracle;  // oracle: the fp32 cp 1 run a bf16 lane is judged against
  std::map<int, LaneRun> candidates, uncached;
  std::map<int, LaneRun> perturbed;          // one step with the power check's perturbation
  std::map<int, double> perturbed_seconds;   // what that step cost (the power check's details)
  // The fp32 lane's fp64 reruns (run_rerun_phase): the reference's, made once per case, and cp N's where needed.
  std::optional<LaneRun> fp64_reference;
  std::map<int, LaneRun> fp64_candidates;
  std::set<int> fp32_noisy;  // the cp sizes with an fp32 figure beyond fp32_relative (judged with fp64_reference)
};

// ---- The power check: can the case see a CP-shaped bug? ----

const char* const kPowerParityChecks[] = {"train.loss_parity", "train.grad_norm_parity", "train.param_parity"};

bool power_applicable(const train::Case& c) {
  for (const char* name : kPowerParityChecks)
    if (wants_check(c, name)) return true;
  return false;
}

// A run cut to its first step: what a one-step run records (step 0, the step-0 tensors), without the final
// parameters, which belong to the last step.
LaneRun first_step(const LaneRun& run) {
  LaneRun r = run;
  r.steps.resize(std::min<size_t>(1, r.steps.size()));
  r.final_params.clear();
  r.cache.clear();
  return r;
}

// `fp64_oracle`: the reference's fp64 run where the fp32 lane made one (some figure missed fp32_relative). The
// perturbed run is then judged as the candidate was, against that oracle where fp32 misses; and a result counts as
// seeing the perturbation only where the unperturbed candidate passed it (on weights fp32 cannot hold to 1e-5, a
// result the candidate fails too is noise, not sight: the perturbation would be "seen" without being made).
report::CheckResult power_check(const train::Case& c, int n, const check::Tolerances& tol, const CaseRuns& runs,
                                const LaneRun* fp64_oracle = nullptr) {
  // The perturbed run drops it in its first micro-batch (cp_step.cpp), whose rows are the ones searched.
  const auto target = cp::boundary_label_target(train::micro_batches_for_step(c, 0).front(), n, c.model.pad_fill_id(),
                                                check::case_sharding(c));
  const std::string perturbation = cp::boundary_label_text(target);
  if (!power_applicable(c))
    return check::check_power(n, perturbation, {}, false,
                              "the case selects no check that compares training runs (train.loss_parity, "
                              "train.grad_norm_parity, train.param_parity); count checks cannot see a numerical bug");
  if (target.rank < 0) return check::check_power(n, perturbation, {}, false, "no rank but 0 holds a counted target in any row");
  const auto p = runs.perturbed.find(n);
  if (p == runs.perturbed.end()) return report::CheckResult::errored("power.boundary_label", n, std::nullopt, "the perturbed run is missing");
  auto one_step = c;
  one_step.steps = 1;
  const auto ref = first_step(*runs.reference);
  const auto oracle = runs.oracle ? std::optional<LaneRun>(first_step(*runs.oracle)) : std::nullopt;
  const auto oracle64 = fp64_oracle ? std::optional<LaneRun>(first_step(*fp64_oracle)) : std::nullopt;
  const check::Fp64Rerun fp64{oracle64 ? &*oracle64 : nullptr, nullptr};
  auto judged = [&](const LaneRun& run) {
    return check::check_training(one_step, tol, ref, run, oracle ? &*oracle : nullptr, "", &fp64);
  };
  std::vector<report::CheckResult> unperturbed;
  if (oracle64)
    if (auto cand = runs.candidates.find(n); cand != runs.candidates.end()) unperturbed = judged(first_step(cand->second));
  std::vector<report::CheckResult> seen;
  const auto perturbed = judged(p->second);
  for (auto& r : check::beyond_unperturbed(perturbed, unperturbed))
    if (wants_check(c, r.name)) seen.push_back(r);
  auto res = check::check_power(n, perturbation, seen, true);
  // How near the perturbed run came to each selected check's bound: an insensitive case says by how much it missed.
  nlohmann::json nearest = nlohmann::json::object();
  for (auto& r : perturbed)
    if (wants_check(c, r.name) && r.policy != report::Policy::Count && r.threshold > 0 && std::isfinite(r.observed)) {
      const double share = r.observed / r.threshold;
      auto& best = nearest[r.name];
      if (best.is_null() || share > best["observed_over_threshold"].get<double>())
        best = {{"metric", r.metric}, {"step", r.step ? nlohmann::json(*r.step) : nlohmann::json()},
                {"observed_over_threshold", share}};
    }
  res.details["perturbed_nearest_to_bound"] = nearest;
  if (auto s = runs.perturbed_seconds.find(n); s != runs.perturbed_seconds.end()) res.details["perturbed_run_seconds"] = s->second;
  return res;
}

// The cp sizes a case runs at: under a process backend the world size, else --cp or the case's own.
std::vector<int> cp_sizes_of(const train::Case& c, const SuiteOptions& options) {
  if (options.world) return {options.world->size()};  // one process per rank: the world size is the cp size
  std::vector<int> cps;
  for (auto n : options.cp_sizes ? *options.cp_sizes : std::vector<int>(c.cp_sizes.begin(), c.cp_sizes.end()))
    cps.push_back(int(n));
  return cps;
}

// The case's device, or --device's.
torch::Device device_of(const train::Case& c, const SuiteOptions& options) {
  try {
    return train::parse_device(options.device.value_or(c.device));
  } catch (const std::invalid_argument& e) {
    throw io::InputError(options.device ? "--device" : c.path, "device", e.what());
  }
}

std::optional<std::string> skip_reason(const train::Case& c, const SuiteOptions& options) {
  for (auto& feature : c.requires_features)
    if (feature == "cuda" && !options.has_cuda) return "requires cuda: " + train::cuda_unavailable_reason();
  if (device_of(c, options).is_cuda() && !options.has_cuda) return "device cuda: " + train::cuda_unavailable_reason();
  return std::nullopt;
}

// A process backend on CUDA: "cuda" without an index means the local rank's GPU (one GPU per rank on a node;
// on a one-GPU machine every rank shares GPU 0).
torch::Device rank_device(const torch::Device& device, const SuiteOptions& options) {
  if (!options.world || !device.is_cuda() || device.has_index()) return device;
  const int count = std::max<int>(1, int(torch::cuda::device_count()));
  return torch::Device(torch::kCUDA, c10::DeviceIndex(cp::detect_launch_env().local_rank % count));
}

RunOptions run_options_of(const train::Case& c, const SuiteOptions& options) {
  RunOptions o = options.run;
  o.timeout = options.timeout;
  o.device = rank_device(device_of(c, options), options);
  o.record_tensors = o.record_tensors && c.record_tensors;
  o.ring.q_block = c.q_block;
  o.ring.kv_block = c.kv_block;
  if (!c.block_mask_cache) o.ring.cache_enabled = false;
  o.ring.hop_limit = c.ring_hop_limit;
  o.sharding = check::case_sharding(c);
  o.ring.mode = check::case_ring_mode(c);
  return o;
}

// The run candidates are judged against: the cp 1 reference, or a ring run at the case's reference_cp (when cp 1
// cannot hold the sequence), recording the same tensors in global order.
LaneRun reference_run(const train::Case& c, train::DtypeLane lane, const RunOptions& options) {
  if (c.reference_cp <= 1) return run_reference(c, lane, options);
  // The candidates' activation checkpointing is theirs to test; the reference recomputes only when the case asks
  // for it for memory, and then in the correct mode.
  auto k = c;
  k.activation_checkpointing =
      c.reference_checkpointing ? model::ActivationCheckpointing::kKvHolder : model::ActivationCheckpointing::kOff;
  auto o = options;
  o.fault.reset();
  // The candidates' known-bad variants (selftest) never reach the reference, or a bug would agree with itself.
  o.ring.mutation = cp::RingMutation::kNone;
  o.step_mutation = StepMutation::kNone;
  o.record_update = true;
  return run_cp(k, lane, int(c.reference_cp), o);
}

// golden.match for a case that names its golden: cp N agreeing with cp 1 cannot see a bug both share (a mask rule, the
// RoPE, a norm), a stored cp 1 reference can. The reference just made is compared when it is the cp 1 run with its
// tensors; else the case's cp 1 reference is run again for it. Goldens are CPU runs (golden record): on CUDA the
// check is skipped, not judged against another device's rounding.
report::CheckResult golden_check(const train::Case& c, const RunOptions& run_options, const CaseRuns& runs) {
  if (!run_options.device.is_cpu())
    return report::CheckResult::skipped("golden.match", 1, "the golden is a CPU run (golden record) and this case trains on " +
                                                               run_options.device.str() + "; verify it with `golden verify` on the CPU");
  const bool reuse = c.reference_cp <= 1 && runs.reference && runs.reference->logits.defined();
  const LaneRun* oracle = reuse && runs.oracle && runs.oracle->logits.defined() ? &*runs.oracle : nullptr;
  return verify_golden(c, c.golden, nullptr, reuse ? &*runs.reference : nullptr, oracle);
}

// memory.activations for a case that names its golden: the reference just made, when it is the cp 1 CPU run.
report::CheckResult golden_memory_check(const train::Case& c, const RunOptions& run_options, const CaseRuns& runs) {
  if (!run_options.device.is_cpu())
    return report::CheckResult::skipped("memory.activations", 1, "activation memory is measured on the CPU (the golden is a "
                                                                  "CPU run) and this case trains on " + run_options.device.str());
  if (c.reference_cp > 1 || !runs.reference)
    return report::CheckResult::skipped("memory.activations", 1, "the reference is a ring run (reference_cp > 1); the golden "
                                                                  "holds the cp 1 reference's memory");
  return verify_golden_memory(c, c.golden, *runs.reference);
}

// Where a checkpoint case's weights came from, for the report: a weight that kept its seeded initialisation (a
// cache-gated model's shared layers' own K/V, which transformers >= 5.5.2 does not save) is named, never silent.
nlohmann::json checkpoint_contents_json(const train::Case& c) {
  const auto& s = c.checkpoint_contents;
  return {{"checkpoint", c.checkpoint}, {"loaded", s.loaded}, {"kept_init", s.kept_init},
          {"skipped_redundant", s.skipped_redundant.size()}, {"skipped_non_text", s.skipped_non_text.size()}};
}

// Phase A (rank 0): the cp 1 reference (and the fp32 oracle of a bf16 lane), mask and per-chunk attention checks.
void run_reference_phase(const train::Case& c, const std::vector<int>& cps, const RunOptions& run_options,
                         const SuiteOptions& options, report::CaseReport& rep, CaseRuns& runs) {
  if (!c.checkpoint.empty()) {
    rep.page["weights"] = checkpoint_contents_json(c);
    if (!c.checkpoint_contents.kept_init.empty())
      std::cerr << fmt::format("[{}] {} weights are not in the checkpoint and keep their seeded initialisation (as "
                               "transformers leaves missing keys): {}\n", c.id, c.checkpoint_contents.kept_init.size(),
                               fmt::join(c.checkpoint_contents.kept_init, ", "));
  }
  runs.reference = reference_run(c, c.dtype, run_options);
  progress(c, *runs.reference);
  const int ref_cp = int(c.reference_cp);
  rep.trajectories[ref_cp] = trajectory_of(*runs.reference);
  rep.performance[ref_cp] = performance_of(*runs.reference);
  if (ref_cp > 1) rep.reference_cp = ref_cp;
  rep.checks.push_back(check::check_trained(*runs.reference, c.trained_exemptions));  // whatever the case selects
  if (c.dtype == train::DtypeLane::kBf16) {
    runs.oracle = reference_run(c, train::DtypeLane::kFp32, run_options);
    const auto t = trajectory_of(*runs.oracle);  // for the page: the reference's oracle next to the bf16 runs
    rep.page["oracle_trajectory"] = {{"dtype", "fp32"}, {"loss", report::series_json(t.loss)}, {"grad_norm", report::series_json(t.grad_norm)},
                                     {"param_norm", report::series_json(t.param_norm)}};
  }
  if (!c.golden.empty() && wants_check(c, "golden.match")) rep.checks.push_back(golden_check(c, run_options, runs));
  if (!c.golden.empty() && wants_check(c, "memory.activations")) rep.checks.push_back(golden_memory_check(c, run_options, runs));
  for (int n : cps) {
    if (n < 1) throw io::InputError(c.path, "cp", fmt::format("cp sizes must be >= 1, got {}", n));
    if (n == 1 || n == ref_cp) continue;  // the reference itself
    append(rep.checks, c, check::check_masks(c, n, run_options.ring, options.block_mask_mutation));
    auto grids = check::block_mask_grids(c, n, run_options.ring);  // for the page, where small enough to draw
    if (!grids.is_null()) rep.page["block_masks"][std::to_string(n)] = std::move(grids);
    const auto expected = check::expected_cache_counts(c, n, run_options.ring.cache_enabled);
    rep.page["block_mask_cache_expected"][std::to_string(n)] = {
        {"lookups", expected.lookups}, {"builds", expected.builds}, {"hits", expected.lookups - expected.builds},
        {"resets", c.micro_batches}, {"builds_uncached", check::expected_cache_counts(c, n, false).builds}};
    if (wants_check(c, "attention.parity")) append(rep.checks, c, check::check_attention_parity(c, n, run_options.ring));
    if (run_options.root_alive) run_options.root_alive();
  }
}

// A cp N run as the candidates run: over the world's processes under a process backend (rank 0 gets the run, the
// others nothing), else ranks as threads of this process.
std::optional<LaneRun> run_candidate(const SuiteOptions& options, const train::Case& c, train::DtypeLane lane, int n,
                                     const RunOptions& o) {
  if (options.world) return run_cp_on(*options.world, c, lane, o);
  return run_cp(c, lane, n, o);
}

// Phase B (every rank): the cp N candidates, cached and (for the cache checks) one uncached step.
void run_candidate_phase(const train::Case& c, const std::vector<int>& cps, const RunOptions& run_options,
                         const SuiteOptions& options, report::CaseReport& rep, CaseRuns& runs) {
  auto uncached_options = run_options;
  uncached_options.ring.cache_enabled = false;
  uncached_options.record_tensors = false;
  uncached_options.fault.reset();
  auto one_step = c;  // the uncached build count needs one step (every lookup builds)
  one_step.steps = 1;
  auto perturbed_options = run_options;  // the power check's one step
  perturbed_options.drop_boundary_label = !options.power_not_perturbed;
  perturbed_options.fault.reset();  // it records step-0 tensors as the candidate does: the gradient check sees most
  auto candidate_run = [&](const train::Case& k, int n, const RunOptions& o) {
    return run_candidate(options, k, c.dtype, n, o);
  };
  for (int n : cps) {
    if (n == 1 || n == int(c.reference_cp)) continue;  // the reference itself
    // A communication failure here is fatal under a process backend: the ranks can no longer agree.
    guarded(rep, [&] {
      if (auto run = candidate_run(c, n, run_options)) runs.candidates.emplace(n, std::move(*run));
      if (wants_check(c, "cache.build_count"))
        if (auto run = candidate_run(one_step, n, uncached_options)) runs.uncached.emplace(n, std::move(*run));
      if (power_applicable(c)) {
        const auto t0 = Clock::now();
        if (auto run = candidate_run(one_step, n, perturbed_options)) runs.perturbed.emplace(n, std::move(*run));
        runs.perturbed_seconds[n] = std::chrono::duration<double>(Clock::now() - t0).count();
      }
    }, &options.failed_peer);
    if (rep.error && options.world) {
      options.world_failed = true;
      break;
    }
  }
}

// Which fp64 reruns the fp32 lane's judgement of cp N needs, on weights the harness did not condition, where some
// fp32 figure missed fp32_relative against the reference: the step-0 gradients are then judged against an fp64
// oracle of the reference, the later steps and the final parameters between fp64 reruns of the reference and of cp N
// (check::judge_final_params says why). A case that passes in fp32 pays for none.
struct Fp32Noise {
  bool params = false, grads = false, later_steps = false, step0 = false;
  bool any() const { return params || grads || later_steps || step0; }
};

Fp32Noise fp32_noise_of(const train::Case& c, const check::Tolerances& tol, const LaneRun& ref, const LaneRun& candidate) {
  Fp32Noise noise;
  noise.params = wants_check(c, "train.param_parity") && !ref.final_params.empty() &&
                 !check::final_params_within_fp32(tol, ref, candidate);
  noise.grads = wants_check(c, "train.grad_norm_parity") && !ref.grads.empty() && !candidate.grads.empty() &&
                !check::step0_grads_within_fp32(tol, ref, candidate);
  // From step 1 on, the runs train weights the updates moved apart: their loss, grad norm and param norm too.
  noise.later_steps = !check::steps_within_fp32(tol, ref, candidate, 1);
  noise.step0 = !check::steps_within_fp32(tol, ref, candidate, 0) || !check::step0_logits_within_fp32(c, tol, ref, candidate);
  return noise;
}

// Phase B2 (every rank under a process backend): the fp64 reruns. The reference's is rank 0's solo work; cp N's runs
// as the candidate ran, on its own backend (`run_candidate`): a bug of that backend alone (process ranks, MPI, NCCL)
// is then in the rerun that judges the candidate's later steps, as it was in the fp32 run, instead of a run of ranks
// as threads that never had it. Rank 0 decides, from the runs it holds, and tells the others.
void run_rerun_phase(const train::Case& c, const RunOptions& run_options, const RunOptions& solo_options,
                     const SuiteOptions& options, report::CaseReport& rep, CaseRuns& runs, bool root) {
  if (c.dtype != train::DtypeLane::kFp32) return;
  const auto tol = tolerances_of(c);
  auto rerun = [](RunOptions o) {
    o.fault.reset();
    o.record_tensors = true;
    return o;
  };
  std::vector<int> candidates_to_rerun;
  if (root && !rep.error) guarded(rep, [&] {
    for (auto& [n, candidate] : runs.candidates) {
      const auto noise = fp32_noise_of(c, tol, *runs.reference, candidate);
      if (!noise.any()) continue;
      runs.fp32_noisy.insert(n);
      if (!runs.fp64_reference) runs.fp64_reference = reference_run(c, train::DtypeLane::kFp64, rerun(solo_options));
      const bool grads_beyond_oracle =
          noise.grads && !check::step0_grads_within_oracle(tol, *runs.reference, candidate, *runs.fp64_reference);
      if (noise.params || noise.later_steps || grads_beyond_oracle) candidates_to_rerun.push_back(n);
    }
  });
  if (options.world) {  // one cp size, the world's: rank 0's decision reaches every rank
    try {
      const int64_t decided = wait_for_root(*options.world, candidates_to_rerun.empty() ? 0 : 1, options.root_wait);
      candidates_to_rerun.assign(decided ? 1 : 0, options.world->size());
    } catch (const cp::CommError& e) {
      if (!rep.error)
        rep.error = root ? "communication failed: " + io::one_line(e)
                         : "rank 0 sent no sign of its fp64 rerun of the reference for --timeout (stopped, hung or "
                           "dead): " + io::one_line(e);
      options.failed_peer = root ? e.peer() : 0;
      options.world_failed = true;
      return;
    }
  }
  for (int n : candidates_to_rerun) {
    guarded(rep, [&] {
      if (auto run = run_candidate(options, c, train::DtypeLane::kFp64, n, rerun(run_options)))
        runs.fp64_candidates.emplace(n, std::move(*run));
    }, &options.failed_peer);
    if (rep.error && options.world) {
      options.world_failed = true;
      break;
    }
  }
}

// Phase C (rank 0): every check that compares a candidate with the reference, and the repeat run.
void judge_phase(const train::Case& c, const RunOptions& run_options, const SuiteOptions& options,
                 report::CaseReport& rep, const CaseRuns& runs) {
  const auto tol = tolerances_of(c);
  for (auto& [n, candidate] : runs.candidates) {
    progress(c, candidate);
    rep.trajectories[n] = trajectory_of(candidate);
    rep.performance[n] = performance_of(candidate);
    const auto u = runs.uncached.find(n);
    rep.checks.push_back(check::check_trained(candidate, c.trained_exemptions));  // whatever the case selects
    append(rep.checks, c, check::check_shard_layout(c, candidate));
    append(rep.checks, c, check::check_rank_agreement(candidate));
    append(rep.checks, c, check::check_grad_reduction(candidate));
    append(rep.checks, c, check::check_ring(c, candidate));
    append(rep.checks, c, check::check_cache(c, candidate, u == runs.uncached.end() ? nullptr : &u->second));
    // The fp64 reruns made for this cp size (run_rerun_phase).
    check::Fp64Rerun fp64;
    if (runs.fp32_noisy.count(n) && runs.fp64_reference) fp64.reference = &*runs.fp64_reference;
    if (auto r = runs.fp64_candidates.find(n); r != runs.fp64_candidates.end()) fp64.candidate = &r->second;
    append(rep.checks, c, check::check_training(c, tol, *runs.reference, candidate, runs.oracle ? &*runs.oracle : nullptr,
                                                options.dump_dir, &fp64));
    auto profile = check::divergence_profile(c, tol, *runs.reference, candidate, runs.oracle ? &*runs.oracle : nullptr);
    if (!profile.is_null()) rep.page["divergence_profile"][std::to_string(n)] = std::move(profile);
    rep.checks.push_back(power_check(c, n, tol, runs, fp64.reference));  // whatever the case selects
    if (wants_check(c, "kvshare.loss_parity") || wants_check(c, "kvshare.bug_detected"))
      append(rep.checks, c, kvshare_checks(c, n, tol, *runs.reference, run_options));
    record_ring_and_cache(rep, n, candidate, run_options.ring.mode);
  }
  if (wants_check(c, "determinism.repeat_bitwise")) {
    auto repeat_case = c;
    if (options.perturb_repeat_seed) repeat_case.init_seed += 1;
    rep.checks.push_back(check::check_determinism(c, int(c.reference_cp), *runs.reference,
                                                  reference_run(repeat_case, c.dtype, run_options)));
  }
}

// The case's verdict on stderr: status, duration, the error, and every check that did not pass.
void print_case_result(const report::CaseReport& rep) {
  const auto why = rep.error_reason();  // also the synthesized reason (e.g. no check ran)
  std::cerr << fmt::format("[{}] {} in {:.1f}s{}\n", rep.id, report::to_string(rep.status()), rep.duration_s,
                           why ? ": " + *why : "");
  for (auto& chk : rep.checks)
    if (chk.status != report::Status::Pass && chk.status != report::Status::Skipped)
      std::cerr << fmt::format("[{}]   {} cp{}{}: {}\n", rep.id, chk.name, chk.cp, chk.rank ? fmt::format(" rank {}", *chk.rank) : "",
                               chk.message);
}

}  // namespace

std::optional<std::string> unsupported_configuration(const train::Case& c, const SuiteOptions& options) {
  for (int n : cp_sizes_of(c, options))  // --cp and the world size are checked here, the case's own on load
    if (auto why = train::cp_size_problem(n, c.data.seq_len)) return *why;
  if (skip_reason(c, options)) return std::nullopt;
  // A selection the case can never produce: it would pass judged on nothing it asked for (train.trained is judged
  // whatever a case selects), and bisect would call every commit good.
  for (size_t i = 0; i < c.checks.size(); ++i) {
    std::optional<std::string> why;
    bool produced = false;
    for (auto name : train::kCheckNames) {
      if (!train::selector_matches(c.checks[i], name)) continue;
      const auto never = never_in_report(c, name);
      if (!never) produced = true;
      else if (!why) why = never;
    }
    if (!produced) return fmt::format("checks[{}] '{}' selects no check this case can run: {}", i, c.checks[i], why.value_or("?"));
  }
  if (!c.golden.empty() && (wants_check(c, "golden.match") || wants_check(c, "memory.activations"))) {
    std::error_code ec;
    const auto status = std::filesystem::status(c.golden, ec);
    if (ec && ec != std::errc::no_such_file_or_directory) return fmt::format("golden: {}: {}", c.golden, ec.message());
    if (!std::filesystem::exists(status))
      return fmt::format("golden: no such file: {} (record it with `cpharness golden record {} -o {}`)", c.golden, c.path, c.golden);
    if (!std::filesystem::is_regular_file(status)) return fmt::format("golden: {} is not a regular file", c.golden);
    // Another case's golden, another version of this case, a damaged file: said now, not after the reference ran.
    if (auto why = case_golden_problem(c, c.golden)) return "golden: " + *why;
  }
  // A case whose candidates are all the reference's own size compares nothing: a pass would be vacuous.
  const auto cps = cp_sizes_of(c, options);
  if (std::all_of(cps.begin(), cps.end(), [&](int n) { return n == c.reference_cp; }))
    return fmt::format("cp sizes [{}] hold no candidate: every one is the reference's size (reference_cp {}), so "
                       "nothing would be compared", fmt::join(cps, ", "), c.reference_cp);
  // On the host, a model that cannot fit is refused before it is built (not killed by the kernel half-way): its
  // fp32 weights, gradients, two AdamW states and the cached initialisation, at the least.
  if (!device_of(c, options).is_cuda()) {
    const double need = double(c.model.parameter_count()) * 4.0 * 5.0;
    const double have = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
    if (have > 0 && need > have)
      return fmt::format("the model ({:.3g} B parameters) needs at least {:.1f} GiB of host memory (fp32 weights, "
                         "gradients, AdamW states, the cached initialisation); this machine has {:.1f} GiB",
                         double(c.model.parameter_count()) / 1e9, need / double(1 << 30), have / double(1 << 30));
  }
  if (options.world && c.reference_cp > 1)
    return fmt::format("reference_cp {} runs its ranks as threads of rank 0; under a process backend (--comm {}) only "
                       "reference_cp 1 is supported so far", c.reference_cp, cp::backend_name(options.world->backend()));
  return std::nullopt;
}

// Three phases, so that under a process backend (options.world) only the candidates need every rank: A and C
// run on rank 0, B on every rank. With the local backend there is one process and all three run in it.
report::CaseReport run_case(const train::Case& c, const SuiteOptions& options) {
  const auto start = Clock::now();
  const bool root = !options.world || options.world->rank() == 0;
  report::CaseReport rep;
  rep.id = c.id;
  rep.description = c.description;
  rep.dtype = train::to_string(c.dtype);
  const auto cps = cp_sizes_of(c, options);
  rep.cp_sizes = cps;
  if ((rep.skip_reason = skip_reason(c, options))) {
    if (root) std::cerr << fmt::format("[{}] skipped: {}\n", c.id, *rep.skip_reason);
    return rep;
  }
  if ((rep.error = unsupported_configuration(c, options))) {
    if (root) print_case_result(rep);
    return rep;
  }
  const auto run_options = run_options_of(c, options);
  // Rank 0's solo work (phases A and C) tells the waiting ranks it is still working, step by step.
  std::optional<RootHeartbeat> heartbeat;
  auto solo_options = run_options;
  if (options.world && root) {
    heartbeat.emplace(*options.world, options.root_wait);
    solo_options.root_alive = [&heartbeat] { heartbeat->beat(); };
  }
  // A beat that could not reach a rank: that rank stopped waiting (died, hung), and no later collective can work.
  auto beat_failed = [&] {
    if (!heartbeat || heartbeat->failed_peer() < 0) return false;
    options.failed_peer = heartbeat->failed_peer();
    options.world_failed = true;
    return true;
  };
  CaseRuns runs;
  const auto& fault = options.run.fault;  // rank 0 stops, or throws, during its cp 1 work (fault injection)
  const bool reference_fault = fault && fault->rank == 0 && !fault->at_exit &&
                               (fault->kind == Fault::Kind::kStop || fault->kind == Fault::Kind::kThrow);
  if (!root) guarded(rep, [&] { prepare_initial_weights(c); });  // while rank 0 trains the reference
  if (root) guarded(rep, [&] {
    if (reference_fault) inject_fault(*fault);
    run_reference_phase(c, cps, solo_options, options, rep, runs);
  });
  // Under a process backend rank 0 then tells the others whether the case goes on; they wait for it on its signs of
  // life, each within --timeout (root_wait.h).
  bool go = !rep.error;
  if (options.world && !beat_failed()) {
    try {
      go = wait_for_root(*options.world, go ? 1 : 0, options.root_wait) != 0;
    } catch (const cp::CommError& e) {
      if (root) {
        if (!rep.error) rep.error = "communication failed: " + io::one_line(e);
        options.failed_peer = e.peer();
      } else {
        rep.error = "rank 0 sent no sign of its cp 1 work for --timeout (stopped, hung or dead): " + io::one_line(e);
        options.failed_peer = 0;
      }
      options.world_failed = true;
      go = false;
    }
  } else if (options.world) {
    go = false;
  }
  if (go) run_candidate_phase(c, cps, run_options, options, rep, runs);
  if (go && !options.world_failed && !beat_failed()) run_rerun_phase(c, run_options, solo_options, options, rep, runs, root);
  if (root && !rep.error) guarded(rep, [&] { judge_phase(c, solo_options, options, rep, runs); });
  beat_failed();
  if (rep.error) {  // an error report carries no partial verdicts, nor the page's data of a half-run case
    rep.checks.clear();
    rep.page = nlohmann::json::object();
  }
  rep.duration_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (root) print_case_result(rep);
  return rep;
}

report::Report run_suite(const std::vector<train::Case>& cases, const SuiteOptions& options) {
  const auto start = Clock::now();
  // On CUDA, deterministic kernels where PyTorch has them (index_add_, embedding backward without atomics), so the
  // determinism checks hold there too; ops without one only warn. Recorded in the report's environment.
  for (auto& c : cases)
    if (options.has_cuda && device_of(c, options).is_cuda()) at::globalContext().setDeterministicAlgorithms(true, true);
  auto r = report::new_report(options.has_cuda ? "cuda" : "cpu",
                              options.world ? cp::backend_name(options.world->backend()) : options.comm);
  if (!options.planted_bug.empty()) r.environment.planted_bug = options.planted_bug;
  for (auto& c : cases) {
    if (options.world_failed) {
      report::CaseReport rep;
      rep.id = c.id;
      rep.dtype = train::to_string(c.dtype);
      rep.error = "not run: a rank failed in an earlier case";
      r.cases.push_back(rep);
      continue;
    }
    r.cases.push_back(run_case(c, options));
  }
  r.duration_s = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

std::string summary_table(const report::Report& r) {
  // trained: every run's train.trained passed; power: the case saw the power check's perturbation at every cp.
  std::string out = fmt::format("{:<28} {:<6} {:<9} {:>7} {:>7} {:>8} {:>8} {:>12}\n", "case", "dtype", "status", "checks",
                                "failed", "seconds", "trained", "power");
  for (auto& c : r.cases) {
    int failed = 0;
    std::string trained = "-", power = "-";
    for (auto& k : c.checks) {
      failed += k.status == report::Status::Fail || k.status == report::Status::Error;
      if (k.name == "train.trained") trained = (trained != "NO" && k.status == report::Status::Pass) ? "yes" : "NO";
      if (k.name == "power.boundary_label") {
        const std::string p = k.status == report::Status::Pass    ? "yes"
                              : k.status == report::Status::Skipped ? "n/a"
                                                                    : "INSENSITIVE";
        power = (power == "-" || p == "INSENSITIVE" || (p == "yes" && power == "n/a")) ? p : power;
      }
    }
    out += fmt::format("{:<28} {:<6} {:<9} {:>7} {:>7} {:>8.1f} {:>8} {:>12}\n", c.id, c.dtype, report::to_string(c.status()),
                       c.checks.size(), failed, c.duration_s, trained, power);
  }
  const auto s = r.summary();
  out += fmt::format("{} case(s): {} passed, {} failed, {} errors, {} skipped; {} checks, {} failed; {:.1f}s -> {}\n", s.cases,
                     s.passed, s.failed, s.errors, s.skipped, s.checks_total, s.checks_failed + s.checks_errors, r.duration_s,
                     report::to_string(r.status()));
  return out;
}

}  // namespace cpharness::runner
