#include "harness/runner/hf_suite.h"

#include "harness/io/error_text.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <optional>

#include "harness/check/checks.h"
#include "harness/check/hf_parity.h"
#include "harness/cp/cp_step.h"
#include "harness/io/input_error.h"
#include "harness/report/environment.h"
#include "harness/runner/hf_run.h"

namespace cpharness::runner {

std::vector<std::string> hf_golden_files(const std::vector<std::string>& paths) {
  std::vector<std::string> files;
  for (auto& p : paths) {
    if (std::filesystem::is_directory(p)) {
      std::vector<std::string> in_dir;
      for (auto& e : std::filesystem::directory_iterator(p))
        if (e.is_regular_file() && e.path().extension() == ".h5") in_dir.push_back(e.path().string());
      std::sort(in_dir.begin(), in_dir.end());
      if (in_dir.empty()) throw io::InputError(p, "", "no *.h5 goldens in this directory");
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else if (std::filesystem::exists(p)) {
      files.push_back(p);
    } else {
      throw io::InputError(p, "", "no such file or directory");
    }
  }
  // One golden named twice (a file and its directory, two links) would be judged and counted twice.
  for (size_t i = 0; i < files.size(); ++i)
    for (size_t k = 0; k < i; ++k) {
      std::error_code ec;
      if (std::filesystem::equivalent(files[i], files[k], ec) && !ec)
        throw io::InputError(files[i], "", "given twice (also as " + files[k] + ")");
    }
  return files;
}

namespace {

// train.trained for one C++ run on a golden's weights and batch (one step: finite loss and grad norm, grad norm > 0,
// an output that does not ignore its input), so two dead models agreeing cannot pass hf.parity either.
report::CheckResult trained(const report::HfRun& run) {
  report::LaneRun lane;
  lane.cp = run.cp;
  torch::Tensor sum;
  for (auto& [name, g] : run.grads) {
    auto s = g.to(torch::kFloat64).pow(2).sum();
    sum = sum.defined() ? sum + s : s;
  }
  lane.steps.push_back({run.loss, sum.defined() ? std::sqrt(sum.item<double>()) : 0.0, 0, 0});
  if (run.logits.defined()) lane.logits = run.logits.to(torch::kFloat64);
  return check::check_trained(lane);
}

// power.boundary_label at cp N: the C++ run with one shard-edge label dropped must fail hf.parity against the
// golden, or hf.parity's tolerances could not see a CP boundary bug on this golden. `unperturbed`: the plain
// hf.parity results of the run without the perturbation; a result it failed too (a golden of weights fp32 cannot
// hold to 1e-4, whose gradient result is then judged through cp 1) is noise, not sight of the perturbation.
report::CheckResult power(const report::HfGolden& g, int cp, bool holder,
                          const std::vector<report::CheckResult>& unperturbed) {
  const auto target = cp::boundary_label_target(g.batch, cp, g.config.pad_fill_id());
  const std::string perturbation = cp::boundary_label_text(target);
  if (cp == 1) return check::check_power(cp, perturbation, {}, false, "cp 1 has no shard boundary");
  if (target.rank < 0) return check::check_power(cp, perturbation, {}, false, "no rank but 0 holds a counted target in any row");
  const auto perturbed = run_on_hf_golden(g, cp, holder, g.config.kv_share_semantics, true);
  return check::check_power(cp, perturbation, check::beyond_unperturbed(check::check_hf_parity(g, perturbed), unperturbed),
                            true);
}

// One golden: hf.parity at every cp size, and kvshare.bug_detected for a dead-K/V export.
report::CaseReport hf_parity_case(const std::string& path, const HfParityOptions& options,
                                  std::vector<std::string>& versions) {
  report::CaseReport cr;
  cr.id = std::filesystem::path(path).parent_path().filename().string() + "/" + std::filesystem::path(path).stem().string();
  cr.dtype = "fp32";
  cr.cp_sizes = options.cp_sizes;
  const auto start = std::chrono::steady_clock::now();
  try {
    const auto g = load_hf_golden(path);
    cr.description = fmt::format("{} exported by transformers {} ({}, use_cache={})", g.id(), g.transformers_version,
                                 g.mechanism, g.hf_use_cache ? "true" : "false");
    if (std::find(versions.begin(), versions.end(), g.transformers_version) == versions.end())
      versions.push_back(g.transformers_version);
    const bool holder = options.holder.value_or(g.hf_shared_kv());
    const int64_t seq = g.batch.input_ids.size(1);
    for (int cp : options.cp_sizes)
      if (cp > seq)
        throw io::InputError(path, "inputs/input_ids", fmt::format("{} tokens per row cannot be split over cp {}", seq, cp));
    // cp 1 in fp32 and fp64, made once and only when a cp N gradient result misses (check::judge_hf_grads_through_cp1).
    std::optional<HfRun> cp1, cp1_fp64;
    for (int cp : options.cp_sizes) {
      const auto run = run_on_hf_golden(g, cp, holder);
      const auto plain = check::check_hf_parity(g, run);
      bool ok = true;
      for (auto c : plain) {
        if (cp > 1 && c.metric == "max_rel_l2_grad" && c.status == report::Status::Fail && std::isfinite(c.observed)) {
          if (!cp1) cp1 = run_on_hf_golden(g, 1, holder);
          if (!cp1_fp64) cp1_fp64 = run_on_hf_golden(g, 1, holder, g.config.kv_share_semantics, false, torch::kFloat64);
          const auto run_fp64 = run_on_hf_golden(g, cp, holder, g.config.kv_share_semantics, false, torch::kFloat64);
          c = check::judge_hf_grads_through_cp1(g, run, run_fp64, {&*cp1, &*cp1_fp64});
        }
        ok = ok && c.status == report::Status::Pass;
        cr.checks.push_back(c);
      }
      cr.checks.push_back(trained(run));
      ok = ok && cr.checks.back().status == report::Status::Pass;
      cr.checks.push_back(power(g, cp, holder, plain));
      ok = ok && cr.checks.back().status != report::Status::Fail;
      std::cerr << fmt::format("{} cp {}: loss {:.9g} (transformers {:.9g}) {}\n", cr.id, cp, run.loss, g.loss(),
                               ok ? "pass" : "FAIL");
    }
    if (g.shares_kv() && !g.hf_shared_kv()) {
      const auto correct = run_on_hf_golden(g, 1, true);  // cache-gated with the holder: sharing
      cr.checks.push_back(check::check_hf_kvshare_bug_detected(g, correct));
    }
  } catch (const io::InputError& e) {
    cr.checks.clear();
    cr.error = e.what();
    std::cerr << "cpharness: error: " << e.what() << "\n";
  } catch (const std::exception& e) {  // this golden errors; the others still run and the report is written
    cr.checks.clear();
    cr.error = path + ": internal error: " + io::one_line(e);
    std::cerr << "cpharness: error: " << *cr.error << "\n";
  }
  cr.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return cr;
}

}  // namespace

report::Report run_hf_parity(const HfParityOptions& options) {
  auto r = report::new_report("cpu", "local");
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::string> versions;
  for (auto& path : hf_golden_files(options.paths)) r.cases.push_back(hf_parity_case(path, options, versions));
  if (!versions.empty()) r.environment.transformers = fmt::format("{}", fmt::join(versions, ", "));
  r.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace cpharness::runner
