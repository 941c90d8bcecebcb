#include "harness/report/compare_directories.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>

#include "harness/io/input_error.h"
#include "harness/report/run_dump.h"

namespace cpharness::report {
namespace {

std::vector<std::string> h5_files(const std::string& dir) {
  std::vector<std::string> names;
  for (auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".h5") names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// One line of the directory summary for a compared pair.
std::string pair_summary(const std::string& name, const CompareResult& result) {
  std::string first = "-";
  if (result.first_divergence) {
    const auto& e = result.entries[*result.first_divergence];
    first = fmt::format("first divergence {} ({} rel {:.3g})", e.path, to_string(e.status), e.rel_diff);
  }
  size_t differing = 0;
  for (auto& e : result.entries) differing += e.differs() ? 1 : 0;
  return fmt::format("{:<28} {}: {} of {} entries differ: {} beyond tolerance, {} on one side only; {}", name,
                     result.status(), differing, result.entries.size(),
                     result.counts.out_of_tolerance + result.counts.nonfinite + result.counts.shape_mismatch,
                     result.counts.missing, first);
}

}  // namespace

DirectoryComparison compare_directories(const std::string& dir_a, const std::string& dir_b, const ComparePolicy& policy,
                                        size_t rows) {
  const auto na = h5_files(dir_a), nb = h5_files(dir_b);
  std::vector<std::string> all = na;
  for (auto& n : nb)
    if (!std::binary_search(na.begin(), na.end(), n)) all.push_back(n);
  std::sort(all.begin(), all.end());
  if (all.empty()) throw io::InputError(dir_a, "", "no *.h5 files in either directory");
  DirectoryComparison out;
  out.doc = {{"a", dir_a}, {"b", dir_b}, {"pairs", nlohmann::json::array()}, {"only_in_a", nlohmann::json::array()},
             {"only_in_b", nlohmann::json::array()}};
  std::vector<std::string> summary;
  for (auto& n : all) {
    const bool in_a = std::binary_search(na.begin(), na.end(), n), in_b = std::binary_search(nb.begin(), nb.end(), n);
    if (!in_a || !in_b) {
      // A file on one side only is a missing entry at the scale of files: it fails unless the policy allows those.
      out.passed = out.passed && !policy.missing_is_failure;
      out.doc[in_a ? "only_in_a" : "only_in_b"].push_back(n);
      summary.push_back(fmt::format("{:<28} only in {}", n, in_a ? dir_a : dir_b));
      continue;
    }
    const auto fa = (std::filesystem::path(dir_a) / n).string(), fb = (std::filesystem::path(dir_b) / n).string();
    const auto result = compare_dumps(read_run_dump(fa), read_run_dump(fb), policy);
    out.text += "=== " + n + "\n" + render_text(result, fa, fb, rows) + "\n";
    out.passed = out.passed && result.passed;
    auto j = to_json(result);
    j["file"] = n;
    out.doc["pairs"].push_back(j);
    summary.push_back(pair_summary(n, result));
  }
  out.text += fmt::format("=== {} vs {} (reference): {}\n", dir_a, dir_b, out.passed ? "pass" : "fail");
  for (auto& line : summary) out.text += "  " + line + "\n";
  out.doc["status"] = out.passed ? "pass" : "fail";
  return out;
}

}  // namespace cpharness::report
