#include "kernels/chunk_attention.h"

#include <limits>
#include <vector>

#include "kernels/dense_mask.h"

namespace cpharness::kernels {
namespace {

using torch::indexing::Slice;

// The tokens of one row of tiles (a q block's kv tiles or a kv block's q tiles), in ascending tile order:
// their local indices, and which of them (positions into `tokens`) lie in partial tiles.
struct TileRow {
  std::vector<int64_t> tokens;
  std::vector<int64_t> partial_pos;
  std::vector<int64_t> partial_tokens;
  int64_t partial_tiles = 0, full_tiles = 0;
  bool contiguous() const { return !tokens.empty() && tokens.back() - tokens.front() + 1 == int64_t(tokens.size()); }
};

TileRow tile_row(const torch::Tensor& pnum, const torch::Tensor& pidx, const torch::Tensor& fnum,
                 const torch::Tensor& fidx, int64_t b, int64_t r, int64_t block, int64_t length) {
  TileRow row;
  const int32_t np = pnum.accessor<int32_t, 2>()[b][r], nf = fnum.accessor<int32_t, 2>()[b][r];
  const int32_t* p = pidx.data_ptr<int32_t>() + (b * pidx.size(1) + r) * pidx.size(2);
  const int32_t* f = fidx.data_ptr<int32_t>() + (b * fidx.size(1) + r) * fidx.size(2);
  row.partial_tiles = np;
  row.full_tiles = nf;
  int32_t a = 0, c = 0;
  while (a < np || c < nf) {  // merge the two ascending lists
    const bool take_partial = c >= nf || (a < np && p[a] < f[c]);
    const int64_t tile = take_partial ? p[a++] : f[c++];
    const int64_t t0 = tile * block, t1 = std::min(length, t0 + block);
    for (int64_t t = t0; t < t1; ++t) {
      if (take_partial) {
        row.partial_pos.push_back(int64_t(row.tokens.size()));
        row.partial_tokens.push_back(t);
      }
      row.tokens.push_back(t);
    }
  }
  return row;
}

// An index tensor on `device` (CUDA tensors take CUDA indices: one small host-to-device copy per tile row, the
// price of this libtorch-ops path; the CUDA kernel walks the lists on the device instead).
torch::Tensor as_index(const std::vector<int64_t>& v, const torch::Device& device = torch::kCPU) {
  auto t = torch::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, torch::kInt64);
  return device.is_cpu() ? t.clone() : t.to(device);
}

// x [..., S, D]-like along `dim`: the rows named by `row` (a narrow when they are contiguous).
torch::Tensor take(const torch::Tensor& x, int64_t dim, const TileRow& row, const torch::Tensor& index) {
  return row.contiguous() ? x.narrow(dim, row.tokens.front(), int64_t(row.tokens.size())) : x.index_select(dim, index);
}

TokenMetadata batch_row(const TokenMetadata& m, int64_t b) {
  auto cut = [&](const torch::Tensor& t) { return t.defined() ? t.narrow(0, b, 1) : t; };
  return {cut(m.document_ids), cut(m.padding), cut(m.vision_group_ids)};
}

TokenMetadata gather(const TokenMetadata& m, const torch::Tensor& local_index) {
  auto cut = [&](const torch::Tensor& t) { return t.defined() ? t.index_select(1, local_index.to(t.device())) : t; };
  return {cut(m.document_ids), cut(m.padding), cut(m.vision_group_ids)};
}

// Mask elements of partial tiles only: rows `q_local` x columns `kv_local` (local indices), batch row mb, on the
// indices' device.
torch::Tensor partial_mask(const BlockMask& mask, int64_t mb, const torch::Tensor& q_local,
                           const torch::Tensor& kv_local) {
  auto qm = gather(batch_row(mask.q_meta, mb), q_local);
  auto km = gather(batch_row(mask.kv_meta, mb), kv_local);
  return dense_mask_at(qm, km, q_local + mask.q_range.start, kv_local + mask.kv_range.start, mask.geometry, 1)
      .select(0, 0)
      .to(q_local.device());
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const BlockMask& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "chunk attention: q, k, v must be [B, H, S, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "chunk attention: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "chunk attention: batch / head dim mismatch");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "chunk attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(2) == mask.q_range.length && k.size(2) == mask.kv_range.length,
              "chunk attention: sequence lengths differ from the block mask's ranges");
  TORCH_CHECK(mask.batch == 1 || mask.batch == q.size(0), "chunk attention: mask batch must be 1 or B");
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// Scores of one q block [Hkv, G, ql, D] (at q0) against the keys its tile row allows: s [Hkv, G·ql, n], -inf
// where a partial tile's mask blocks the pair (full tiles never evaluate the mask), with the gathered K and V
// [Hkv, n, D]. Counts the work in `w`.
struct BlockScores {
  torch::Tensor s, ks, vs;
};
BlockScores block_scores(const torch::Tensor& qb, const torch::Tensor& kb, const torch::Tensor& vb, const TileRow& row,
                         const BlockMask& mask, int64_t mb, int64_t q0, int64_t ql, double scale, AttentionWork& w) {
  const int64_t Hkv = qb.size(0), G = qb.size(1), D = qb.size(3), n = int64_t(row.tokens.size());
  const auto dev = qb.device();
  auto cols = row.contiguous() ? torch::Tensor() : as_index(row.tokens, dev);
  auto ks = take(kb, 1, row, cols), vs = take(vb, 1, row, cols);
  auto s = torch::matmul(qb.narrow(2, q0, ql).reshape({Hkv, G * ql, D}), ks.transpose(1, 2)) * scale;
  if (!row.partial_pos.empty()) {
    auto allowed = torch::ones({ql, n}, torch::TensorOptions().dtype(torch::kBool).device(dev));
    allowed.index_copy_(1, as_index(row.partial_pos, dev),
                        partial_mask(mask, mb, torch::arange(q0, q0 + ql, torch::TensorOptions().dtype(torch::kInt64).device(dev)),
                                     as_index(row.partial_tokens, dev)));
    s = s.view({Hkv, G, ql, n}).masked_fill(allowed.logical_not(), -kInf).view({Hkv, G * ql, n});
    w.mask_elements += ql * int64_t(row.partial_tokens.size());
  }
  w.score_elements += Hkv * G * ql * n;
  w.partial_blocks += row.partial_tiles;
  w.full_blocks += row.full_tiles;
  return {s, ks, vs};
}

}  // namespace

