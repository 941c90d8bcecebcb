#include "kernels/block_mask_builder.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels/dense_mask.h"

namespace cpharness::kernels {
namespace {

constexpr int64_t kNegInf = std::numeric_limits<int64_t>::min() / 4;
constexpr int64_t kPosInf = std::numeric_limits<int64_t>::max() / 4;

// A maximal run of tokens with constant metadata, in local indices [begin, end).
struct Run {
  int64_t begin, end;
  int64_t doc, group;
  bool pad;
};

// One side's runs for batch row b; `first_run[i]` is the run holding the first token of block i.
struct Side {
  std::vector<Run> runs;
  std::vector<int64_t> first_run;
  std::vector<uint8_t> has_vision;  // per block: some token of a vision group >= 0
};

torch::Tensor cpu_i64(const torch::Tensor& t) { return t.defined() ? t.to(torch::kCPU, torch::kInt64).contiguous() : t; }
torch::Tensor cpu_bool(const torch::Tensor& t) { return t.defined() ? t.to(torch::kCPU, torch::kBool).contiguous() : t; }

Side make_side(int64_t length, int64_t block, const int64_t* doc, const int64_t* group, const bool* pad) {
  Side s;
  for (int64_t t = 0; t < length; ++t) {
    const int64_t d = doc ? doc[t] : 1, g = group ? group[t] : -1;
    const bool p = pad ? pad[t] : false;
    if (s.runs.empty() || s.runs.back().doc != d || s.runs.back().group != g || s.runs.back().pad != p)
      s.runs.push_back({t, t + 1, d, g, p});
    else
      s.runs.back().end = t + 1;
  }
  const int64_t nb = (length + block - 1) / block;
  s.first_run.resize(nb);
  s.has_vision.assign(nb, 0);
  int64_t r = 0;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t b0 = i * block, b1 = std::min(length, b0 + block);
    while (s.runs[r].end <= b0) ++r;
    s.first_run[i] = r;
    for (int64_t k = r; k < int64_t(s.runs.size()) && s.runs[k].begin < b1; ++k)
      if (s.runs[k].group >= 0) s.has_vision[i] = 1;
  }
  return s;
}

struct Band {  // allowed q - k offsets [lo, hi] of the causal / window term
  int64_t lo, hi;
};

// Class of the band over the rectangle q in [qa, qb], k in [ka, kb] (inclusive, global): q - k takes every
// value in [qa - kb, qb - ka].
inline uint8_t band_class(const Band& band, int64_t qa, int64_t qb, int64_t ka, int64_t kb) {
  const int64_t dmin = qa - kb, dmax = qb - ka;
  if (std::max(dmin, band.lo) > std::min(dmax, band.hi)) return kEmptyBlock;
  return (dmin >= band.lo && dmax <= band.hi) ? kFullBlock : kPartialBlock;
}

}  // namespace

