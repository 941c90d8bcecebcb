#include "harness/train/batch.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <set>

#include "harness/io/input_error.h"
#include "harness/model/generator_seed.h"

namespace cpharness::train {

Batch make_batch(const BatchSpec& spec) {
  const int64_t B = spec.batch, S = spec.seq_len, valid = S - spec.padding;
  if (B <= 0 || S <= 0) throw io::InputError("batch", "seq_len", "batch and seq_len must be positive");
  if (spec.padding < 0 || spec.padding > S) throw io::InputError("batch", "padding", fmt::format("{} outside [0, {}]", spec.padding, S));
  if (spec.vocab_size < 2) throw io::InputError("batch", "vocab_size", "needs at least 2 tokens");
  std::vector<int64_t> docs = spec.document_lengths;
  if (docs.empty()) docs.push_back(valid);
  int64_t total = 0;
  for (auto d : docs) {
    if (d <= 0) throw io::InputError("batch", "document_lengths", "lengths must be positive");
    total += d;
  }
  if (total != valid)
    throw io::InputError("batch", "document_lengths", fmt::format("sum to {}, but seq_len - padding = {}", total, valid));

  auto gen = at::make_generator<at::CPUGeneratorImpl>(model::generator_seed(spec.seed));
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  // Token ids avoid the pad id 0 on real tokens.
  auto ids = torch::randint(1, spec.vocab_size, {B, S}, gen, i64);
  auto doc_ids = torch::zeros({B, S}, i64);
  auto positions = torch::zeros({B, S}, i64);
  auto labels = ids.clone();
  auto padding = torch::zeros({B, S}, torch::TensorOptions().dtype(torch::kBool));
  int64_t start = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    doc_ids.narrow(1, start, docs[d]).fill_(int64_t(d + 1));
    positions.narrow(1, start, docs[d]).copy_(torch::arange(docs[d], i64).expand({B, docs[d]}));
    labels.narrow(1, start, 1).fill_(-100);  // no target across a document edge
    start += docs[d];
  }
  if (spec.padding > 0) {
    ids.narrow(1, valid, spec.padding).fill_(0);
    labels.narrow(1, valid, spec.padding).fill_(-100);
    padding.narrow(1, valid, spec.padding).fill_(true);
    const int64_t last = docs.back();
    positions.narrow(1, valid, spec.padding).copy_(torch::arange(last, last + spec.padding, i64).expand({B, spec.padding}));
  }
  Batch batch{ids, labels, positions, {}};
  batch.meta.document_ids = doc_ids;
  batch.meta.padding = padding;
  if (!spec.vision_runs.empty()) {
    auto groups = torch::full({B, S}, -1, i64);
    int64_t gid = 0;
    for (auto& run : spec.vision_runs) {
      if (run.start < 0 || run.length <= 0 || run.start + run.length > valid)
        throw io::InputError("batch", "vision_runs", fmt::format("run [{}, {}) outside the valid tokens [0, {})", run.start, run.start + run.length, valid));
      groups.narrow(1, run.start, run.length).fill_(gid++);
    }
    batch.meta.vision_group_ids = groups;
  }
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
