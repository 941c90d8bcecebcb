#include "kernels/block_mask_builder.h"

#include <algorithm>
#include <limits>
#include <memory>
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
  std::vector<int64_t> single;      // per block: its only run, or -1 when it straddles a metadata boundary
};

torch::Tensor cpu_i64(const torch::Tensor& t) { return t.defined() ? t.to(torch::kCPU, torch::kInt64).contiguous() : t; }
torch::Tensor cpu_bool(const torch::Tensor& t) { return t.defined() ? t.to(torch::kCPU, torch::kBool).contiguous() : t; }

Side make_side(int64_t length, int64_t block, const int64_t* doc, const int64_t* group, const bool* pad) {
  Side s;
  for (int64_t t = 0; t < length;) {
    const int64_t d = doc ? doc[t] : 1, g = group ? group[t] : -1;
    const bool p = pad ? pad[t] : false;
    int64_t e = t + 1;
    if (!group && !pad) {  // the common cases (no metadata, documents only) in a tight loop
      if (doc)
        while (e < length && doc[e] == d) ++e;
      else
        e = length;
    } else {
      while (e < length && (!doc || doc[e] == d) && (!group || group[e] == g) && (!pad || pad[e] == p)) ++e;
    }
    s.runs.push_back({t, e, d, g, p});
    t = e;
  }
  const int64_t nb = (length + block - 1) / block;
  s.first_run.resize(nb);
  s.has_vision.assign(nb, 0);
  s.single.assign(nb, -1);
  int64_t r = 0;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t b0 = i * block, b1 = std::min(length, b0 + block);
    while (s.runs[r].end <= b0) ++r;
    s.first_run[i] = r;
    if (s.runs[r].end >= b1) s.single[i] = r;
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

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Class of the sub-rectangle where q run qr meets kv run kr: constant metadata, so it is all blocked, all
// allowed (same vision group), or the band alone.
inline uint8_t run_pair_class(const Run& qr, const Run& kr, bool docs, bool vision, const Band& band, int64_t qa,
                              int64_t qb, int64_t ka, int64_t kb) {
  if (kr.pad || (docs && (qr.doc != kr.doc || qr.doc <= 0))) return kEmptyBlock;
  if (vision && qr.group >= 0 && qr.group == kr.group) return kFullBlock;
  return band_class(band, qa, qb, ka, kb);
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

  // CSR lists per (b, i) in raw buffers (an upper bound, never value-initialised), then packed into the
  // flex layout. Transpose counts are taken on the way.
  const int64_t rows = m.batch * nq, cap = std::max<int64_t>(1, m.batch * nq * nkv);
  std::unique_ptr<int32_t[]> part(new int32_t[cap]), full(new int32_t[cap]);
  std::vector<int64_t> part_off(rows + 1, 0), full_off(rows + 1, 0);
  std::vector<int64_t> part_t(m.batch * nkv + 1, 0), full_t(m.batch * nkv + 1, 0);  // transpose row starts
  int64_t np = 0, nf = 0;
  for (int64_t b = 0; b < m.batch; ++b) {
    auto row = [&](const torch::Tensor& t, int64_t len) -> const int64_t* {
      return t.defined() ? t.data_ptr<int64_t>() + b * len : nullptr;
    };
    const Side qs = make_side(q_range.length, q_block, row(qd, q_range.length), row(qg, q_range.length), nullptr);
    const Side ks = make_side(kv_range.length, kv_block, row(kd, kv_range.length), row(kg, kv_range.length),
                              kp.defined() ? kp.data_ptr<bool>() + b * kv_range.length : nullptr);
    int64_t* pt = part_t.data() + b * nkv + 1;
    int64_t* ft = full_t.data() + b * nkv + 1;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t q0 = i * q_block, q1 = std::min(q_range.length, q0 + q_block);  // local [q0, q1)
      const int64_t qa = q_range.start + q0, qb = q_range.start + q1 - 1;          // global, inclusive
      // kv blocks the band can reach: k >= qa - W + 1 and k <= qb (global), as local block indices.
      int64_t j_lo = 0, j_hi = nkv - 1;
      if (band.lo != kNegInf) {
        const int64_t k_max = qb - band.lo - kv_range.start;
        j_hi = k_max < 0 ? -1 : std::min(j_hi, k_max / kv_block);
      }
      if (band.hi != kPosInf) {
        const int64_t k_min = qa - band.hi - kv_range.start;
        j_lo = k_min < 0 ? 0 : k_min / kv_block;
      }
      const bool scan_all = vision && qs.has_vision[i];
      const int64_t q_single = qs.single[i];
      const int64_t j_begin = scan_all ? 0 : j_lo, j_end = scan_all ? nkv - 1 : j_hi;
      // Fast path state: the kv run of the previous single-run tile and what it does with this q run
      // (kEmptyBlock / kFullBlock regardless of position, or kPartialBlock meaning "follow the band").
      int64_t cached_run = -1;
      uint8_t cached_kind = kPartialBlock;
      for (int64_t j = j_begin; j <= j_end; ++j) {
        const int64_t k0 = j * kv_block, k1 = std::min(kv_range.length, k0 + kv_block);
        const int64_t k_single = ks.single[j];
        uint8_t cls;
        if (q_single >= 0 && k_single >= 0) {  // the common case: one run on each side
          if (k_single != cached_run) {
            cached_run = k_single;
            const Run& qr = qs.runs[q_single];
            const Run& kr = ks.runs[k_single];
            cached_kind = (kr.pad || (docs && (qr.doc != kr.doc || qr.doc <= 0)))      ? kEmptyBlock
                          : (vision && qr.group >= 0 && qr.group == kr.group) ? kFullBlock
                                                                               : kPartialBlock;
          }
          if (cached_kind == kEmptyBlock) {
            // Every following tile inside the same kv run is empty too: jump to the run's last whole tile.
            const int64_t run_end = ks.runs[k_single].end;
            const int64_t last = run_end == kv_range.length ? nkv - 1 : run_end / kv_block - 1;
            j = std::min(j_end, std::max(j, last));
            continue;
          }
          cls = cached_kind == kFullBlock ? kFullBlock
                                          : band_class(band, qa, qb, kv_range.start + k0, kv_range.start + k1 - 1);
          if (cls == kFullBlock && !scan_all) {
            // Full here: so are the following whole tiles of this kv run up to where the band's lower edge
            // (q - k >= lo; q - k only shrinks as j grows) cuts in. Write them in one go.
            int64_t last = std::min(j_end, ks.runs[k_single].end / kv_block - 1);
            if (band.lo != kNegInf) last = std::min(last, floor_div(qa - kv_range.start - band.lo + 1, kv_block) - 1);
            for (int64_t t = j; t <= last; ++t) {
              full[nf++] = int32_t(t);
              ++ft[t];
            }
            if (last >= j) {
              j = last;
              continue;
            }
          }
          if (scan_all && cls == kEmptyBlock && (j < j_lo || j > j_hi) && !ks.has_vision[j]) continue;
        } else {
          if (scan_all && (j < j_lo || j > j_hi) && !ks.has_vision[j]) continue;
          bool any = false, all = true;
          for (int64_t r = qs.first_run[i]; r < int64_t(qs.runs.size()) && qs.runs[r].begin < q1 && !(any && !all);
               ++r) {
            const Run& qr = qs.runs[r];
            const int64_t ra = q_range.start + std::max(qr.begin, q0), rb = q_range.start + std::min(qr.end, q1) - 1;
            for (int64_t t = ks.first_run[j]; t < int64_t(ks.runs.size()) && ks.runs[t].begin < k1; ++t) {
              const Run& kr = ks.runs[t];
              const uint8_t c = run_pair_class(qr, kr, docs, vision, band, ra, rb,
                                               kv_range.start + std::max(kr.begin, k0),
                                               kv_range.start + std::min(kr.end, k1) - 1);
              any |= c != kEmptyBlock;
              all &= c == kFullBlock;
              if (any && !all) break;
            }
          }
          cls = !any ? kEmptyBlock : all ? kFullBlock : kPartialBlock;
        }
        if (cls == kPartialBlock) {
          part[np++] = int32_t(j);
          ++pt[j];
        } else if (cls == kFullBlock) {
          full[nf++] = int32_t(j);
          ++ft[j];
        }
      }
      part_off[b * nq + i + 1] = np;
      full_off[b * nq + i + 1] = nf;
    }
  }

  // Counts [batch, nr] and indices [batch, nr, W] (W = the longest row; tails zero) from CSR rows.
  auto pack = [&](const int32_t* vals, const std::vector<int64_t>& off, int64_t nr, torch::Tensor& num,
                  torch::Tensor& idx) {
    int64_t w = 0;
    for (size_t r = 0; r + 1 < off.size(); ++r) w = std::max(w, off[r + 1] - off[r]);
    num = torch::empty({m.batch, nr}, torch::kInt32);
    idx = torch::empty({m.batch, nr, w}, torch::kInt32);  // filled here, not by torch ops (no thread pool)
    int32_t* n = num.data_ptr<int32_t>();
    int32_t* ix = idx.data_ptr<int32_t>();
    for (size_t r = 0; r + 1 < off.size(); ++r) {
      const int64_t c = off[r + 1] - off[r];
      n[r] = int32_t(c);
      std::copy(vals + off[r], vals + off[r + 1], ix + r * w);
      std::fill(ix + r * w + c, ix + (r + 1) * w, 0);
    }
  };
  // kv-major transposes: row starts from the counts, then q blocks in ascending order. Band-shaped masks
  // (every non-empty q row one interval of kv tiles, both ends nondecreasing, no empty row in between) have
  // interval columns too; those are written sequentially instead of scattered.
  auto transpose = [&](const int32_t* vals, const std::vector<int64_t>& off, std::vector<int64_t>& toff,
                       std::unique_ptr<int32_t[]>& tv) {
    for (size_t r = 1; r < toff.size(); ++r) toff[r] += toff[r - 1];
    tv.reset(new int32_t[std::max<int64_t>(1, toff.back())]);
    for (int64_t b = 0; b < m.batch; ++b) {
      const int64_t* o = off.data() + b * nq;
      int64_t first = -1, last = -1;
      bool band_shaped = true;
      for (int64_t i = 0; i < nq && band_shaped; ++i) {
        const int64_t c = o[i + 1] - o[i];
        if (c == 0) {
          if (first >= 0 && last < 0) last = i - 1;
          continue;
        }
        if (last >= 0 || vals[o[i + 1] - 1] - vals[o[i]] + 1 != c) band_shaped = false;
        if (first >= 0 && (vals[o[i]] < vals[o[i - 1]] || vals[o[i + 1] - 1] < vals[o[i] - 1])) band_shaped = false;
        if (first < 0) first = i;
      }
      if (first >= 0 && last < 0) last = nq - 1;
      if (band_shaped) {
        int64_t lo = first;  // first row whose interval ends at or after j
        for (int64_t j = 0; j < nkv && first >= 0; ++j) {
          const int64_t count = toff[b * nkv + j + 1] - toff[b * nkv + j];
          while (lo <= last && vals[o[lo + 1] - 1] < j) ++lo;
          int32_t* dst = tv.get() + toff[b * nkv + j];
          for (int64_t k = 0; k < count; ++k) dst[k] = int32_t(lo + k);
        }
        continue;
      }
      std::vector<int64_t> cursor(toff.begin() + b * nkv, toff.begin() + (b + 1) * nkv);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t k = o[i]; k < o[i + 1]; ++k) tv[cursor[vals[k]]++] = int32_t(i);
    }
  };
  pack(part.get(), part_off, nq, m.kv_num_blocks, m.kv_indices);
  pack(full.get(), full_off, nq, m.full_kv_num_blocks, m.full_kv_indices);
  std::unique_ptr<int32_t[]> tv;
  transpose(part.get(), part_off, part_t, tv);
  pack(tv.get(), part_t, nkv, m.q_num_blocks, m.q_indices);
  transpose(full.get(), full_off, full_t, tv);
  pack(tv.get(), full_t, nkv, m.full_q_num_blocks, m.full_q_indices);
  return m;
}

}  // namespace cpharness::kernels
