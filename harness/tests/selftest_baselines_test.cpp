// selftest's baselines: the unmutated code must be seen to pass every check a mutant targets, at every cp size the
// mutant runs at; otherwise a failure the code has anyway (at cp 8, say) would be credited to the mutant.
#include <gtest/gtest.h>

#include <algorithm>

#include "harness/runner/selftest.h"

namespace cpharness::runner {
namespace {

TEST(SelftestBaselines, EachCoversEveryCheckAndCpSizeOfItsMutants) {
  const auto mutants = selftest_mutants();
  const auto baselines = selftest_baselines(mutants);
  bool some_mutant_has_its_own_cp = false;
  for (const auto& m : mutants) {
    SCOPED_TRACE(m.name);
    ASSERT_TRUE(baselines.count(m.variant)) << m.variant;
    const auto& c = baselines.at(m.variant);
    EXPECT_NE(std::find(c.checks.begin(), c.checks.end(), m.target_check), c.checks.end());
    for (auto n : m.cp) EXPECT_NE(std::find(c.cp_sizes.begin(), c.cp_sizes.end(), n), c.cp_sizes.end()) << "cp " << n;
    some_mutant_has_its_own_cp |= !m.cp.empty();
  }
  EXPECT_TRUE(some_mutant_has_its_own_cp) << "the cp sizes above were never exercised";
  // Only the mutants' own variants: a baseline nobody needs would cost a run.
  for (const auto& [variant, c] : baselines)
    EXPECT_TRUE(std::any_of(mutants.begin(), mutants.end(), [&](const Mutant& m) { return m.variant == variant; })) << variant;
}

}  // namespace
}  // namespace cpharness::runner
