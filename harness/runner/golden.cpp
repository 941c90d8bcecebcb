#include "harness/runner/golden.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <iostream>
#include <mutex>
#include <regex>
#include <set>

#include "harness/report/environment.h"

#include <fmt/format.h>

#include "harness/check/activation_memory.h"
#include "harness/io/input_error.h"
#include "harness/report/json_report.h"

namespace cpharness::runner {

std::string case_hash(const train::Case& c) {
  // Everything that can change the reference's numbers: not the description, the thresholds, the checks chosen,
  // the cp sizes compared or the candidates' activation checkpointing (the reference recomputes only under
  // reference_checkpointing); nor, unless the reference itself is a ring run (reference_cp > 1), the ring's block
  // size, mask cache, options, shard layout and micro-batches, which only the candidates use (the cp 1 reference
  // runs the whole batch in one pass).
  auto content = c.raw;
  if (content.is_object()) {
    for (const char* key : {"description", "tolerances", "checks", "cp", "activation_checkpointing", "golden",
                            "gradient_bucket_elements"})  // buckets are bit-identical to one flat all-reduce
      content.erase(key);
    if (c.reference_cp <= 1)
      for (const char* key : {"block_size", "block_mask_cache", "ring", "sharding", "micro_batches"}) content.erase(key);
  }
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : content.dump()) h = (h ^ ch) * 1099511628211ull;
  return fmt::format("{:016x}", h);
}

report::RunDump reference_dump(const train::Case& c, const std::string& kind) {
  return reference_dump(c, run_reference(c, c.dtype), kind);
}

report::RunDump reference_dump(const train::Case& c, const LaneRun& run, const std::string& kind) {
  const std::string lane = train::to_string(run.lane);
  report::RunDump d;
  d.provenance = report::base_provenance(kind);
  d.provenance["dtype"] = lane;
  d.provenance["case_id"] = c.id;
  d.provenance["case_hash"] = case_hash(c);
  d.provenance["config"] = c.model.to_json().dump();
  d.provenance["kv_share_semantics"] = model::to_string(c.model.kv_share_semantics);
  const auto batch = train::batch_for_step(c, 0);
  d.inputs = {{"input_ids", batch.input_ids}, {"labels", batch.labels}, {"position_ids", batch.position_ids},
              {"document_ids", batch.meta.document_ids}, {"padding", batch.meta.padding}};
  if (batch.meta.vision_group_ids.defined()) d.inputs["vision_group_ids"] = batch.meta.vision_group_ids;
  const std::string last_layer = fmt::format("layers.{}.", c.model.num_hidden_layers - 1);
  for (size_t s = 0; s < run.steps.size(); ++s) {
    report::StepRecord rec;
    rec.loss = run.steps[s].loss;
    rec.grad_norm = run.steps[s].grad_norm;
    rec.param_norm = run.steps[s].param_norm;
    if (run.steps[s].activation_bytes >= 0) rec.activation_bytes = run.steps[s].activation_bytes;
    if (s == 0) {
      // fp32 storage is exact for both lanes (the fp64 copies hold fp32 or bf16 values).
      // (none under the chunked loss, which never forms them, or without record_tensors)
      if (run.logits.defined()) rec.logits = run.logits.to(torch::kFloat32);
      for (size_t i = 0; i < run.hidden.size(); ++i) rec.hidden[int64_t(i)] = run.hidden[i].to(torch::kFloat32);
      for (auto& [name, g] : run.grads)
        if (name.rfind("layers.", 0) != 0 || name.rfind("layers.0.", 0) == 0 || name.rfind(last_layer, 0) == 0)
          rec.grads[name] = g.to(torch::kFloat32);
    }
    d.steps[int64_t(s)] = rec;
  }
  return d;
}