BlockMask build_block_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
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
  const int64_t nq = m.num_q_blocks(), nkv = m.num_kv_blocks();

  const bool docs = q_meta.document_ids.defined() && kv_meta.document_ids.defined();
  const bool vision = vision_term_active(q_meta, kv_meta, geometry);
  auto qd = docs ? cpu_i64(q_meta.document_ids) : torch::Tensor();
  auto kd = docs ? cpu_i64(kv_meta.document_ids) : torch::Tensor();
  auto qg = vision ? cpu_i64(q_meta.vision_group_ids) : torch::Tensor();
  auto kg = vision ? cpu_i64(kv_meta.vision_group_ids) : torch::Tensor();
  auto kp = cpu_bool(kv_meta.padding);
  const Band band{geometry.causal ? 0 : kNegInf, geometry.window ? *geometry.window - 1 : kPosInf};

  // CSR lists per (b, i), then packed into the flex layout.
  std::vector<int32_t> part, full;
  std::vector<int64_t> part_off{0}, full_off{0};
  part_off.reserve(m.batch * nq + 1);
  full_off.reserve(m.batch * nq + 1);
  for (int64_t b = 0; b < m.batch; ++b) {
    auto row = [&](const torch::Tensor& t, int64_t len) -> const int64_t* {
      return t.defined() ? t.data_ptr<int64_t>() + b * len : nullptr;
    };
    const Side qs = make_side(q_range.length, q_block, row(qd, q_range.length), row(qg, q_range.length), nullptr);
    const Side ks = make_side(kv_range.length, kv_block, row(kd, kv_range.length), row(kg, kv_range.length),
                              kp.defined() ? kp.data_ptr<bool>() + b * kv_range.length : nullptr);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t q0 = i * q_block, q1 = std::min(q_range.length, q0 + q_block);  // local [q0, q1)
      // kv blocks the band can reach: k >= qa - W + 1 and k <= qb (global), as local block indices.
      int64_t j_lo = 0, j_hi = nkv - 1;
      if (band.lo != kNegInf) {
        const int64_t k_max = q_range.start + q1 - 1 - band.lo - kv_range.start;
        j_hi = k_max < 0 ? -1 : std::min(j_hi, k_max / kv_block);
      }
      if (band.hi != kPosInf) {
        const int64_t k_min = q_range.start + q0 - band.hi - kv_range.start;
        j_lo = std::max<int64_t>(0, k_min < 0 ? 0 : k_min / kv_block);
      }
      const bool scan_all = vision && qs.has_vision[i];
      const int64_t j_begin = scan_all ? 0 : j_lo, j_end = scan_all ? nkv - 1 : j_hi;
      for (int64_t j = j_begin; j <= j_end; ++j) {
        if (scan_all && (j < j_lo || j > j_hi) && !ks.has_vision[j]) continue;
        const int64_t k0 = j * kv_block, k1 = std::min(kv_range.length, k0 + kv_block);
        bool any = false, all = true;
        for (int64_t r = qs.first_run[i]; r < int64_t(qs.runs.size()) && qs.runs[r].begin < q1 && !(any && !all); ++r) {
          const Run& qr = qs.runs[r];
          const int64_t qa = q_range.start + std::max(qr.begin, q0), qb = q_range.start + std::min(qr.end, q1) - 1;
          for (int64_t s = ks.first_run[j]; s < int64_t(ks.runs.size()) && ks.runs[s].begin < k1; ++s) {
            const Run& kr = ks.runs[s];
            uint8_t c;
            if (kr.pad || (docs && (qr.doc != kr.doc || qr.doc <= 0))) {
              c = kEmptyBlock;
            } else if (vision && qr.group >= 0 && qr.group == kr.group) {
              c = kFullBlock;
            } else {
              c = band_class(band, qa, qb, kv_range.start + std::max(kr.begin, k0),
                             kv_range.start + std::min(kr.end, k1) - 1);
            }
            any |= c != kEmptyBlock;
            all &= c == kFullBlock;
            if (any && !all) break;
          }
        }
        if (!any) continue;
        (all ? full : part).push_back(int32_t(j));
      }
      part_off.push_back(int64_t(part.size()));
      full_off.push_back(int64_t(full.size()));
    }
  }

  // Pack CSR lists (rows = batch * nr) into counts [batch, nr] and indices [batch, nr, W].
  auto pack = [&](const std::vector<int32_t>& vals, const std::vector<int64_t>& off, int64_t nr, torch::Tensor& num,
                  torch::Tensor& idx) {
    int64_t w = 0;
    for (size_t r = 0; r + 1 < off.size(); ++r) w = std::max(w, off[r + 1] - off[r]);
    num = torch::empty({m.batch, nr}, torch::kInt32);
    idx = torch::zeros({m.batch, nr, w}, torch::kInt32);
    int32_t* n = num.data_ptr<int32_t>();
    int32_t* ix = idx.data_ptr<int32_t>();
    for (size_t r = 0; r + 1 < off.size(); ++r) {
      n[r] = int32_t(off[r + 1] - off[r]);
      std::copy(vals.begin() + off[r], vals.begin() + off[r + 1], ix + r * w);
    }
  };
  // Transpose CSR (q-major over batch * nq rows) to kv-major over batch * nkv rows, q indices ascending.
  auto transpose = [&](const std::vector<int32_t>& vals, const std::vector<int64_t>& off, std::vector<int32_t>& tv,
                       std::vector<int64_t>& toff) {
    toff.assign(m.batch * nkv + 1, 0);
    for (int64_t b = 0; b < m.batch; ++b)
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t k = off[b * nq + i]; k < off[b * nq + i + 1]; ++k) ++toff[b * nkv + vals[k] + 1];
    for (size_t r = 1; r < toff.size(); ++r) toff[r] += toff[r - 1];
    tv.resize(vals.size());
    std::vector<int64_t> cursor(toff.begin(), toff.end() - 1);
    for (int64_t b = 0; b < m.batch; ++b)
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t k = off[b * nq + i]; k < off[b * nq + i + 1]; ++k) tv[cursor[b * nkv + vals[k]]++] = int32_t(i);
  };
  pack(part, part_off, nq, m.kv_num_blocks, m.kv_indices);
  pack(full, full_off, nq, m.full_kv_num_blocks, m.full_kv_indices);
  std::vector<int32_t> tv;
  std::vector<int64_t> toff;
  transpose(part, part_off, tv, toff);
  pack(tv, toff, nkv, m.q_num_blocks, m.q_indices);
  transpose(full, full_off, tv, toff);
  pack(tv, toff, nkv, m.full_q_num_blocks, m.full_q_indices);
  return m;
}

}  // namespace cpharness::kernels
