// Batch sharding for CP (cp-reference §1.1, §4), in one of two layouts:
//
//   S_pad = S rounded up to a multiple of lcm(2*cp, pad_multiple) (2*cp as upstream; pad_multiple defaults to 1
//           and lets a caller also align to a block size, which the ring does not require)
//   S_loc = S_pad / cp
//   contiguous (upstream): rank r owns global tokens [r*S_loc, (r+1)*S_loc)
//   zigzag (load-balanced: Llama 3, ring-flash-attention, TransformerEngine): the sequence is cut into 2*cp
//           sub-chunks of S_loc/2; rank r owns sub-chunks r and 2*cp-1-r, in that order, so every rank holds one
//           early and one late piece of the causal triangle and does the same work.
//
// A rank's tokens are its segments (one or two global ranges) laid end to end; the ring builds one block mask
// per (query segment, key segment) pair, so every mask key names the sub-chunk's own start.
//
// Order of preparation: labels are shifted on the FULL sequence (target[t] = labels[t+1], last = -100), then
// every per-token tensor is padded, then sharded on its sequence dim. So the last token of a shard keeps its true
// target (the first token of the next shard). Pad values:
//   input_ids -> pad id (0); labels -> -100; padding mask -> true; document ids -> 0; vision group ids -> -1;
//   token type ids, per-layer inputs, inputs_embeds, loss mask -> 0; position ids -> last+1, last+2, ...
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "harness/model/gemma4.h"
#include "kernels/mask_spec.h"

namespace cpharness::cp {

using model::kIgnoreIndex;
using model::shift_labels;

// Ring step s on rank r of n holds the K/V chunk of rank (r - s) mod n (own chunk at s = 0): the one formula
// for the ring's schedule, its trace check and its gradient return (the chunk held at step d goes home to it).
inline int ring_owner(int rank, int step, int n) { return ((rank - step) % n + n) % n; }

enum class Sharding { kContiguous, kZigzag };

// "contiguous" / "zigzag", and back (std::nullopt for any other name).
const char* to_string(Sharding sharding);
std::optional<Sharding> sharding_from_string(const std::string& name);

// The global ranges rank `rank` of `cp` holds, in local order, each local_len / segments long: the one formula for
// the layout, used by the plan and the ring (local_len must be even under zigzag).
std::vector<kernels::TokenRange> shard_segments(Sharding sharding, int rank, int cp, int64_t local_len);

class ShardPlan {
 public:
  ShardPlan() = default;
  // seq_len >= 1, cp >= 1, pad_multiple >= 1.
  ShardPlan(int64_t seq_len, int cp, Sharding sharding = Sharding::kContiguous, int64_t pad_multiple = 1);

  int64_t seq_len() const { return seq_len_; }        // S (original)
  int64_t padded_len() const { return padded_len_; }  // S_pad
  int64_t pad_len() const { return padded_len_ - seq_len_; }
  int64_t local_len() const { return local_len_; }    // S_loc
  int cp() const { return cp_; }
  Sharding sharding() const { return sharding_; }

  // Rank's global ranges, in local order (contiguous: one, zigzag: two).
  std::vector<kernels::TokenRange> segments(int rank) const;
  int owner(int64_t global) const;
  int64_t global_index(int rank, int64_t local) const;
  bool is_pad(int64_t global) const { return global >= seq_len_; }
  int64_t valid_tokens(int rank) const;  // non-pad tokens in rank's shard (0 for an all-padding shard)
  // The global-index map: int64 [S_loc], global index of each local position of rank.
  at::Tensor global_indices(int rank) const;

  // Pads `t` along `dim` from S to S_pad with a constant.
  at::Tensor pad(const at::Tensor& t, const at::Scalar& value, int64_t dim = 1) const;
  // Pads position ids along `dim` continuing last+1, last+2, ... (per row).
  at::Tensor pad_positions(const at::Tensor& pos, int64_t dim = 1) const;
  // Rank's shard of a padded tensor along `dim` ([B,S], [B,S,D], [B,S,L,P], [3,B,S] with dim 2, ...): its
  // segments laid end to end, contiguous.
  at::Tensor shard(const at::Tensor& padded, int rank, int64_t dim = 1) const;
  std::vector<at::Tensor> shard_all(const at::Tensor& padded, int64_t dim = 1) const;
  // Puts per-rank outputs (rank order, each S_loc long on `dim`) back in global order through the index map;
  // crop = true also drops the padding (returns S long), else S_pad long. Exact (a copy, no arithmetic).
  at::Tensor unshard(const std::vector<at::Tensor>& per_rank, int64_t dim = 1, bool crop = true) const;
  at::Tensor crop(const at::Tensor& padded, int64_t dim = 1) const;  // first S along dim

 private:
  void check_dim(const at::Tensor& t, int64_t dim, int64_t expect, const char* what) const;
  int64_t seq_len_ = 0, padded_len_ = 0, local_len_ = 0;
  int cp_ = 1;
  Sharding sharding_ = Sharding::kContiguous;
};

// The per-token tensors of one batch. All are [B, S] except per_layer_inputs [B, S, L, P] and inputs_embeds
// [B, S, D]; undefined tensors are skipped.
struct TokenBatch {
  at::Tensor input_ids;         // int64
  at::Tensor labels;            // int64; in the input: unshifted (HF). After prepare: already shifted targets
  at::Tensor padding_mask;      // bool, true = pad
  at::Tensor document_ids;      // int64 (packed sequence ids)
  at::Tensor vision_group_ids;  // int64, -1 = not vision
  at::Tensor token_type_ids;    // int64 (mm_token_type_ids)
  at::Tensor position_ids;      // int64
  at::Tensor loss_mask;         // any dtype, 0 = not counted
  at::Tensor per_layer_inputs;  // float, [B, S, L, P]
  at::Tensor inputs_embeds;     // float, [B, S, D]
  bool labels_shifted = false;
};

// shift labels (full sequence) + fill defaults + pad to plan.padded_len(). Defaults synthesized when missing, as
// upstream does: padding_mask = all false; position_ids = arange(S); document_ids = (~padding_mask).long().
TokenBatch prepare_cp_batch(const TokenBatch& batch, const ShardPlan& plan, int64_t pad_id = 0);
// Rank's shard of a prepared (padded) batch: every defined tensor cut on dim 1 by the plan's layout, contiguous.
TokenBatch shard_batch(const TokenBatch& prepared, const ShardPlan& plan, int rank);

}  // namespace cpharness::cp
