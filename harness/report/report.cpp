#include "harness/report/report.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>

#include <fmt/format.h>

#include "cpharness/version.h"
#include "harness/io/atomic_file.h"
#include "harness/io/input_error.h"

namespace cpharness::report {

std::string_view to_string(Status s) {
  switch (s) {
    case Status::Pass: return "pass";
    case Status::Fail: return "fail";
    case Status::Error: return "error";
    case Status::Skipped: return "skipped";
  }
  return "error";
}

std::optional<Status> parse_status(std::string_view s) {
  for (Status v : {Status::Pass, Status::Fail, Status::Error, Status::Skipped})
    if (s == to_string(v)) return v;
  return std::nullopt;
}

std::string_view to_string(Policy p) {
  switch (p) {
    case Policy::Exact: return "exact";
    case Policy::Fp32Relative: return "fp32_relative";
    case Policy::Bf16OracleRelative: return "bf16_oracle_relative";
    case Policy::Fp32OracleRelative: return "fp32_oracle_relative";
    case Policy::Fp64Rerun: return "fp64_rerun";
    case Policy::BytesRelative: return "bytes_relative";
    case Policy::Count: return "count";
  }
  return "exact";
}

std::optional<Policy> parse_policy(std::string_view s) {
  for (Policy v : {Policy::Exact, Policy::Fp32Relative, Policy::Bf16OracleRelative, Policy::Fp32OracleRelative, Policy::Fp64Rerun, Policy::Count,
                   Policy::BytesRelative})
    if (s == to_string(v)) return v;
  return std::nullopt;
}

int exit_code(Status s) {
  switch (s) {
    case Status::Pass:
    case Status::Skipped: return 0;
    case Status::Fail: return 1;
    case Status::Error: return 2;
  }
  return 2;
}

CheckResult CheckResult::judge(std::string name, int cp, std::optional<int> rank, std::string metric,
                               double observed, double threshold, Policy policy, nlohmann::json details) {
  CheckResult c;
  c.name = std::move(name);
  c.cp = cp;
  c.rank = rank;
  c.metric = std::move(metric);
  c.observed = observed;
  c.threshold = threshold;
  c.policy = policy;
  c.details = details.is_null() ? nlohmann::json::object() : std::move(details);
  const std::string_view pol = to_string(policy);
  if (policy == Policy::Count) {
    const bool ok = observed == threshold;
    c.status = ok ? Status::Pass : Status::Fail;
    c.message = fmt::format("observed {} {} expected {} ({})", observed, ok ? "==" : "!=", threshold, pol);
  } else if (!std::isfinite(observed)) {
    c.status = Status::Fail;
    c.message = fmt::format("observed {} is not finite; allowed {:.6g} ({})", observed, threshold, pol);
  } else {
    const bool ok = observed <= threshold;
    c.status = ok ? Status::Pass : Status::Fail;
    c.message = fmt::format("observed {:.6g} {} allowed {:.6g} ({})", observed, ok ? "<=" : ">", threshold, pol);
  }
  return c;
}

CheckResult CheckResult::errored(std::string name, int cp, std::optional<int> rank, std::string reason) {
  CheckResult c;
  c.name = std::move(name);
  c.status = Status::Error;
  c.cp = cp;
  c.rank = rank;
  c.observed = std::nan("");
  c.message = std::move(reason);
  return c;
}

CheckResult CheckResult::skipped(std::string name, int cp, std::string reason) {
  CheckResult c;
  c.name = std::move(name);
  c.status = Status::Skipped;
  c.cp = cp;
  c.observed = std::nan("");
  c.message = std::move(reason);
  return c;
}

Status CaseReport::status() const {
  if (error) return Status::Error;
  bool any_fail = false, any_pass = false;
  for (const auto& c : checks) {
    if (c.status == Status::Error) return Status::Error;
    any_fail |= c.status == Status::Fail;
    any_pass |= c.status == Status::Pass;
  }
  if (any_fail) return Status::Fail;
  if (skip_reason) return Status::Skipped;
  if (checks.empty()) return Status::Error;
  return any_pass ? Status::Pass : Status::Skipped;
}

std::optional<std::string> CaseReport::error_reason() const {
  if (error) return error;
  if (status() != Status::Error) return std::nullopt;
  if (checks.empty()) return std::string("the case produced no check results");
  int n = 0;
  for (const auto& c : checks) n += c.status == Status::Error;
  return fmt::format("{} check{} errored", n, n == 1 ? "" : "s");
}

std::optional<std::string> CaseReport::skip_reason_text() const {
  if (skip_reason) return skip_reason;
  if (status() != Status::Skipped) return std::nullopt;
  return fmt::format("all {} checks were skipped", checks.size());
}

Tool this_tool() { return Tool{kToolName, kToolVersion, git_sha()}; }

Status Report::status() const {
  if (error) return Status::Error;
  bool any_fail = false, any_ran = false;
  for (const auto& c : cases) {
    const Status s = c.status();
    if (s == Status::Error) return Status::Error;
    any_fail |= s == Status::Fail;
    any_ran |= s != Status::Skipped;
  }
  if (any_fail) return Status::Fail;
  return any_ran ? Status::Pass : Status::Skipped;
}

Summary Report::summary() const {
  Summary s;
  s.duration_s = duration_s;
  for (const auto& c : cases) {
    ++s.cases;
    switch (c.status()) {
      case Status::Pass: ++s.passed; break;
      case Status::Fail: ++s.failed; break;
      case Status::Error: ++s.errors; break;
      case Status::Skipped: ++s.skipped; break;
    }
    for (const auto& k : c.checks) {
      ++s.checks_total;
      switch (k.status) {
        case Status::Pass: ++s.checks_passed; break;
        case Status::Fail: ++s.checks_failed; break;
        case Status::Error: ++s.checks_errors; break;
        case Status::Skipped: ++s.checks_skipped; break;
      }
    }
  }
  return s;
}

int exit_code(const Report& r, bool allow_nothing_ran) {
  const Status s = r.status();
  if (s == Status::Skipped) return allow_nothing_ran ? 0 : kExitNothingRan;
  return exit_code(s);
}

std::string sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
    const unsigned char c = b(0);
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) len = 1, cp = c;
    else if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    bool ok = len > 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      ok = (b(k) & 0xC0) == 0x80;
      cp = (cp << 6) | (b(k) & 0x3F);
    }
    ok = ok && !(len == 3 && cp < 0x800) && !(len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) &&
         !(cp >= 0xD800 && cp <= 0xDFFF);
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

std::string utc_timestamp_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void write_file_atomically(const std::string& path, std::string_view contents) {
  namespace fs = std::filesystem;
  const std::string tmp = io::detail::temp_path_for(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    std::error_code ec;
    const fs::path dir = fs::path(path).parent_path();
    if (!dir.empty() && !fs::is_directory(dir, ec))
      throw io::InputError(path, "", "cannot write: directory " + dir.string() + " does not exist");
    throw io::InputError(path, "", std::string("cannot create temp file ") + tmp + ": " + std::strerror(err));
  }
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    io::detail::remove_quietly(tmp);
    throw io::InputError(path, "", std::string(what) + " temp file " + tmp + ": " + std::strerror(err));
  };
  const char* p = contents.data();
  std::size_t left = contents.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot write");
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("cannot fsync");
  if (::close(fd) != 0) {
    const int err = errno;
    io::detail::remove_quietly(tmp);
    throw io::InputError(path, "", std::string("cannot close temp file ") + tmp + ": " + std::strerror(err));
  }
  io::detail::commit_temp_file(tmp, path);  // removes tmp and throws InputError on failure
  // Make the rename itself durable; best effort.
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace cpharness::report
