#include "kernels/block_mask.h"

#include <sstream>

#include "kernels/dense_mask.h"

namespace cpharness::kernels {
namespace {

// From flags [B, R, C] (bool): counts [B, R] and ascending indices [B, R, W] (W = max count; tail 0), int32.
void lists_from_flags(const torch::Tensor& flags, torch::Tensor& num, torch::Tensor& idx) {
  num = flags.sum(-1).to(torch::kInt32);
  const int64_t w = num.numel() == 0 ? 0 : num.max().item<int32_t>();
  auto order = torch::argsort(flags.logical_not().to(torch::kInt32), /*stable=*/true, /*dim=*/-1);
  auto first = order.narrow(-1, 0, w).to(torch::kInt32);
  auto valid = torch::arange(w, torch::kInt32).view({1, 1, -1}) < num.unsqueeze(-1);
  idx = torch::where(valid, first, torch::zeros({}, torch::kInt32)).contiguous();
}

void mark(torch::Tensor& classes, const torch::Tensor& num, const torch::Tensor& idx, uint8_t value) {
  auto c = classes.accessor<uint8_t, 3>();
  auto n = num.accessor<int32_t, 2>();
  auto ix = idx.accessor<int32_t, 3>();
  for (int64_t b = 0; b < num.size(0); ++b)
    for (int64_t r = 0; r < num.size(1); ++r)
      for (int32_t k = 0; k < n[b][r]; ++k) c[b][r][ix[b][r][k]] = value;
}

}  // namespace

torch::Tensor block_classes(const BlockMask& m, bool from_transposes) {
  const int64_t nq = m.num_q_blocks(), nkv = m.num_kv_blocks();
  if (!from_transposes) {
    auto classes = torch::zeros({m.batch, nq, nkv}, torch::kUInt8);
    mark(classes, m.kv_num_blocks, m.kv_indices, kPartialBlock);
    mark(classes, m.full_kv_num_blocks, m.full_kv_indices, kFullBlock);
    return classes;
  }
  auto classes = torch::zeros({m.batch, nkv, nq}, torch::kUInt8);
  mark(classes, m.q_num_blocks, m.q_indices, kPartialBlock);
  mark(classes, m.full_q_num_blocks, m.full_q_indices, kFullBlock);
  return classes.transpose(1, 2).contiguous();
}

BlockMask block_mask_frame(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                           TokenRange kv_range, const LayerGeometry& geometry, int64_t batch, int64_t q_block,
                           int64_t kv_block) {
  TORCH_CHECK(q_block > 0 && kv_block > 0, "block sizes must be positive");
  BlockMask m;
  m.q_range = q_range;
  m.kv_range = kv_range;
  m.q_block = q_block;
  m.kv_block = kv_block;
  m.batch = mask_depends_on_batch(q_meta, kv_meta) ? batch : 1;
  m.geometry = geometry;
  m.q_meta = q_meta;
  m.kv_meta = kv_meta;
  return m;
}

void fill_block_lists(BlockMask& m, const torch::Tensor& classes) {
  auto partial = classes == kPartialBlock, full = classes == kFullBlock;
  lists_from_flags(partial, m.kv_num_blocks, m.kv_indices);
  lists_from_flags(full, m.full_kv_num_blocks, m.full_kv_indices);
  lists_from_flags(partial.transpose(1, 2), m.q_num_blocks, m.q_indices);
  lists_from_flags(full.transpose(1, 2), m.full_q_num_blocks, m.full_q_indices);
}

BlockMask build_block_mask_brute_force(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                                       TokenRange kv_range, const LayerGeometry& geometry, int64_t batch,
                                       int64_t q_block, int64_t kv_block) {
  BlockMask m = block_mask_frame(q_meta, kv_meta, q_range, kv_range, geometry, batch, q_block, kv_block);
  const int64_t nq = m.num_q_blocks(), nkv = m.num_kv_blocks();
  auto dense = dense_mask(q_meta, kv_meta, q_range, kv_range, geometry, batch).narrow(0, 0, m.batch).cpu();
  // Pad to whole tiles: with false for "any", with true for "all". One tile that holds the whole range is as long
  // as the range (a block size past the sequence would otherwise allocate block x block).
  const int64_t qt = nq == 1 ? q_range.length : q_block, kt = nkv == 1 ? kv_range.length : kv_block;
  auto any_p = torch::zeros({m.batch, nq * qt, nkv * kt}, torch::kBool);
  auto all_p = torch::ones({m.batch, nq * qt, nkv * kt}, torch::kBool);
  any_p.narrow(1, 0, q_range.length).narrow(2, 0, kv_range.length).copy_(dense);
  all_p.narrow(1, 0, q_range.length).narrow(2, 0, kv_range.length).copy_(dense);
  auto any = any_p.view({m.batch, nq, qt, nkv, kt}).any(4).any(2);
  auto all = all_p.view({m.batch, nq, qt, nkv, kt}).all(4).all(2);
  auto classes = torch::where(all, int64_t(kFullBlock), torch::where(any, int64_t(kPartialBlock), int64_t(kEmptyBlock)))
                     .to(torch::kUInt8);
  fill_block_lists(m, classes);
  return m;
}

std::optional<std::string> block_mask_mismatch(const BlockMask& a, const BlockMask& b) {
  // No fmt here: libtorch ships its own fmt headers, which shadow the system library's.
  std::ostringstream os;
  auto range = [&](const char* name, TokenRange r) { os << name << " [" << r.start << ", +" << r.length << ")"; };
  if (a.q_range.start != b.q_range.start || a.q_range.length != b.q_range.length ||
      a.kv_range.start != b.kv_range.start || a.kv_range.length != b.kv_range.length) {
    os << "ranges differ: ";
    range("q", a.q_range);
    range(" kv", a.kv_range);
    range(" vs q", b.q_range);
    range(" kv", b.kv_range);
    return os.str();
  }
  if (a.q_block != b.q_block || a.kv_block != b.kv_block || a.batch != b.batch) {
    os << "block sizes / batch differ: " << a.q_block << "x" << a.kv_block << " b" << a.batch << " vs " << b.q_block
       << "x" << b.kv_block << " b" << b.batch;
    return os.str();
  }
  const std::pair<const char*, std::pair<const torch::Tensor*, const torch::Tensor*>> fields[] = {
      {"kv_num_blocks", {&a.kv_num_blocks, &b.kv_num_blocks}},
      {"kv_indices", {&a.kv_indices, &b.kv_indices}},
      {"full_kv_num_blocks", {&a.full_kv_num_blocks, &b.full_kv_num_blocks}},
      {"full_kv_indices", {&a.full_kv_indices, &b.full_kv_indices}},
      {"q_num_blocks", {&a.q_num_blocks, &b.q_num_blocks}},
      {"q_indices", {&a.q_indices, &b.q_indices}},
      {"full_q_num_blocks", {&a.full_q_num_blocks, &b.full_q_num_blocks}},
      {"full_q_indices", {&a.full_q_indices, &b.full_q_indices}},
  };
  for (const auto& [name, pair] : fields) {
    const auto& x = *pair.first;
    const auto& y = *pair.second;
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type()) {
      os << name << ": shape/dtype " << x.sizes() << " " << x.scalar_type() << " vs " << y.sizes() << " "
         << y.scalar_type();
      return os.str();
    }
    if (!torch::equal(x, y)) {
      const int64_t flat = (x != y).flatten().nonzero()[0][0].item<int64_t>();
      std::vector<int64_t> at(x.dim());
      for (int64_t d = x.dim() - 1, rest = flat; d >= 0; --d) {
        at[d] = rest % x.size(d);
        rest /= x.size(d);
      }
      os << name << " differs at " << c10::IntArrayRef(at) << ": " << x.flatten()[flat].item<int64_t>() << " vs "
         << y.flatten()[flat].item<int64_t>();
      return os.str();
    }
  }
  return std::nullopt;
}

int64_t computed_score_elements(const BlockMask& m) {
  int64_t total = 0;
  auto add = [&](const torch::Tensor& num, const torch::Tensor& idx) {
    auto n = num.accessor<int32_t, 2>();
    auto ix = idx.accessor<int32_t, 3>();
    for (int64_t b = 0; b < num.size(0); ++b)
      for (int64_t i = 0; i < num.size(1); ++i)
        for (int32_t k = 0; k < n[b][i]; ++k) total += m.q_block_len(i) * m.kv_block_len(ix[b][i][k]);
  };
  add(m.kv_num_blocks, m.kv_indices);
  add(m.full_kv_num_blocks, m.full_kv_indices);
  return total;
}

}  // namespace cpharness::kernels
