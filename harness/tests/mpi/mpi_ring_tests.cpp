// Ring attention and whole-model CP parity over the mpi backend: one process per rank under mpirun (CTest runs
// it at np 2 and 4). Every rank runs the same GoogleTest cases on its own shard and checks its own rank against
// the full-attention / cp 1 reference it computes itself; the ranks agree on the exit code.
#include <gtest/gtest.h>

#include "harness/cp/cp_step.h"
#include "harness/cp/launcher.h"
#include "harness/model/init.h"
#include "harness/tests/model_fixtures.h"
#include "harness/tests/ring_parity.h"

namespace cpharness::cp {
namespace {

Comm* g_comm = nullptr;

TEST(MpiRingAttention, MatchesFullAttentionPerRankAndPerChunk) {
  uint64_t seed = 300;
  for (auto sc : testing::scenarios())
    for (auto sharding : {Sharding::kContiguous, Sharding::kZigzag})
      for (auto mode : {RingMode::kCollect, RingMode::kStream}) {
        sc.sharding = sharding;
        sc.mode = mode;
        SCOPED_TRACE(sc.name + " " + to_string(sharding) + " " + to_string(mode));
        auto data = testing::make_data(sc, g_comm->size(), seed++);
        auto ref = testing::reference(data);
        auto out = testing::rank_output(*g_comm, sc, data);
        testing::check_rank(data, ref, g_comm->rank(), g_comm->size(), out, mode);
      }
}

TEST(MpiRingAttention, TinyE4bForwardBackwardMatchesCp1Fp64) {
  auto c = model::preset_config("tiny-e4b");
  auto b = cpharness::testing::structured_batch(c, 45);
  auto ref_model = cpharness::testing::make_model(c, torch::kFloat64);
  model::EagerAttention eager;
  model::KvShareHolder holder;
  model::ForwardOptions o;
  o.holder = &holder;
  auto loss = model::token_loss(ref_model->forward(cpharness::testing::inputs_of(b), eager, o), model::shift_labels(b.labels));
  auto mean = loss.sum / double(loss.count);
  mean.backward();

  for (auto sharding : {Sharding::kContiguous, Sharding::kZigzag}) {
    SCOPED_TRACE(to_string(sharding));
    auto m = cpharness::testing::make_model(c, torch::kFloat64);
    RingOptions ring_options;
    ring_options.mode = sharding == Sharding::kZigzag ? RingMode::kStream : RingMode::kCollect;  // both modes over MPI
    RingAttention ring(*g_comm, ring_options);
    CpStepOptions step;
    step.sharding = sharding;
    auto r = cp_forward_backward(*g_comm, m, ring, b, 1, step);
    EXPECT_LE(std::abs(r.loss - mean.item<double>()), 1e-12 * std::abs(mean.item<double>()));
    auto ref_params = ref_model->named_parameters();
    for (auto& p : m->named_parameters()) {
      auto g = p.value().grad(), ref = ref_params[p.key()].grad();
      const double denom = ref.norm().item<double>();
      EXPECT_LE(denom == 0 ? g.norm().item<double>() : (g - ref).norm().item<double>() / denom, 1e-10) << p.key();
    }
  }
}

}  // namespace
}  // namespace cpharness::cp

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto comm = cpharness::cp::make_mpi_comm(std::chrono::seconds(120));
  cpharness::cp::g_comm = comm.get();
  // Only rank 0 prints the gtest progress; failures are printed by every rank.
  if (comm->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int local = RUN_ALL_TESTS();
  auto bad = at::full({1}, int64_t(local != 0), at::kLong);
  comm->all_reduce(bad);
  if (local != 0) std::cerr << "rank " << comm->rank() << ": failures above\n";
  comm->barrier();
  return bad.item<int64_t>() == 0 ? 0 : 1;
}