torch::ScalarType accumulation_dtype(torch::ScalarType dtype) {
  return dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

AttentionPartial chunk_attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const BlockMask& mask, double scale, AttentionWork* work) {
  check_inputs(q, k, v, mask);
  const auto acc = accumulation_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), G = Hq / Hkv;
  auto qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  auto out = torch::zeros({B, Hq, Sq, D}, qa.options());
  auto lse = torch::full({B, Hq, Sq}, -kInf, qa.options());
  AttentionWork w;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t mb = mask.batch == 1 ? 0 : b;
    auto qb = qa[b].view({Hkv, G, Sq, D});
    auto ob = out[b].view({Hkv, G, Sq, D});
    auto lb = lse[b].view({Hkv, G, Sq});
    for (int64_t i = 0; i < mask.num_q_blocks(); ++i) {
      const TileRow row = tile_row(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                   mask.full_kv_indices, mb, i, mask.kv_block, mask.kv_range.length);
      if (row.tokens.empty()) continue;
      const int64_t q0 = i * mask.q_block, ql = mask.q_block_len(i);
      auto [s, ks, vs] = block_scores(qb, ka[b], va[b], row, mask, mb, q0, ql, scale, w);
      auto l = torch::logsumexp(s, -1);  // [Hkv, G*ql]; -inf for rows with no allowed key
      auto shift = torch::where(torch::isinf(l), torch::zeros_like(l), l);
      auto p = torch::exp(s - shift.unsqueeze(-1));
      ob.narrow(2, q0, ql).copy_(torch::matmul(p, vs).view({Hkv, G, ql, D}));
      lb.narrow(2, q0, ql).copy_(l.view({Hkv, G, ql}));
    }
  }
  if (work) *work += w;
  return {out, lse};
}

