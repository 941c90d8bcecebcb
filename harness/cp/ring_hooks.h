// The points where a known-bad ring (the selftest's mutants) differs from the correct one. The ring algorithm
// calls these and nothing else for its variants, so ring_attention.cpp reads as the correct algorithm only.
#pragma once
#include <torch/torch.h>

#include <memory>

#include "kernels/lse_merge.h"
#include "kernels/mask_spec.h"

namespace cpharness::cp {

// Known-bad variants, for the selftest mutants only.
enum class RingMutation {
  kNone,
  kReverseRotation,       // owners labelled as if chunks came from rank + s instead of rank - s
  kDropGradReturn,        // foreign dK/dV are never sent back to their owners
  kStaleGeneration,       // the cache generation never advances (a stale mask survives a new batch)
  kWindowOffByOneAtEdge,  // foreign chunks use q - k <= W instead of q - k < W (a window bug at shard edges)
  kPaddedRowsNotZeroed,   // rows with no allowed key take V of local index 0 (upstream's trick, never zeroed)
  kHopLimitOneTooMany,    // the hop limit fetches one chunk more than the window reaches (correct numbers, wasted traffic)
  kInputDtypeGradAccumulation,  // returned dK/dV summed in the input dtype (bf16 in the bf16 lane), not fp32: one
                                // rounding per ring step, an error that grows with cp
  kStreamDropsChunkInFlight,    // streaming ring: the chunk that arrives at the last step is never merged
  kStreamCollectsEveryChunk,    // "stream" mode that still collects every chunk before computing (correct numbers)
  kGradReturnToWrongRank,       // foreign dK/dV sent to rank - d instead of their owner rank + d (received from the
                                // mirror rank): nothing lost, everything misplaced (the same rank at cp 2)
  kMasksFromRowZero,            // block masks built for one row and broadcast (flex's B=None): row 0's documents,
                                // padding and vision groups mask every row
  kComputesEmptyChunks,         // chunks with no allowed pair (a later rank's, every key after every query) are
                                // computed anyway: the causal skip lost (correct numbers: out 0 with LSE -inf)
  kComputesEmptySegmentPairs,   // zigzag: within a chunk that has work, its (query, key) sub-chunk pairs with none
                                // are computed anyway (correct numbers, wasted work)
};

class RingHooks {
 public:
  virtual ~RingHooks() = default;
  // The owner of the chunk a rank holds at ring step `step` (correct: ring_owner).
  virtual int owner_at_step(int rank, int step, int n) const;
  // The geometry `rank`'s queries use against `owner`'s chunk (correct: the layer's own).
  virtual kernels::LayerGeometry chunk_geometry(int rank, int owner, const kernels::LayerGeometry& geometry) const;
  // Ring steps a layer takes, given the correct number (correct: unchanged).
  virtual int ring_steps(int correct, int n) const { return correct; }
  // The rows a block mask is built for, given the batch's (correct: unchanged; one is broadcast over the batch).
  virtual int64_t mask_rows(int64_t rows) const { return rows; }
  // Whether a chunk with no allowed pair is skipped (correct: always).
  virtual bool skips_empty_chunks() const { return true; }
  // Whether a sub-chunk pair with no allowed pair is skipped inside a chunk that has work (correct: always).
  virtual bool skips_empty_segment_pairs() const { return true; }
  // Whether a ring in stream mode streams (correct: always; else it runs the collect algorithm).
  virtual bool streams() const { return true; }
  // Whether the streaming forward merges the chunk that arrived for ring step `step` of `steps` (correct: always).
  virtual bool merges_arrived_chunk(int step, int steps) const { return true; }
  // Whether foreign dK/dV are sent home (correct: always).
  virtual bool returns_grads() const { return true; }
  // Where `rank` sends the dK/dV of the chunk it held `distance` ring steps after its own, and whom it receives its
  // own chunk's share from (correct: that chunk's owner, rank + distance; and rank - distance).
  virtual int return_destination(int rank, int distance, int n) const;
  virtual int return_source(int rank, int distance, int n) const;
  // Whether a new batch after the first advances the block-mask cache generation (correct: always).
  virtual bool advances_generation() const { return true; }
  // The merged output before it leaves the ring; `v` is the rank's own V. Correct: unchanged (rows without an
  // allowed key are exactly 0).
  virtual void finish_output(kernels::AttentionPartial& merged, const torch::Tensor& v) const {}
  // Adds a returned dK or dV share to this rank's own (correct: in the accumulation dtype, fp32 or fp64, whatever
  // the input dtype).
  virtual void add_returned(torch::Tensor& home, const torch::Tensor& received, torch::ScalarType input_dtype) const {
    home += received;
  }
};

// The hooks of `mutation` (kNone: the correct ring).
std::unique_ptr<RingHooks> make_ring_hooks(RingMutation mutation);

}  // namespace cpharness::cp
