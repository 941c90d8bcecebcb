#include "harness/train/batch.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <set>

#include "harness/io/input_error.h"
#include "harness/model/generator_seed.h"

namespace cpharness::train {

RowLayout row_layout(const BatchSpec& spec, int64_t b) {
  if (spec.rows.empty()) return spec.layout;
  return spec.rows.at(size_t(b));
}

namespace {

// Writes row b's documents, padding and vision groups into the batch; `field` names the layout in errors.
void lay_out_row(const RowLayout& layout, int64_t b, int64_t S, const std::string& field, Batch& batch,
                 torch::Tensor& groups) {
  const int64_t valid = S - layout.padding;
  if (layout.padding < 0 || layout.padding > S)
    throw io::InputError("batch", field + "padding", fmt::format("{} outside [0, {}]", layout.padding, S));
  if (valid == 0)  // (it was reported as a document length the user never wrote)
    throw io::InputError("batch", field + "padding", fmt::format("{} = seq_len leaves the row no real token", S));
  std::vector<int64_t> docs = layout.document_lengths;
  if (docs.empty()) docs.push_back(valid);
  int64_t total = 0;
  for (auto d : docs) {
    if (d <= 0) throw io::InputError("batch", field + "document_lengths", "lengths must be positive");
    total += d;
  }
  if (total != valid)
    throw io::InputError("batch", field + "document_lengths", fmt::format("sum to {}, but seq_len - padding = {}", total, valid));
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto ids = batch.input_ids[b], doc_ids = batch.meta.document_ids[b], positions = batch.position_ids[b];
  auto labels = batch.labels[b], padding = batch.meta.padding[b];
  int64_t start = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    doc_ids.narrow(0, start, docs[d]).fill_(int64_t(d + 1));
    positions.narrow(0, start, docs[d]).copy_(torch::arange(docs[d], i64));
    labels.narrow(0, start, 1).fill_(-100);  // no target across a document edge
    start += docs[d];
  }
  if (layout.padding > 0) {
    ids.narrow(0, valid, layout.padding).fill_(0);
    labels.narrow(0, valid, layout.padding).fill_(-100);
    padding.narrow(0, valid, layout.padding).fill_(true);
    const int64_t last = docs.back();
    positions.narrow(0, valid, layout.padding).copy_(torch::arange(last, last + layout.padding, i64));
  }
  int64_t gid = 0;
  for (auto& run : layout.vision_runs) {
    if (run.start < 0 || run.length <= 0 || run.start + run.length > valid)
      throw io::InputError("batch", field + "vision_runs", fmt::format("run [{}, {}) outside the valid tokens [0, {})",
                                                                        run.start, run.start + run.length, valid));
    groups[b].narrow(0, run.start, run.length).fill_(gid++);
  }
}

}  // namespace

Batch make_batch(const BatchSpec& spec) {
  const int64_t B = spec.batch, S = spec.seq_len;
  if (B <= 0 || S <= 0) throw io::InputError("batch", "seq_len", "batch and seq_len must be positive");
  if (spec.vocab_size < 2) throw io::InputError("batch", "vocab_size", "needs at least 2 tokens");
  if (!spec.rows.empty() && int64_t(spec.rows.size()) != B)
    throw io::InputError("batch", "rows", fmt::format("{} row layouts for a batch of {} rows", spec.rows.size(), B));

  auto gen = at::make_generator<at::CPUGeneratorImpl>(model::generator_seed(spec.seed));
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  // Token ids avoid the pad id 0 on real tokens.
  auto ids = torch::randint(1, spec.vocab_size, {B, S}, gen, i64);
  Batch batch{ids, ids.clone(), torch::zeros({B, S}, i64), {}};
  batch.meta.document_ids = torch::zeros({B, S}, i64);
  batch.meta.padding = torch::zeros({B, S}, torch::TensorOptions().dtype(torch::kBool));
  auto groups = torch::full({B, S}, -1, i64);
  bool any_vision = false;
  for (int64_t b = 0; b < B; ++b) {
    const auto layout = row_layout(spec, b);
    any_vision |= !layout.vision_runs.empty();
    lay_out_row(layout, b, S, spec.rows.empty() ? "" : fmt::format("rows[{}].", b), batch, groups);
  }
  if (any_vision) batch.meta.vision_group_ids = groups;
  return batch;
}

torch::Tensor document_ids_from_positions(const torch::Tensor& position_ids) {
  const auto pos = position_ids.to(torch::kInt64);
  const auto previous = torch::cat({pos.narrow(1, 0, 1) - 1, pos.narrow(1, 0, pos.size(1) - 1)}, 1);
  return (pos - previous != 1).to(torch::kInt64).cumsum(1) + 1;
}

std::optional<std::string> vision_groups_problem(const torch::Tensor& vision_group_ids) {
  const auto ids = vision_group_ids.to(torch::kCPU, torch::kInt64).contiguous();
  if (ids.dim() != 2) return fmt::format("expected [batch, seq_len], got {} dimensions", ids.dim());
  const auto a = ids.accessor<int64_t, 2>();
  for (int64_t b = 0; b < ids.size(0); ++b) {
    std::set<int64_t> closed;  // groups whose run has ended in this row
    for (int64_t t = 0; t < ids.size(1); ++t) {
      const int64_t here = a[b][t], before = t > 0 ? a[b][t - 1] : -1;
      if (here < -1) return fmt::format("row {} token {}: {} is neither a group (>= 0) nor text (-1)", b, t, here);
      if (before >= 0 && here >= 0 && here != before)
        return fmt::format("row {} token {}: groups {} and {} touch, and transformers, which derives groups from "
                           "contiguous vision tokens, would see one group", b, t, before, here);
      if (before >= 0 && here != before) closed.insert(before);
      if (here >= 0 && here != before && closed.count(here))
        return fmt::format("row {} token {}: group {} resumes after text, and transformers, which derives groups "
                           "from contiguous vision tokens, would see two groups", b, t, here);
    }
  }
  return std::nullopt;
}

}  // namespace cpharness::train
