// Batch sharding for CP (cp-reference §1.1, §4): contiguous shards, no load balancing, no zigzag.
//
//   S_pad = S rounded up to a multiple of lcm(2*cp, pad_multiple) (2*cp as upstream; pad_multiple defaults to 1
//           and lets a caller also align to a block size, which the ring does not require)
//   S_loc = S_pad / cp;  rank r owns global tokens [r*S_loc, (r+1)*S_loc)
//
// Order of preparation: labels are shifted on the FULL sequence (target[t] = labels[t+1], last = -100), then
// every per-token tensor is padded, then sharded on its sequence dim. So the last token of a shard keeps its true
// target (the first token of the next shard). Pad values:
//   input_ids -> pad id (0); labels -> -100; padding mask -> true; document ids -> 0; vision group ids -> -1;
//   token type ids, per-layer inputs, inputs_embeds, loss mask -> 0; position ids -> last+1, last+2, ...
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "harness/model/gemma4.h"

namespace cpharness::cp {

using model::kIgnoreIndex;
using model::shift_labels;

// Ring step s on rank r of n holds the K/V chunk of rank (r - s) mod n (own chunk at s = 0): the one formula
// for the ring's schedule, its trace check and its gradient return (the chunk held at step d goes home to it).
inline int ring_owner(int rank, int step, int n) { return ((rank - step) % n + n) % n; }

class ShardPlan {
 public:
  ShardPlan() = default;
  // seq_len >= 1, cp >= 1, pad_multiple >= 1.
  ShardPlan(int64_t seq_len, int cp, int64_t pad_multiple = 1);

  int64_t seq_len() const { return seq_len_; }        // S (original)
  int64_t padded_len() const { return padded_len_; }  // S_pad
  int64_t pad_len() const { return padded_len_ - seq_len_; }
  int64_t local_len() const { return local_len_; }    // S_loc
  int cp() const { return cp_; }

  int64_t begin(int rank) const;  // first global index of rank
  int64_t end(int rank) const;    // one past the last
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
  // Rank's contiguous slice of a padded tensor along `dim` ([B,S], [B,S,D], [B,S,L,P], [3,B,S] with dim 2, ...).
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
// Rank's shard of a prepared (padded) batch: every defined tensor sliced on dim 1, contiguous.
TokenBatch shard_batch(const TokenBatch& prepared, const ShardPlan& plan, int rank);

}  // namespace cpharness::cp
