// Ring attention against full attention, compared in the sharded frame: per rank and per chunk (out, LSE,
// dK, dV) and per rank (out, dQ, dK, dV), for every mask kind that crosses rank edges; plus the ring trace
// (rotation order, gradient return) and the communication op counts. Ranks are threads (local backend).
#include "ring_parity.h"

namespace cpharness::cp {
namespace {

using namespace cpharness::cp::testing;

void run_scenario(const Scenario& sc, int cp, uint64_t seed) {
  SCOPED_TRACE(fmt::format("{} cp={} seed={}", sc.name, cp, seed));
  auto data = make_data(sc, cp, seed);
  auto ref = reference(data);
  std::vector<RankOutput> outputs(cp);
  run_local(cp, [&](Comm& comm) { outputs[comm.rank()] = rank_output(comm, sc, data); });
  for (int r = 0; r < cp; ++r) check_rank(data, ref, r, cp, outputs[r]);
}

class CpRingAttention : public ::testing::TestWithParam<int> {};

TEST_P(CpRingAttention, MatchesFullAttentionPerRankAndPerChunk) {
  uint64_t seed = 100;
  for (auto& sc : scenarios()) run_scenario(sc, GetParam(), seed++);
}

INSTANTIATE_TEST_SUITE_P(Cp, CpRingAttention, ::testing::Values(2, 3, 4));

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
