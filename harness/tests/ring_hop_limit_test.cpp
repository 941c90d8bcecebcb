// The sliding-window hop limit (case key ring.hop_limit): sliding layers without vision groups fetch only the chunks
// their window reaches. The chunks it skips have no allowed pair, so the run is bitwise the one without the limit,
// with fewer exchanges; every check passes with it on, and ring.hop_limit counts the exchanges per layer type. The
// ring checks read the trace of every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "harness/check/checks.h"
#include "harness/cp/shard_plan.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

train::Case make_case(bool hop_limit) {
  auto j = nlohmann::json::parse(R"({"id": "hops", "model": {"preset": "tiny-e4b", "overrides": {"sliding_window": 12}},
    "data": {"seq_len": 64, "document_lengths": [30, 30], "padding": 4, "seed": 3}, "steps": 2, "cp": [4, 8],
    "block_size": 4})");
  j["ring"] = {{"hop_limit", hop_limit}};
  return train::case_from_json(j, "hops.json");
}

TEST(RingHopLimit, StepsFollowTheWindowOnSlidingLayersOnly) {
  const auto c = make_case(true);
  int sliding = 0;
  for (int64_t l = 0; l < c.model.num_hidden_layers; ++l) {
    const bool limited = c.model.layer_window(l).has_value() && !c.model.layer_vision_bidirectional(l);
    sliding += limited;
    // cp 8: S_loc 8, ceil(12 / 8) = 2; cp 4: S_loc 16, ceil(12 / 16) = 1; full layers: cp - 1.
    EXPECT_EQ(check::expected_ring_steps(c, l, 8), limited ? 2 : 7) << l;
    EXPECT_EQ(check::expected_ring_steps(c, l, 4), limited ? 1 : 3) << l;
    EXPECT_EQ(check::expected_ring_steps(make_case(false), l, 8), 7) << l;
  }
  EXPECT_GT(sliding, 0);
}

// needed_ring_steps against every (query, key) pair of the mask rule, over random geometries; upstream's count
// (expected_ring_steps) never falls short of it and wastes only the one hop of W - 1 = k x S_loc. Where S_loc
// divides W the two agree, so a runtime that takes one hop more there (ceil written as (W + S_loc) / S_loc) is seen.
TEST(RingHopLimit, TheHopCountIsTheFarthestRingDistanceWithAnAllowedPair) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t W = 1 + int64_t(rng() % 40), S = 4 + int64_t(rng() % 90);
    const int n = 2 + int(rng() % 7);
    if (n > S) continue;
    auto j = nlohmann::json::parse(R"({"id": "hops", "model": {"preset": "tiny-e2b"}, "ring": {"hop_limit": true}})");
    j["model"]["overrides"] = {{"sliding_window", W}};
    j["data"] = {{"seq_len", S}};
    j["cp"] = {n};
    const auto c = train::case_from_json(j, "hops.json");
    const int64_t L = cp::ShardPlan(S, n).local_len();
    // The farthest ring distance d with some q of rank r, k of rank r - d (mod n), k <= q and q - k < window.
    auto brute = [&](int64_t window) {
      int farthest = 0;
      for (int64_t q = 0; q < S; ++q)
        for (int64_t k = std::max<int64_t>(0, q - window + 1); k <= q; ++k)
          farthest = std::max(farthest, int(((q / L - k / L) % n + n) % n));
      return farthest;
    };
    const int sliding = brute(W), full = brute(S);
    SCOPED_TRACE(::testing::Message() << "W " << W << " S " << S << " cp " << n << " S_loc " << L);
    for (int64_t l = 0; l < c.model.num_hidden_layers; ++l) {
      if (!c.model.layer_window(l)) {
        EXPECT_EQ(check::needed_ring_steps(c, l, n), full);
        EXPECT_EQ(check::expected_ring_steps(c, l, n), n - 1);
        continue;
      }
      const int needed = check::needed_ring_steps(c, l, n), upstream = check::expected_ring_steps(c, l, n);
      ASSERT_EQ(needed, sliding);
      EXPECT_GE(upstream, needed);
      if (S > (n - 1) * L) {  // every rank holds a real token (else upstream also fetches chunks of padding only)
        EXPECT_EQ(upstream - needed, (W - 1) % L == 0 && (W - 1) / L + 1 <= n - 1 ? 1 : 0);
        if (W % L == 0) EXPECT_EQ(upstream, needed);
      }
    }
  }
}

