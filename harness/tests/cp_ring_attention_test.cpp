// Ring attention against full attention, compared in the sharded frame: per rank and per chunk (out, LSE,
// dK, dV) and per rank (out, dQ, dK, dV), for every mask kind that crosses rank edges; plus the ring trace
// (rotation order, gradient return) and the communication op counts. Ranks are threads (local backend).
#include "ring_parity.h"

#include <random>

namespace cpharness::cp {
namespace {

using namespace cpharness::cp::testing;

void run_scenario(const Scenario& sc, int cp, uint64_t seed) {
  SCOPED_TRACE(fmt::format("{} cp={} seed={}", sc.name, cp, seed));
  auto data = make_data(sc, cp, seed);
  auto ref = reference(data);
  std::vector<RankOutput> outputs(cp);
  run_local(cp, [&](Comm& comm) { outputs[comm.rank()] = rank_output(comm, sc, data); });
  for (int r = 0; r < cp; ++r) check_rank(data, ref, r, cp, outputs[r], sc.mode);
}

class CpRingAttention : public ::testing::TestWithParam<int> {};

TEST_P(CpRingAttention, MatchesFullAttentionPerRankAndPerChunk) {
  uint64_t seed = 100;
  for (auto& sc : scenarios()) run_scenario(sc, GetParam(), seed++);
}

INSTANTIATE_TEST_SUITE_P(Cp, CpRingAttention, ::testing::Values(2, 3, 4));

// Zigzag sharding: every scenario, with random lengths, windows and document cuts around the sub-chunk edges.
TEST(CpRingAttentionZigzag, MatchesFullAttentionPerRankAndPerChunk) {
  uint64_t seed = 300;
  for (int cp : {2, 3, 4})
    for (auto sc : scenarios()) {
      sc.sharding = Sharding::kZigzag;
      run_scenario(sc, cp, seed++);
    }
  std::mt19937 rng(17);
  for (int iter = 0; iter < 24; ++iter) {
    Scenario sc{"random zigzag"};
    sc.sharding = Sharding::kZigzag;
    sc.seq_len = 8 + int64_t(rng() % 40);
    sc.padding = int64_t(rng() % 4);
    const int64_t cut = 1 + int64_t(rng() % (sc.seq_len - sc.padding));
    if (rng() % 2 && cut < sc.seq_len - sc.padding) sc.docs = {cut, sc.seq_len - sc.padding - cut};
    if (rng() % 2) sc.window = 1 + int64_t(rng() % 12);
    sc.block = 1 + int64_t(rng() % 6);
    run_scenario(sc, 2 + int(rng() % 4), seed++);
  }
}

// The streaming ring (exchanges posted ahead, online merge, travelling dK/dV accumulators), in both layouts.
TEST(CpRingAttentionStream, MatchesFullAttentionPerRankAndPerChunk) {
  uint64_t seed = 500;
  for (int cp : {2, 3, 4})
    for (auto sharding : {Sharding::kContiguous, Sharding::kZigzag})
      for (auto sc : scenarios()) {
        sc.mode = RingMode::kStream;
        sc.sharding = sharding;
        run_scenario(sc, cp, seed++);
      }
}

// Both modes run the same merges and sums in the same order: bitwise the same out, dQ, dK, dV.
TEST(CpRingAttentionStream, BitwiseTheCollectModesResults) {
  uint64_t seed = 700;
  for (int cp : {2, 3, 4, 5})
    for (auto sc : scenarios()) {
      SCOPED_TRACE(fmt::format("{} cp={}", sc.name, cp));
      auto data = make_data(sc, cp, seed++);
      std::vector<RankOutput> collect(cp), stream(cp);
      run_local(cp, [&](Comm& comm) { collect[comm.rank()] = rank_output(comm, sc, data); });
      sc.mode = RingMode::kStream;
      run_local(cp, [&](Comm& comm) { stream[comm.rank()] = rank_output(comm, sc, data); });
      for (int r = 0; r < cp; ++r) {
        EXPECT_TRUE(torch::equal(collect[r].out, stream[r].out)) << r;
        EXPECT_TRUE(torch::equal(collect[r].dq, stream[r].dq)) << r;
        EXPECT_TRUE(torch::equal(collect[r].dk, stream[r].dk)) << r;
        EXPECT_TRUE(torch::equal(collect[r].dv, stream[r].dv)) << r;
      }
    }
}

// A rank that dies while its peers have exchanges posted: they end with CommError within the timeout, no hang.
TEST(CpRingAttentionStream, APeerThatDiesEndsThePostedExchangesWithAnError) {
  Scenario sc{"documents"};
  sc.docs = {10, 14};
  sc.mode = RingMode::kStream;
  auto data = make_data(sc, 3, 9);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(run_local(3, [&](Comm& comm) {
    if (comm.rank() == 1) throw std::runtime_error("rank 1 dies before the ring");
    rank_output(comm, sc, data);
  }, std::chrono::seconds(20)), CommError);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
}

TEST(CpRingAttentionZigzag, TheHopLimitIsRefused) {
  run_local(2, [&](Comm& comm) {
    RingOptions options;
    options.hop_limit = true;
    RingAttention ring(comm, options);
    EXPECT_THROW(ring.begin_batch(1, 8, Sharding::kZigzag), std::invalid_argument);
    EXPECT_NO_THROW(ring.begin_batch(1, 8, Sharding::kContiguous));
  });
}

TEST(CpRingAttentionMutants, ReversedRotationAndMissingGradReturnAreWrong) {
  // The same comparison must fail for the known-bad ring variants: proves the parity check can fail.
  Scenario sc{"documents"};
  sc.docs = {10, 14};
  auto data = make_data(sc, 4, 5);
  auto ref = reference(data);
  for (auto mutation : {RingMutation::kReverseRotation, RingMutation::kDropGradReturn}) {
    std::vector<double> errors(4);
    run_local(4, [&](Comm& comm) {
      const int r = comm.rank();
      RingOptions options;
      options.q_block = options.kv_block = 4;
      options.mutation = mutation;
      RingAttention ring(comm, options);
      ring.begin_batch(1, data.plan.local_len());
      auto shard = [&](const Tensor& t) { return data.plan.shard(t, r, 2).clone(); };
      auto q = shard(data.q).requires_grad_(), k = shard(data.k).requires_grad_(), v = shard(data.v).requires_grad_();
      kernels::TokenMetadata meta{data.plan.shard(data.meta.document_ids, r), data.plan.shard(data.meta.padding, r), {}};
      auto out = ring.attend({q, k, v, data.geometry, 1.0, 0}, meta);
      (out * shard(data.dout)).sum().backward();
      const int64_t L = data.plan.local_len();
      errors[r] = rel(out.detach(), ref.out.narrow(2, r * L, L)) + rel(k.grad(), ref.dk.narrow(2, r * L, L));
    });
    EXPECT_GT(*std::max_element(errors.begin(), errors.end()), 1e-3) << int(mutation);
  }
}

}  // namespace
}  // namespace cpharness::cp
