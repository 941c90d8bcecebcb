// Seeded synthetic training batches with the structure CP gets wrong: packed documents (position ids restart,
// no attention across documents, no target across a document edge), tail padding and vision groups.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/mask_spec.h"

namespace cpharness::train {

struct VisionRun {
  int64_t start = 0;   // first token of a contiguous vision run (global index)
  int64_t length = 0;
};

// Where one row's documents, padding and vision runs lie.
struct RowLayout {
  std::vector<int64_t> document_lengths;  // packed documents from position 0; empty: one document
  int64_t padding = 0;                    // padding tokens at the end of the row
  std::vector<VisionRun> vision_runs;     // each run is one vision group (ids 0, 1, ... in order)
};

struct BatchSpec {
  int64_t batch = 1;
  int64_t seq_len = 64;
  RowLayout layout;  // every row's (unless `rows` gives one per row)
  // One layout per row, replacing the one above: rows that differ are what shows a mask or loss normalisation
  // built from row 0 for every row, or micro-batches weighted by their own token counts. Empty: every row alike.
  std::vector<RowLayout> rows;
  int64_t vocab_size = 512;
  uint64_t seed = 0;
};

struct Batch {
  torch::Tensor input_ids;     // [B, S] int64; pad id 0 on padding
  torch::Tensor labels;        // [B, S] int64, unshifted; -100 on padding and on the first token of a document
  torch::Tensor position_ids;  // [B, S] int64; restart at 0 for each document, continue through padding
  kernels::TokenMetadata meta; // document ids (1-based, 0 = pad), padding, vision group ids (-1 = text)
};

// Throws io::InputError (source "batch") when the spec is inconsistent.
Batch make_batch(const BatchSpec& spec);

// Row b's layout (the shared one unless spec.rows gives one per row).
RowLayout row_layout(const BatchSpec& spec, int64_t b);

// Document ids [B, S] (1-based) of rows packed the way transformers packs them, by position ids alone: a document
// starts wherever a position is not its predecessor's + 1 (transformers' find_packed_sequence_indices: the
// cumulative sum of diff(position_ids) != 1, the first token's predecessor taken as its position - 1).
torch::Tensor document_ids_from_positions(const torch::Tensor& position_ids);

// Why vision group ids [B, S] (-1 = text) are not the groups transformers would see, or nullopt. Transformers
// does not take group ids: it derives them from which tokens are vision tokens (get_block_sequence_ids_for_mask:
// a group starts at each vision token after a text token), so two groups that touch are one group to it, and a
// group split by text is two. Such ids describe masks no transformers version computes.
std::optional<std::string> vision_groups_problem(const torch::Tensor& vision_group_ids);

}  // namespace cpharness::train
