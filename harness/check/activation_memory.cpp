#include "harness/check/activation_memory.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

namespace cpharness::check {

report::CheckResult check_activation_memory(const report::LaneRun& reference, const report::RunDump& golden,
                                            const std::string& golden_path, double tolerance) {
  const char* name = "memory.activations";
  auto provenance = [&](const char* key) {
    auto it = golden.provenance.find(key);
    return it == golden.provenance.end() ? std::string() : it->second;
  };
  bool golden_has = false, run_has = false;
  for (auto& [k, s] : golden.steps) golden_has = golden_has || s.activation_bytes.has_value();
  for (auto& s : reference.steps) run_has = run_has || s.activation_bytes >= 0;
  if (!golden_has)
    return report::CheckResult::skipped(name, 1, golden_path + " stores no activation memory (recorded by an older build); "
                                                 "`golden record --force` adds it");
  if (!run_has)
    return report::CheckResult::skipped(name, 1, "the reference's activation memory was not measured (it is measured on "
                                                 "the CPU, by the cpharness binary)");
  const std::string torch_here = report::base_provenance(report::kKindDump).at("torch_version");
  if (provenance("torch_version") != torch_here)
    return report::CheckResult::skipped(name, 1, fmt::format("the golden was recorded with torch {}, this build has {}: "
                                                             "libtorch's autograd decides what a forward saves",
                                                             provenance("torch_version"), torch_here));
  nlohmann::json steps = nlohmann::json::array();
  size_t worst = 0;  // index into steps of the largest |relative change|
  for (size_t s = 0; s < reference.steps.size(); ++s) {
    auto it = golden.steps.find(int64_t(s));
    if (it == golden.steps.end() || !it->second.activation_bytes || reference.steps[s].activation_bytes < 0) continue;
    const int64_t want = *it->second.activation_bytes, got = reference.steps[s].activation_bytes;
    const double change = want > 0 ? double(got - want) / double(want) : (got > 0 ? std::numeric_limits<double>::infinity() : 0.0);
    steps.push_back({{"step", s}, {"bytes", got}, {"golden_bytes", want}, {"relative_change", change}});
    if (std::abs(change) > std::abs(steps[worst]["relative_change"].get<double>())) worst = steps.size() - 1;
  }
  if (steps.empty()) return report::CheckResult::skipped(name, 1, "no step has activation memory on both sides");
  const auto& w = steps[worst];
  const double change = w["relative_change"].get<double>();
  auto r = report::CheckResult::judge(name, 1, std::nullopt, "activation_bytes_relative_change", std::abs(change), tolerance,
                                      report::Policy::BytesRelative, {{"golden", golden_path}, {"steps", steps}});
  r.message = fmt::format("step {}: the forward leaves {} bytes for the backward, the golden {} ({:+.2f} %, allowed ±{:.2f} %)",
                          w["step"].get<int64_t>(), w["bytes"].get<int64_t>(), w["golden_bytes"].get<int64_t>(), 100 * change,
                          100 * tolerance);
  if (r.status == report::Status::Fail)
    r.message += change > 0 ? ": the forward keeps more for the backward than the build that recorded the golden (activation "
                             "checkpointing not applied, a tensor saved twice?)"
                           : ": the forward keeps less than the build that recorded the golden (re-record the golden if that "
                             "was intended)";
  return r;
}

}  // namespace cpharness::check
