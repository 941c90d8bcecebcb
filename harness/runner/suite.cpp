#include "harness/runner/suite.h"

#include <fmt/format.h>

#include <chrono>
#include <iostream>

#include "cpharness/version.h"
#include "harness/cp/comm.h"
#include "harness/io/input_error.h"
#include "torch/headeronly/version.h"

namespace cpharness::runner {
namespace {

using Clock = std::chrono::steady_clock;

check::Tolerances tolerances_of(const train::Case& c) {
  return {c.tolerances.fp32_relative, c.tolerances.bf16_k, c.tolerances.bf16_floor, c.tolerances.cp_growth};
}

void progress(const train::Case& c, const LaneRun& run) {
  for (size_t s = 0; s < run.steps.size(); ++s) {
    const auto& st = run.steps[s];
    const bool finite = std::isfinite(st.loss) && std::isfinite(st.grad_norm);
    std::cerr << fmt::format("[{}] cp{} {} step {}: loss {:.6f} grad_norm {:.6f} {}\n", c.id, run.cp, run.lane, s, st.loss,
                             st.grad_norm, finite ? "ok" : "NON-FINITE");
  }
}

report::Trajectory trajectory_of(const LaneRun& run) {
  report::Trajectory t;
  for (auto& s : run.steps) t.loss.push_back(s.loss), t.grad_norm.push_back(s.grad_norm), t.param_norm.push_back(s.param_norm);
  return t;
}

void append(std::vector<report::CheckResult>& out, const train::Case& c, std::vector<report::CheckResult> more) {
  for (auto& r : more)
    if (wants_check(c, r.name)) out.push_back(std::move(r));
}

}  // namespace

bool wants_check(const train::Case& c, const std::string& check) {
  if (c.checks.empty()) return true;
  for (auto& want : c.checks)
    if (want == check || (!want.empty() && want.back() == '.' && check.rfind(want, 0) == 0)) return true;
  return false;
}

bool agree_with_root(cp::Comm& world, bool ok, std::chrono::milliseconds wait) {
  const auto saved = world.timeout();
  world.set_timeout(wait);
  auto flag = torch::tensor({int64_t(ok ? 1 : 0)}, torch::kInt64);
  try {
    world.broadcast(flag, 0);
  } catch (...) {
    world.set_timeout(saved);
    throw;
  }
  world.set_timeout(saved);
  return flag.item<int64_t>() != 0;
}

namespace {

// The ring's trace and the cache counters of a candidate, in the report's form.
void record_ring_and_cache(report::CaseReport& rep, int n, const LaneRun& candidate) {
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
  for (const char* pass : {"forward", "backward"}) {
    report::RingPass p{pass, 0, 0};
    for (int r = 0; r < n; ++r)
      for (auto& e : candidate.traces[size_t(r)])
        if (e.pass == pass) p.comm_ops += e.ring_exchanges + e.grad_returns, p.bytes += e.bytes_sent;
    trace.passes.push_back(p);
  }
  rep.ring[n] = trace;
}

// Runs `body`, turning what it throws into the case's error (the first one wins).
// A communication failure also reports the peer it was waiting for (`failed_peer`).
template <typename Body>
void guarded(report::CaseReport& rep, Body&& body, int* failed_peer = nullptr) {
  try {
    body();
  } catch (const cp::CommError& e) {
    if (failed_peer) *failed_peer = e.peer();
    if (!rep.error) rep.error = std::string("communication failed: ") + e.what();
  } catch (const io::InputError& e) {
    if (!rep.error) rep.error = e.what();
  } catch (const std::exception& e) {
    if (!rep.error) rep.error = std::string("internal error: ") + e.what();
  }
}

}  // namespace

// Three phases, so that under a process backend (options.world) only the candidates need every rank:
//   A (rank 0): the cp 1 reference (and the fp32 oracle of a bf16 lane), mask and per-chunk attention checks;
//   B (every rank): the cp N candidates, cached and uncached;
//   C (rank 0): the checks that compare candidates with the reference.
// With the local backend there is one process and all three run in it.
report::CaseReport run_case(const train::Case& c, const SuiteOptions& options) {
  const auto start = Clock::now();
  const bool root = !options.world || options.world->rank() == 0;
  report::CaseReport rep;
  rep.id = c.id;
  rep.description = c.description;
  rep.dtype = train::to_string(c.dtype);
  std::vector<int> cps;
  if (options.world) cps = {options.world->size()};  // one process per rank: the world size is the cp size
  else
    for (auto n : options.cp_sizes ? *options.cp_sizes : std::vector<int>(c.cp_sizes.begin(), c.cp_sizes.end())) cps.push_back(int(n));
  rep.cp_sizes = cps;
  for (auto& feature : c.requires_features) {
    if (feature == "cuda" && !options.has_cuda) {
      rep.skip_reason = "requires cuda: no CUDA device on this machine";
      if (root) std::cerr << fmt::format("[{}] skipped: {}\n", c.id, *rep.skip_reason);
      return rep;
    }
  }
  const std::string lane = rep.dtype;
  const auto tol = tolerances_of(c);
  RunOptions run_options = options.run;
  run_options.timeout = options.timeout;
  run_options.ring.q_block = run_options.ring.kv_block = c.block_size;
  if (!c.block_mask_cache) run_options.ring.cache_enabled = false;

  std::optional<LaneRun> reference, oracle;
  if (root)
    guarded(rep, [&] {
      reference = run_reference(c, lane, run_options);
      progress(c, *reference);
      rep.trajectories[1] = trajectory_of(*reference);
      if (lane == "bf16") oracle = run_reference(c, "fp32", run_options);
      for (int n : cps) {
        if (n < 1) throw io::InputError(c.path, "cp", fmt::format("cp sizes must be >= 1, got {}", n));
        if (n == 1) continue;  // the reference itself
        append(rep.checks, c, check::check_masks(c, n, run_options.ring, options.block_mask_mutation));
        if (wants_check(c, "attention.parity")) append(rep.checks, c, check::check_attention_parity(c, n, run_options.ring));
      }
    });

  // Phase B. Under a process backend rank 0 first tells the others whether the case goes on.
  bool go = !rep.error;
  if (options.world) go = agree_with_root(*options.world, go, options.root_wait);
  std::map<int, LaneRun> candidates, uncached;
  if (go) {
    auto uncached_options = run_options;
    uncached_options.ring.cache_enabled = false;
    uncached_options.record_tensors = false;
    uncached_options.fault.reset();
    auto one_step = c;  // the uncached build count needs one step (every lookup builds)
    one_step.steps = 1;
    auto candidate_run = [&](const train::Case& k, int n, const RunOptions& o) -> std::optional<LaneRun> {
      if (options.world) return run_cp_on(*options.world, k, lane, o);
      return run_cp(k, lane, n, o);
    };
    for (int n : cps) {
      if (n == 1) continue;
      // A communication failure here is fatal under a process backend: the ranks can no longer agree.
      guarded(rep, [&] {
        if (auto run = candidate_run(c, n, run_options)) candidates.emplace(n, std::move(*run));
        if (wants_check(c, "cache.build_count"))
          if (auto run = candidate_run(one_step, n, uncached_options)) uncached.emplace(n, std::move(*run));
      }, &options.failed_peer);
      if (rep.error && options.world) {
        options.world_failed = true;
        break;
      }
    }
  }

  if (root && !rep.error)
    guarded(rep, [&] {
      for (auto& [n, candidate] : candidates) {
        progress(c, candidate);
        rep.trajectories[n] = trajectory_of(candidate);
        const auto u = uncached.find(n);
        append(rep.checks, c, check::check_ring(c, candidate));
        append(rep.checks, c, check::check_cache(c, candidate, u == uncached.end() ? nullptr : &u->second));
        append(rep.checks, c, check::check_training(c, tol, *reference, candidate, oracle ? &*oracle : nullptr, options.dump_dir));
        if (wants_check(c, "kvshare.loss_parity") || wants_check(c, "kvshare.bug_detected"))
          append(rep.checks, c, check::check_kvshare(c, n, tol, *reference, run_options));
        record_ring_and_cache(rep, n, candidate);
      }
      if (wants_check(c, "determinism.repeat_bitwise")) {
        auto repeat_case = c;
        if (options.perturb_repeat_seed) repeat_case.init_seed += 1;
        rep.checks.push_back(check::check_determinism(c, 1, *reference, run_reference(repeat_case, lane, run_options)));
      }
    });
  if (rep.error) rep.checks.clear();  // an error report carries no partial verdicts
  rep.duration_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (!root) return rep;
  const auto status = rep.status();
  std::cerr << fmt::format("[{}] {} in {:.1f}s{}\n", c.id, report::to_string(status), rep.duration_s,
                           rep.error ? ": " + *rep.error : "");
  for (auto& chk : rep.checks)
    if (chk.status != report::Status::Pass && chk.status != report::Status::Skipped)
      std::cerr << fmt::format("[{}]   {} cp{}{}: {}\n", c.id, chk.name, chk.cp, chk.rank ? fmt::format(" rank {}", *chk.rank) : "", chk.message);
  return rep;
}

report::Report run_suite(const std::vector<train::Case>& cases, const SuiteOptions& options) {
  const auto start = Clock::now();
  report::Report r;
  r.timestamp = report::utc_timestamp_now();
  r.environment.torch = fmt::format("{}.{}.{}", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  r.environment.device = options.has_cuda ? "cuda" : "cpu";
  r.environment.comm_backend = options.comm;
  r.environment.determinism = {{"intra_op_threads", at::get_num_threads()}, {"deterministic_algorithms", at::globalContext().deterministicAlgorithms()}};
  r.environment.comm_backend = options.world ? cp::backend_name(options.world->backend()) : options.comm;
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
  std::string out = fmt::format("{:<28} {:<6} {:<9} {:>7} {:>7} {:>8}\n", "case", "dtype", "status", "checks", "failed", "seconds");
  for (auto& c : r.cases) {
    int failed = 0;
    for (auto& k : c.checks) failed += k.status == report::Status::Fail || k.status == report::Status::Error;
    out += fmt::format("{:<28} {:<6} {:<9} {:>7} {:>7} {:>8.1f}\n", c.id, c.dtype, report::to_string(c.status()), c.checks.size(),
                       failed, c.duration_s);
  }
  const auto s = r.summary();
  out += fmt::format("{} case(s): {} passed, {} failed, {} errors, {} skipped; {} checks, {} failed; {:.1f}s -> {}\n", s.cases,
                     s.passed, s.failed, s.errors, s.skipped, s.checks_total, s.checks_failed + s.checks_errors, r.duration_s,
                     report::to_string(r.status()));
  return out;
}

}  // namespace cpharness::runner
