// Every check can fail: runs each check against a known-bad mutant of the code it guards and proves the check
// fails and names the bug; the same checks pass on the unmutated code first, so the failure is the mutant's.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "harness/report/report.h"
#include "harness/runner/suite.h"

namespace cpharness::runner {

struct Mutant {
  std::string name;         // e.g. "ring_rotated_wrong_way"
  std::string bug;          // what is wrong, in words
  std::string target_check; // the catalogue check that must catch it
  std::vector<std::string> with_checks = {};  // also selected for the mutant's run (a check that judges others)
  std::vector<int64_t> cp = {};               // the cp sizes of the mutant's run, where not the case's (3)
  std::string variant = "default";            // the selftest case's variant for this mutant (its baseline too)
  std::string acts_only_with = {};            // the case option without which the planted bug changes nothing
};

std::vector<Mutant> selftest_mutants();

// The options with one planted bug of the catalogue (a Mutant's name) applied; std::invalid_argument for a name
// not in it. Used by selftest, and by `run`/`bisect` under CPHARNESS_PLANT_BUG to prove a gate can go red.
SuiteOptions mutate(SuiteOptions options, const std::string& name);

// The small case the selftest runs (E4B-like layout: KV sharing, both layer types, packed documents,
// padding, a window smaller than a shard), cp 3.
// The selftest case: "default" (contiguous shards, the hop limit), "zigzag" (zigzag shards, which the hop limit
// cannot go with), "stream" (the streaming ring) or "micro_batches" (two rows in two micro-batches).
train::Case selftest_case(const std::string& variant = "default");

// One baseline case per layout the mutants run on, by variant: it selects every check they target and runs at every
// cp size they run at, so that the unmutated code is seen to pass where each mutant is seen to fail.
std::map<std::string, train::Case> selftest_baselines(const std::vector<Mutant>& mutants);

// One report case per mutant plus a baseline; status pass only when every mutant was caught.
report::Report run_selftest(const SuiteOptions& base, const std::vector<std::string>& only = {});

}  // namespace cpharness::runner