TEST(RingHopLimit, TheRunIsBitwiseTheOneWithoutTheLimitWithFewerExchanges) {
  for (int cp : {4, 8}) {
    SCOPED_TRACE(cp);
    RunOptions with, without;
    with.ring.hop_limit = true;
    with.ring.q_block = with.ring.kv_block = without.ring.q_block = without.ring.kv_block = 4;
    const auto a = run_cp(make_case(true), train::DtypeLane::kFp32, cp, with);
    const auto b = run_cp(make_case(false), train::DtypeLane::kFp32, cp, without);
    ASSERT_EQ(a.steps.size(), b.steps.size());
    for (size_t s = 0; s < a.steps.size(); ++s) {
      EXPECT_EQ(a.steps[s].loss, b.steps[s].loss) << s;
      EXPECT_EQ(a.steps[s].grad_norm, b.steps[s].grad_norm) << s;
    }
    for (auto& [name, g] : b.grads) EXPECT_TRUE(torch::equal(a.grads.at(name), g)) << name;
    for (auto& [name, p] : b.final_params) EXPECT_TRUE(torch::equal(a.final_params.at(name), p)) << name;
    for (int r = 0; r < cp; ++r) {
      EXPECT_LT(a.comm_step0.at(size_t(r)).ops(cp::CommOp::RingExchange), b.comm_step0.at(size_t(r)).ops(cp::CommOp::RingExchange));
      EXPECT_LT(a.comm_step0.at(size_t(r)).bytes(cp::CommOp::Exchange), b.comm_step0.at(size_t(r)).bytes(cp::CommOp::Exchange));
    }
  }
}

TEST(RingHopLimit, EveryCheckPassesWithTheLimit) {
  const auto rep = run_case(make_case(true), SuiteOptions{});
  ASSERT_FALSE(rep.error) << *rep.error;
  testing::expect_no_failed_check(rep);
  // Two per rank: the exchanges per pass, and the chunks computed without work.
  EXPECT_EQ(testing::results_of(rep, "ring.hop_limit").size(), 2 * (4u + 8u));
}

// The ring checks judge every rank, the last one too: a cp 4 run passes ring.rotation_order on all four ranks, and
// one pass of the last rank whose chunks came in the wrong order fails it there and only there. Guards against a
// loop over the ranks that stops one short (the last rank's trace never read).
TEST(RingChecks, EveryRankIsJudgedTheLastOneToo) {
  const auto c = make_case(false);
  RunOptions o;
  o.ring.q_block = o.ring.kv_block = 4;
  auto run = run_cp(c, train::DtypeLane::kFp32, 4, o);
  auto rotation_order = [&](const LaneRun& r) {
    std::vector<report::Status> out;
    for (auto& k : check::check_ring(c, r))
      if (k.name == "ring.rotation_order") out.push_back(k.status);
    return out;
  };
  const auto pass = report::Status::Pass, fail = report::Status::Fail;
  EXPECT_EQ(rotation_order(run), (std::vector<report::Status>{pass, pass, pass, pass}));
  auto& last = run.traces.at(3);
  ASSERT_FALSE(last.empty());
  ASSERT_GT(last[0].owners.size(), 1u);
  std::reverse(last[0].owners.begin(), last[0].owners.end());
  EXPECT_EQ(rotation_order(run), (std::vector<report::Status>{pass, pass, pass, fail}));
}

// One cp 4 run of the hop-limited case, shared by the tests below that plant one wrong record each.
const LaneRun& hop_limited_cp4() {
  static const LaneRun run = [] {
    RunOptions o;
    o.ring.q_block = o.ring.kv_block = 4;
    o.ring.hop_limit = true;  // (as the runner sets it from the case)
    return run_cp(make_case(true), train::DtypeLane::kFp32, 4, o);
  }();
  return run;
}

