// Assertions over the report of a whole case, shared by the suites that run one through the runner.
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "harness/report/report.h"

namespace cpharness::testing {

// No check of `rep` failed or errored (skipped ones may): each one that did is a test failure naming it.
inline void expect_no_failed_check(const report::CaseReport& rep) {
  for (auto& k : rep.checks) {
    EXPECT_NE(k.status, report::Status::Fail) << k.name << " cp " << k.cp << ": " << k.message;
    EXPECT_NE(k.status, report::Status::Error) << k.name << " cp " << k.cp << ": " << k.message;
  }
}

// Every result of check `name` in `rep`, in report order.
inline std::vector<report::CheckResult> results_of(const report::CaseReport& rep, const std::string& name) {
  std::vector<report::CheckResult> out;
  for (auto& k : rep.checks)
    if (k.name == name) out.push_back(k);
  return out;
}

}  // namespace cpharness::testing