ChunkAttentionGrads chunk_attention_backward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             const torch::Tensor& out, const torch::Tensor& lse,
                                             const torch::Tensor& dout, const BlockMask& mask, double scale,
                                             AttentionWork* work) {
  check_inputs(q, k, v, mask);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "chunk attention backward: out/dout shape");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3), "chunk attention backward: lse must be [B, Hq, Sq]");
  const auto acc = accumulation_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Skv = k.size(2),
                G = Hq / Hkv;
  auto qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  auto da = dout.to(acc).contiguous();
  auto delta = (da * out.to(acc)).sum(-1).contiguous();  // [B, Hq, Sq]
  // exp(s - (+inf)) = 0: rows empty over all chunks contribute nothing (and never NaN).
  auto lse_safe = lse.to(acc);
  lse_safe = torch::where(torch::isinf(lse_safe), torch::full({}, kInf, lse_safe.options()), lse_safe).contiguous();
  auto dq = torch::zeros({B, Hq, Sq, D}, qa.options());
  auto dk = torch::zeros({B, Hkv, Skv, D}, qa.options());
  auto dv = torch::zeros({B, Hkv, Skv, D}, qa.options());
  AttentionWork w;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t mb = mask.batch == 1 ? 0 : b;
    auto qb = qa[b].view({Hkv, G, Sq, D}), db = da[b].view({Hkv, G, Sq, D});
    auto lb = lse_safe[b].view({Hkv, G, Sq}), deb = delta[b].view({Hkv, G, Sq});
    // dq: q-major.
    auto dqb = dq[b].view({Hkv, G, Sq, D});
    for (int64_t i = 0; i < mask.num_q_blocks(); ++i) {
      const TileRow row = tile_row(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                   mask.full_kv_indices, mb, i, mask.kv_block, mask.kv_range.length);
      if (row.tokens.empty()) continue;
      const int64_t q0 = i * mask.q_block, ql = mask.q_block_len(i);
      auto [s, ks, vs] = block_scores(qb, ka[b], va[b], row, mask, mb, q0, ql, scale, w);
      auto p = torch::exp(s - lb.narrow(2, q0, ql).reshape({Hkv, G * ql, 1}));
      auto dob = db.narrow(2, q0, ql).reshape({Hkv, G * ql, D});
      auto dp = torch::matmul(dob, vs.transpose(1, 2));
      auto ds = p * (dp - deb.narrow(2, q0, ql).reshape({Hkv, G * ql, 1}));
      dqb.narrow(2, q0, ql).copy_((torch::matmul(ds, ks) * scale).view({Hkv, G, ql, D}));
    }
    // dk, dv: kv-major over the transposes.
    for (int64_t j = 0; j < mask.num_kv_blocks(); ++j) {
      const TileRow row = tile_row(mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices,
                                   mb, j, mask.q_block, mask.q_range.length);
      if (row.tokens.empty()) continue;
      const int64_t k0 = j * mask.kv_block, kl = mask.kv_block_len(j), m = int64_t(row.tokens.size());
      const auto dev = qa.device();
      auto rows = row.contiguous() ? torch::Tensor() : as_index(row.tokens, dev);
      auto qs = take(qb, 2, row, rows).reshape({Hkv, G * m, D});
      auto dos = take(db, 2, row, rows).reshape({Hkv, G * m, D});
      auto ls = take(lb, 2, row, rows).reshape({Hkv, G * m, 1});
      auto des = take(deb, 2, row, rows).reshape({Hkv, G * m, 1});
      auto kb = ka[b].narrow(1, k0, kl), vb = va[b].narrow(1, k0, kl);  // [Hkv, kl, D]
      auto s = torch::matmul(qs, kb.transpose(1, 2)) * scale;          // [Hkv, G*m, kl]
      if (!row.partial_pos.empty()) {
        auto allowed = torch::ones({m, kl}, torch::TensorOptions().dtype(torch::kBool).device(dev));
        allowed.index_copy_(0, as_index(row.partial_pos, dev),
                            partial_mask(mask, mb, as_index(row.partial_tokens, dev),
                                         torch::arange(k0, k0 + kl, torch::TensorOptions().dtype(torch::kInt64).device(dev))));
        s = s.view({Hkv, G, m, kl}).masked_fill(allowed.logical_not(), -kInf).view({Hkv, G * m, kl});
        w.mask_elements += kl * int64_t(row.partial_tokens.size());
      }
      auto p = torch::exp(s - ls);
      dv[b].narrow(1, k0, kl).copy_(torch::matmul(p.transpose(1, 2), dos));
      auto dp = torch::matmul(dos, vb.transpose(1, 2));
      auto ds = p * (dp - des);
      dk[b].narrow(1, k0, kl).copy_(torch::matmul(ds.transpose(1, 2), qs) * scale);
      w.score_elements += Hq * kl * m;
    }
  }
  if (work) *work += w;
  return {dq, dk, dv};
}

}  // namespace cpharness::kernels