std::vector<report::Status> statuses(const std::vector<report::CheckResult>& results, const std::string& name) {
  std::vector<report::Status> out;
  for (auto& k : results)
    if (k.name == name) out.push_back(k.status);
  return out;
}

const std::vector<report::Status> kAllPass(4, report::Status::Pass);
const std::vector<report::Status> kRank2Fails = {report::Status::Pass, report::Status::Pass, report::Status::Fail,
                                                 report::Status::Pass};

// A hop-limited pass holds fewer chunks than ranks, so a wrong owner at its last ring step is no duplicate: the
// owner of every step is compared, the last one too.
TEST(RingChecks, TheOwnerOfTheLastRingStepIsJudged) {
  const auto c = make_case(true);
  auto run = hop_limited_cp4();
  EXPECT_EQ(statuses(check::check_ring(c, run), "ring.rotation_order"), kAllPass);
  auto& trace = run.traces.at(2);
  auto pass = std::find_if(trace.begin(), trace.end(), [](auto& e) { return e.owners.size() == 2; });
  ASSERT_NE(pass, trace.end()) << "no hop-limited pass";
  pass->owners.back() = 3;  // rank 2's second chunk is rank 1's; rank 3's is another rank's, held once
  EXPECT_EQ(statuses(check::check_ring(c, run), "ring.rotation_order"), kRank2Fails);
}

// Collect mode holds the layer's h + 1 chunks at most: one more (a chunk kept twice) fails ring.chunks_held.
TEST(RingChecks, ACollectPassHoldingOneChunkMoreThanItsStepsFails) {
  const auto c = make_case(true);
  auto run = hop_limited_cp4();
  EXPECT_EQ(statuses(check::check_ring(c, run), "ring.chunks_held"), kAllPass);
  auto& e = run.traces.at(2).at(0);
  e.peak_chunks = int64_t(e.owners.size()) + 1;
  EXPECT_EQ(statuses(check::check_ring(c, run), "ring.chunks_held"), kRank2Fails);
}

// The run with the cache off must build at every lookup: a cache that ignores being switched off fails
// cache.build_count, as a cached run that builds too often does.
TEST(RingChecks, AnUncachedRunThatStillCachesFailsTheBuildCount) {
  const auto c = make_case(true);
  const auto& run = hop_limited_cp4();
  const auto on = check::expected_cache_counts(c, 4, true), off = check::expected_cache_counts(c, 4, false);
  ASSERT_LT(on.builds, off.builds);
  auto uncached = run;
  uncached.cache.resize(1);
  for (auto& k : uncached.cache[0]) k.lookups = off.lookups, k.builds = off.builds, k.hits = 0;
  EXPECT_EQ(statuses(check::check_cache(c, run, &uncached), "cache.build_count"), kAllPass);
  uncached.cache[0][2].builds = on.builds;
  uncached.cache[0][2].hits = on.lookups - on.builds;
  EXPECT_EQ(statuses(check::check_cache(c, run, &uncached), "cache.build_count"), kRank2Fails);
}

