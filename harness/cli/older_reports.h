// Which files an older run left where this command writes its reports, told apart from anything else a path may
// name (the usage error may be that it names the case file). Header-only and free of libtorch: the launcher
// (launcher_main.cpp) uses it before the libraries load, the verbs after.
#pragma once

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace cpharness::cli {

// The verbs that write reports (run, selftest, golden verify, hf-parity).
inline bool verb_writes_reports(const std::vector<std::string>& args) {
  return !args.empty() && (args[0] == "run" || args[0] == "selftest" || args[0] == "hf-parity" ||
                           (args[0] == "golden" && args.size() > 1 && args[1] == "verify"));
}

// Every (flag, value) of an output flag in `args`, a repeated flag's every value (repeating one is a usage error,
// which still withdraws what each names). --out DIR stands for DIR/report.json, DIR/report.xml and DIR/report.html.
inline std::vector<std::pair<std::string, std::string>> output_flags_in(const std::vector<std::string>& args) {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t i = 0; i < args.size(); ++i)
    for (const std::string flag : {"--report", "--junit", "--html", "--out"}) {
      if (args[i] == flag && i + 1 < args.size()) out.emplace_back(flag, args[i + 1]);
      else if (args[i].rfind(flag + "=", 0) == 0) out.emplace_back(flag, args[i].substr(flag.size() + 1));
    }
  return out;
}

// The first `limit` bytes of `path` when it is a regular file, else nothing.
inline std::optional<std::string> head_of(const std::string& path, size_t limit) {
  std::error_code ec;
  if (path.empty() || !std::filesystem::is_regular_file(path, ec)) return std::nullopt;
  std::ifstream in(path, std::ios::binary);
  std::string text(limit, '\0');
  in.read(text.data(), std::streamsize(limit));
  text.resize(size_t(in.gcount()));
  return text;
}

inline bool is_our_json_report(const std::string& path) {
  const auto text = head_of(path, size_t(64) << 20);
  if (!text) return false;
  const auto doc = nlohmann::json::parse(*text, nullptr, false);
  return doc.is_object() && doc.contains("schema_version") && doc.contains("tool") && doc.contains("status");
}

inline bool is_our_junit_report(const std::string& path) {
  const auto text = head_of(path, 4096);
  return text && text->find("<testsuites name=\"cpharness\"") != std::string::npos;
}

inline bool is_our_page(const std::string& path) {
  const auto text = head_of(path, 65536);
  return text && text->find("cpharness report") != std::string::npos;
}

// The launcher removes an older run's reports before the libraries load (half a second and more, in which a killed
// command used to leave them as if they were its own) and names the report files it removed here, separated by
// newlines, so that a usage error found later still leaves its error report where they were.
constexpr const char* kWithdrawnReportsVar = "CPHARNESS_WITHDRAWN_REPORTS";

}  // namespace cpharness::cli