report::ComparePolicy golden_policy(const train::Case& c) {
  // bf16: only structure and inputs here; every value is then judged against the fp32 oracle.
  if (c.dtype == train::DtypeLane::kBf16) return report::ComparePolicy::relative(1e30);
  // fp64: the lane's own tolerance (tiny-e4b-fp64: 1e-10), not fp32's. Measured 3e-16 between CPUs; an fp32
  // rounding anywhere in the shared path (RoPE frequencies computed in fp64 and rounded once more: 6e-8) is seen
  // only here, since cp 1 and cp N share it and the fp32 goldens' 1e-5 is above it.
  if (c.dtype == train::DtypeLane::kFp64) return report::ComparePolicy::relative(c.tolerances.fp32_relative);
  return report::ComparePolicy::fp32();
}

// A step's loss, grad norm and parameter norm are each scaled by the largest error that figure showed up to that
// step, as the parity checks scale them (README, "Checks"): one step's error is a single draw that swings tenfold
// between steps (the golden of tiny-e4b-bf16: grad norm 3.7e-3, 1.0e-2, 3.1e-4 from the oracle at steps 0-2), and a
// lucky draw on one side failed the other (an AVX512-BF16 machine's 6.8e-3 at step 2 against the golden's 3.1e-4).
std::map<std::string, double> per_step_figures_at_their_largest(std::map<std::string, double> errors) {
  static const std::regex step_figure(R"(steps/(\d+)/(loss|grad_norm|param_norm))");
  std::map<std::string, std::map<int64_t, std::string>> paths_of;  // figure -> step -> path
  for (auto& [path, error] : errors) {
    std::smatch m;
    if (std::regex_match(path, m, step_figure)) paths_of[m[2]][std::stoll(m[1])] = path;
  }
  for (auto& [figure, by_step] : paths_of) {
    double largest = 0;
    for (auto& [step, path] : by_step) {
      const double error = errors[path];
      if (!std::isnan(error)) errors[path] = largest = std::max(largest, error);  // NaN stays, and fails
    }
  }
  return errors;
}