// A chunk of a later rank holds no allowed pair (contiguous sharding, causal layers): one that is computed anyway
// (the causal skip lost; no number moves) fails ring.hop_limit on that rank. The check reads what the chunk compute
// ran (the trace's segments), not the ring's decision (`computed`): flipping the decision alone changes nothing.
TEST(RingChecks, AChunkComputedWithoutWorkFails) {
  const auto c = make_case(true);
  auto run = hop_limited_cp4();
  EXPECT_EQ(statuses(check::check_ring(c, run), "ring.hop_limit"), std::vector<report::Status>(8, report::Status::Pass));
  auto& trace = run.traces.at(2);
  auto pass = std::find_if(trace.begin(), trace.end(), [](auto& e) {
    return std::find(e.owners.begin(), e.owners.end(), 3) != e.owners.end();  // rank 3's chunk: after all of rank 2's
  });
  ASSERT_NE(pass, trace.end()) << "no pass of rank 2 holds rank 3's chunk";
  const size_t later = size_t(std::find(pass->owners.begin(), pass->owners.end(), 3) - pass->owners.begin());
  ASSERT_FALSE(pass->computed.at(later)) << "the correct ring computed a chunk with no allowed pair";
  pass->computed.at(later) = true;
  EXPECT_EQ(statuses(check::check_ring(c, run), "ring.hop_limit"), std::vector<report::Status>(8, report::Status::Pass));
  // What the chunk compute records when it runs it: rank 2's queries against the keys right after them (rank 3's).
  ASSERT_FALSE(pass->segments.empty());
  const auto own = pass->segments.front();
  ASSERT_EQ(own[0], own[2]) << "the first attention of a pass is the rank's own chunk";
  pass->segments.push_back({own[0], own[1], own[0] + own[1], own[1]});
  int failed_on_rank2 = 0, failed_elsewhere = 0;
  for (auto& k : check::check_ring(c, run))
    if (k.name == "ring.hop_limit" && k.status == report::Status::Fail) (k.rank == 2 ? failed_on_rank2 : failed_elsewhere)++;
  EXPECT_EQ(failed_on_rank2, 1);
  EXPECT_EQ(failed_elsewhere, 0);
}

// One block-mask cache reset per batch, and every micro-batch is a batch: a step of two micro-batches with a single
// reset (the second reuses the first's masks) fails cache.generation_reset on that rank.
TEST(RingChecks, AStepOfTwoMicroBatchesWithOneCacheResetFails) {
  auto c = make_case(true);
  c.micro_batches = 2;
  auto run = hop_limited_cp4();
  const auto on = check::expected_cache_counts(c, 4, true);
  for (auto& step : run.cache)
    for (auto& k : step) k.lookups = on.lookups, k.builds = on.builds, k.hits = on.lookups - on.builds, k.resets = 2;
  EXPECT_EQ(statuses(check::check_cache(c, run, nullptr), "cache.generation_reset"), kAllPass);
  run.cache.at(0).at(2).resets = 1;
  EXPECT_EQ(statuses(check::check_cache(c, run, nullptr), "cache.generation_reset"), kRank2Fails);
}

// A rank that holds one token fewer than its share fails shard.layout even though every token it holds is right
// (the dropped token is held by no rank).
TEST(RingChecks, ARankMissingATokenOfItsShardFailsTheLayout) {
  const auto c = make_case(true);
  auto run = hop_limited_cp4();
  EXPECT_EQ(statuses(check::check_shard_layout(c, run), "shard.layout"), kAllPass);
  run.token_index.at(2).pop_back();
  EXPECT_EQ(statuses(check::check_shard_layout(c, run), "shard.layout"), kRank2Fails);
}

// shard.layout writes the zigzag layout from its definition (sub-chunks r and 2 cp - 1 - r of S_loc / 2), not from
// cp::ShardPlan: a layout every other part of a run follows alike (the plan, the ring's masks, unshard) passes every
// number, so a strided one (sub-chunks r and cp + r) must fail here, on every rank.
TEST(RingChecks, AZigzagLaidOutStridedFailsTheLayoutOnEveryRank) {
  auto c = make_case(true);
  c.sharding = "zigzag";
  auto run = hop_limited_cp4();
  const int n = 4;
  const int64_t half = cp::ShardPlan(c.data.seq_len, n).local_len() / 2;
  auto lay_out = [&](bool strided) {
    for (int r = 0; r < n; ++r) {
      auto& index = run.token_index.at(size_t(r));
      index.clear();
      for (int64_t i = 0; i < half; ++i) index.push_back(r * half + i);
      for (int64_t i = 0; i < half; ++i) index.push_back((strided ? n + r : 2 * n - 1 - r) * half + i);
    }
  };
  lay_out(false);
  EXPECT_EQ(statuses(check::check_shard_layout(c, run), "shard.layout"), kAllPass);
  lay_out(true);
  EXPECT_EQ(statuses(check::check_shard_layout(c, run), "shard.layout"), std::vector<report::Status>(4, report::Status::Fail));
}

}  // namespace
}  // namespace cpharness::runner
