// The one place a report starts: every verb (run, selftest, golden verify, hf-parity, and the error reports)
// begins with new_report, so the tool, timestamp and environment block are filled the same way everywhere.
#pragma once
#include <optional>
#include <string>

#include "harness/report/report.h"

namespace cpharness::report {

// A report with no cases yet: tool, start timestamp, torch version, determinism flags, `device`, and the comm
// backend (nullopt where no ring runs, e.g. compare).
Report new_report(const std::string& device, std::optional<std::string> comm_backend);

}  // namespace cpharness::report