namespace {

// bf16 results depend on the CPU's bf16 kernels (measured: a golden recorded on one x86 machine is 2-9 % away from
// the same run on an AVX512-BF16 machine in every gradient; on an AMX-BF16 machine the step-2 grad norm of
// tiny-e4b-bf16 is 0.26 % away, 9x the golden's own error), so no fixed bound, and no bound set by the smaller of
// the two errors, is sound. Both are bf16 approximations of the same fp32 truth, the case's fp32 oracle: each entry
// passes when neither is more than k times farther from that oracle than the other, plus a floor of one bf16
// rounding (2^-8 relative, or the case's bf16_floor if larger). A moved golden, or a fresh run whose bf16 path got
// worse, is far from the oracle while the other is not, and fails; two CPUs rounding differently do not.
void judge_bf16_against_oracle(const train::Case& c, const report::RunDump& golden, const report::RunDump& fresh,
                               const LaneRun* oracle_run, report::CompareResult& result) {
  auto oracle_case = c;
  oracle_case.dtype = train::DtypeLane::kFp32;
  const auto oracle = oracle_run ? reference_dump(oracle_case, *oracle_run, "dump") : reference_dump(oracle_case, "dump");
  auto errors_against_oracle = [&](const report::RunDump& d) {
    std::map<std::string, double> out;
    for (auto& e : report::compare_dumps(d, oracle, report::ComparePolicy::relative(1e30)).entries) out[e.path] = e.rel_diff;
    return out;
  };
  const auto golden_error = errors_against_oracle(golden), fresh_error = errors_against_oracle(fresh);
  const auto golden_scale = per_step_figures_at_their_largest(golden_error);
  const auto fresh_scale = per_step_figures_at_their_largest(fresh_error);
  const double k = c.tolerances.bf16_k, floor = std::max(c.tolerances.bf16_floor, std::ldexp(1.0, -8));
  for (auto& e : result.entries) {
    if (e.kind == report::EntryKind::kInput || e.status != report::EntryStatus::kPass) continue;
    if (!golden_error.count(e.path) || !fresh_error.count(e.path)) continue;
    const double eg = golden_error.at(e.path), ef = fresh_error.at(e.path);
    const double allowed_fresh = k * golden_scale.at(e.path) + floor, allowed_golden = k * fresh_scale.at(e.path) + floor;
    e.tolerance = report::Tolerance::relative(std::min(allowed_fresh, allowed_golden) + std::min(eg, ef));
    if (ef <= allowed_fresh && eg <= allowed_golden) continue;
    e.status = report::EntryStatus::kOutOfTolerance;
    // The oracle is today's code in fp32: a golden far from it while today's bf16 run is close means today's
    // numerics are not the golden's (a regression, or a change the golden was not refreshed for); the other way
    // round, today's bf16 path lost precision.
    const bool fresh_far = ef > allowed_fresh;
    const double other_scale = fresh_far ? golden_scale.at(e.path) : fresh_scale.at(e.path);
    const double other_error = fresh_far ? eg : ef;
    e.message = fmt::format("{}: error against today's fp32 oracle: run {:.3g}, golden {:.3g}; {} is more than {} x the "
                            "other's{} + {:.3g} (rel {:.3g} between them){}",
                            e.path, ef, eg, fresh_far ? "the run's" : "the golden's", k,
                            other_scale != other_error ? fmt::format(" largest up to this step ({:.3g})", other_scale) : "",
                            floor, e.rel_diff,
                            fresh_far ? ": this build's bf16 path lost precision"
                                      : ": this build computes something else than the build that recorded the golden");
  }
  report::recount(result);
}


std::string provenance_of(const io::StringMap& provenance, const char* key) {
  auto it = provenance.find(key);
  return it == provenance.end() ? std::string() : it->second;
}

std::string provenance_of(const report::RunDump& d, const char* key) { return provenance_of(d.provenance, key); }

// A golden of another case, another version of the case or another lane is an input error, whichever check reads it.
void require_golden_of_case(const train::Case& c, const std::string& golden_path, const io::StringMap& provenance) {
  auto get = [&](const char* key) { return provenance_of(provenance, key); };
  if (get("case_id") != c.id)
    throw io::InputError(golden_path, "provenance/case_id", fmt::format("golden of case '{}', not '{}'", get("case_id"), c.id));
  if (!get("case_hash").empty() && get("case_hash") != case_hash(c))
    throw io::InputError(golden_path, "provenance/case_hash",
                         fmt::format("recorded from another version of case '{}' (hash {}, the case now hashes to {}); "
                                     "refresh it with `golden record --force`", c.id, get("case_hash"), case_hash(c)));
  const std::string lane = train::to_string(c.dtype);
  if (!get("dtype").empty() && get("dtype") != lane)
    throw io::InputError(golden_path, "provenance/dtype", fmt::format("golden lane {} but the case runs {}", get("dtype"), lane));
}

// The golden of `c` at `golden_path`, read whole.
report::RunDump read_case_golden(const train::Case& c, const std::string& golden_path) {
  auto golden = report::read_run_dump(golden_path);
  require_golden_of_case(c, golden_path, golden.provenance);
  return golden;
}

}  // namespace

std::optional<std::string> case_golden_problem(const train::Case& c, const std::string& golden_path) {
  try {
    // Read whole (every dataset's layout, type and data), once per version of the file: the CLI asks before the
    // suite starts and the suite again per case, and a golden damaged past its header must not wait for the
    // comparison, after the whole reference trained.
    std::error_code ec;
    const auto size = std::filesystem::file_size(golden_path, ec);
    const auto mtime = std::filesystem::last_write_time(golden_path, ec);
    const std::string version = fmt::format("{}|{}|{}", golden_path, size, mtime.time_since_epoch().count());
    static std::mutex mu;
    static std::set<std::string> whole_and_sound;
    bool known;
    {
      std::lock_guard<std::mutex> lk(mu);
      known = !ec && whole_and_sound.count(version);
    }
    if (known) {
      require_golden_of_case(c, golden_path, report::read_run_dump_provenance(golden_path));
      return std::nullopt;
    }
    read_case_golden(c, golden_path);  // throws io::InputError naming a damaged object, or another case's golden
    std::lock_guard<std::mutex> lk(mu);
    if (!ec) whole_and_sound.insert(version);
    return std::nullopt;
  } catch (const io::InputError& e) {
    return std::string(e.what());
  }
}

