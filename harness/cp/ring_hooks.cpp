#include "harness/cp/ring_hooks.h"

#include "harness/cp/shard_plan.h"

#include <algorithm>

namespace cpharness::cp {
namespace {

struct ReverseRotation : RingHooks {
  int owner_at_step(int rank, int step, int n) const override { return ring_owner(rank, -step, n); }
};

struct DropGradReturn : RingHooks {
  bool returns_grads() const override { return false; }
};

struct StaleGeneration : RingHooks {
  bool advances_generation() const override { return false; }
};

struct WindowOffByOneAtEdge : RingHooks {
  kernels::LayerGeometry chunk_geometry(int rank, int owner, const kernels::LayerGeometry& geometry) const override {
    auto g = geometry;
    if (owner != rank && g.window) *g.window += 1;
    return g;
  }
};

struct PaddedRowsNotZeroed : RingHooks {
  void finish_output(kernels::AttentionPartial& merged, const torch::Tensor& v) const override {
    const int64_t groups = merged.out.size(1) / v.size(1);
    auto fill = v.select(2, 0).repeat_interleave(groups, 1).unsqueeze(2).to(merged.out.scalar_type());
    merged.out = torch::where(torch::isinf(merged.lse).unsqueeze(-1), fill.expand_as(merged.out), merged.out);
  }
};

struct StreamDropsChunkInFlight : RingHooks {
  bool merges_arrived_chunk(int step, int steps) const override { return step == 0 || step < steps; }
};

struct StreamCollectsEveryChunk : RingHooks {
  bool streams() const override { return false; }
};

struct HopLimitOneTooMany : RingHooks {
  int ring_steps(int correct, int n) const override { return std::min(correct + 1, n - 1); }
};

struct InputDtypeGradAccumulation : RingHooks {
  void add_returned(torch::Tensor& home, const torch::Tensor& received, torch::ScalarType input_dtype) const override {
    home = (home + received).to(input_dtype).to(home.scalar_type());
  }
};

struct GradReturnToWrongRank : RingHooks {
  int return_destination(int rank, int distance, int n) const override { return ring_owner(rank, -distance, n); }
  int return_source(int rank, int distance, int n) const override { return ring_owner(rank, distance, n); }
};

struct MasksFromRowZero : RingHooks {
  int64_t mask_rows(int64_t) const override { return 1; }
};

struct ComputesEmptyChunks : RingHooks {
  bool skips_empty_chunks() const override { return false; }
};

struct ComputesEmptySegmentPairs : RingHooks {
  bool skips_empty_segment_pairs() const override { return false; }
};

}  // namespace

int RingHooks::return_destination(int rank, int distance, int n) const { return ring_owner(rank, distance, n); }

int RingHooks::return_source(int rank, int distance, int n) const { return ring_owner(rank, -distance, n); }

int RingHooks::owner_at_step(int rank, int step, int n) const { return ring_owner(rank, step, n); }

kernels::LayerGeometry RingHooks::chunk_geometry(int, int, const kernels::LayerGeometry& geometry) const { return geometry; }

std::unique_ptr<RingHooks> make_ring_hooks(RingMutation mutation) {
  switch (mutation) {
    case RingMutation::kNone: return std::make_unique<RingHooks>();
    case RingMutation::kReverseRotation: return std::make_unique<ReverseRotation>();
    case RingMutation::kDropGradReturn: return std::make_unique<DropGradReturn>();
    case RingMutation::kStaleGeneration: return std::make_unique<StaleGeneration>();
    case RingMutation::kWindowOffByOneAtEdge: return std::make_unique<WindowOffByOneAtEdge>();
    case RingMutation::kPaddedRowsNotZeroed: return std::make_unique<PaddedRowsNotZeroed>();
    case RingMutation::kHopLimitOneTooMany: return std::make_unique<HopLimitOneTooMany>();
    case RingMutation::kInputDtypeGradAccumulation: return std::make_unique<InputDtypeGradAccumulation>();
    case RingMutation::kStreamDropsChunkInFlight: return std::make_unique<StreamDropsChunkInFlight>();
    case RingMutation::kStreamCollectsEveryChunk: return std::make_unique<StreamCollectsEveryChunk>();
    case RingMutation::kGradReturnToWrongRank: return std::make_unique<GradReturnToWrongRank>();
    case RingMutation::kMasksFromRowZero: return std::make_unique<MasksFromRowZero>();
    case RingMutation::kComputesEmptyChunks: return std::make_unique<ComputesEmptyChunks>();
    case RingMutation::kComputesEmptySegmentPairs: return std::make_unique<ComputesEmptySegmentPairs>();
  }
  throw std::logic_error("make_ring_hooks: unknown mutation");
}

}  // namespace cpharness::cp