report::CheckResult verify_golden(const train::Case& c, const std::string& golden_path, report::CompareResult* out,
                                  const LaneRun* reference, const LaneRun* oracle) {
  const auto golden = read_case_golden(c, golden_path);
  auto get = [&](const char* key) { return provenance_of(golden, key); };
  const auto fresh = reference ? reference_dump(c, *reference, "dump") : reference_dump(c, "dump");
  auto result = report::compare_dumps(fresh, golden, golden_policy(c));
  if (c.dtype == train::DtypeLane::kBf16) judge_bf16_against_oracle(c, golden, fresh, oracle, result);
  if (out) *out = result;
  const bool pass = result.passed;
  nlohmann::json details = report::to_json(result);
  details["golden"] = golden_path;
  details["golden_case_hash"] = get("case_hash");
  details["case_hash"] = case_hash(c);
  details["golden_git_sha"] = get("git_sha");
  auto check = report::CheckResult::judge("golden.match", 1, std::nullopt, "entries_out_of_tolerance",
                                          double(result.counts.out_of_tolerance + result.counts.nonfinite + result.counts.missing +
                                                 result.counts.shape_mismatch),
                                          0, report::Policy::Count, details);
  // The message names the tensor (its HDF5 path) as well as the numbers: JUnit and the summary show only this line.
  const report::CompareEntry* first = result.first_divergence ? &result.entries[*result.first_divergence] : nullptr;
  for (size_t i = 0; !first && !pass && i < result.entries.size(); ++i)
    if (result.entries[i].failed()) first = &result.entries[i];
  if (!pass && first) check.message += fmt::format("; first divergence: {}: {}", first->path, first->message);
  return check;
}

report::CheckResult verify_golden_memory(const train::Case& c, const std::string& golden_path, const LaneRun& reference) {
  return check::check_activation_memory(reference, read_case_golden(c, golden_path), golden_path,
                                        c.tolerances.activation_memory);
}

report::Report run_golden_verify(const std::string& case_path, const std::string& golden_path) {
  auto r = report::new_report("cpu", std::nullopt);
  report::CaseReport cr;
  const auto start = std::chrono::steady_clock::now();
  train::Case c;
  try {  // a case that cannot be read is the run's error, with no case in the report (as `run` reports it)
    c = train::load_case(case_path);
  } catch (const io::InputError& e) {
    r.error = e.what();
    std::cerr << "cpharness: error: " << e.what() << "\n";
    return r;
  }
  try {
    cr.id = c.id;
    cr.dtype = train::to_string(c.dtype);
    cr.cp_sizes = {1};
    report::CompareResult cmp;
    const LaneRun reference = run_reference(c, c.dtype);
    cr.checks.push_back(verify_golden(c, golden_path, &cmp, &reference));
    cr.checks.push_back(verify_golden_memory(c, golden_path, reference));
    std::cerr << report::render_text(cmp, "run", golden_path);
  } catch (const io::InputError& e) {
    cr.id = cr.id.empty() ? case_path : cr.id;
    cr.checks.clear();
    cr.error = e.what();
    std::cerr << "cpharness: error: " << e.what() << "\n";
  }
  cr.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.cases.push_back(cr);
  r.duration_s = cr.duration_s;
  return r;
}

}  // namespace cpharness::runner
