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

// A vision group relaxes the causal edge only: inside one group every q - k up to the window's edge is allowed.
// Under the 5.5 .. 5.12 rule (group_past_window) it relaxes the window too: every q - k.
inline Band group_band(const Band& band, bool group_past_window) {
  return group_past_window ? Band{kNegInf, kPosInf} : Band{kNegInf, band.hi};
}

// Class of the sub-rectangle where q run qr meets kv run kr: constant metadata, so it is all blocked, the band
// alone, or (same vision group) the group's band.
inline uint8_t run_pair_class(const Run& qr, const Run& kr, bool docs, bool vision, bool group_past_window,
                              const Band& band, int64_t qa, int64_t qb, int64_t ka, int64_t kb) {
  if (kr.pad || (docs && (qr.doc != kr.doc || qr.doc <= 0))) return kEmptyBlock;
  if (vision && qr.group >= 0 && qr.group == kr.group) return band_class(group_band(band, group_past_window), qa, qb, ka, kb);
  return band_class(band, qa, qb, ka, kb);
}

// Tile lists under construction: CSR rows per (batch row b, q block i) in raw buffers (an upper bound, never
// value-initialised), and per (b, kv block j) counts for the transposes, taken on the way.
struct TileLists {
  std::unique_ptr<int32_t[]> partial, full;      // kv block indices, row after row
  std::vector<int64_t> partial_rows, full_rows;  // row r spans [rows[r], rows[r + 1])
  std::vector<int64_t> partial_per_kv, full_per_kv;  // [batch * nkv + 1]: counts at 1 + b * nkv + j
  int64_t partial_count = 0, full_count = 0;

  TileLists(int64_t batch, int64_t nq, int64_t nkv)
      : partial(new int32_t[std::max<int64_t>(1, batch * nq * nkv)]),
        full(new int32_t[std::max<int64_t>(1, batch * nq * nkv)]),
        partial_rows(batch * nq + 1, 0), full_rows(batch * nq + 1, 0),
        partial_per_kv(batch * nkv + 1, 0), full_per_kv(batch * nkv + 1, 0) {}
  void add(uint8_t cls, int64_t b, int64_t nkv, int64_t j) {
    if (cls == kPartialBlock) {
      partial[partial_count++] = int32_t(j);
      ++partial_per_kv[1 + b * nkv + j];
    } else if (cls == kFullBlock) {
      full[full_count++] = int32_t(j);
      ++full_per_kv[1 + b * nkv + j];
    }
  }
  void end_row(int64_t row) {
    partial_rows[row + 1] = partial_count;
    full_rows[row + 1] = full_count;
  }
};

// Everything one batch row's tile classification reads.
struct RowGeometry {
  TokenRange q_range, kv_range;
  int64_t q_block, kv_block, nkv;
  bool docs, vision;
  bool group_past_window;  // a group sees itself outside the window too (LayerGeometry::vision_group_past_window)
  Band band;
};

// kv blocks the band can reach from global queries [qa, qb]: k >= qa - hi and k <= qb - lo, as local indices.
std::pair<int64_t, int64_t> kv_blocks_in_reach(const RowGeometry& g, int64_t qa, int64_t qb) {
  int64_t j_lo = 0, j_hi = g.nkv - 1;
  if (g.band.lo != kNegInf) {
    const int64_t k_max = qb - g.band.lo - g.kv_range.start;
    j_hi = k_max < 0 ? -1 : std::min(j_hi, k_max / g.kv_block);
  }
  if (g.band.hi != kPosInf) {
    const int64_t k_min = qa - g.band.hi - g.kv_range.start;
    j_lo = k_min < 0 ? 0 : k_min / g.kv_block;
  }
  return {j_lo, j_hi};
}

// A tile where either side straddles a metadata boundary: the union over its (q run, kv run) sub-rectangles.
uint8_t straddling_tile_class(const RowGeometry& g, const Side& qs, const Side& ks, int64_t i, int64_t j) {
  const int64_t q0 = i * g.q_block, q1 = std::min(g.q_range.length, q0 + g.q_block);
  const int64_t k0 = j * g.kv_block, k1 = std::min(g.kv_range.length, k0 + g.kv_block);
  bool any = false, all = true;
  for (int64_t r = qs.first_run[i]; r < int64_t(qs.runs.size()) && qs.runs[r].begin < q1 && !(any && !all); ++r) {
    const Run& qr = qs.runs[r];
    const int64_t ra = g.q_range.start + std::max(qr.begin, q0), rb = g.q_range.start + std::min(qr.end, q1) - 1;
    for (int64_t t = ks.first_run[j]; t < int64_t(ks.runs.size()) && ks.runs[t].begin < k1; ++t) {
      const Run& kr = ks.runs[t];
      const uint8_t c = run_pair_class(qr, kr, g.docs, g.vision, g.group_past_window, g.band, ra, rb,
                                       g.kv_range.start + std::max(kr.begin, k0), g.kv_range.start + std::min(kr.end, k1) - 1);
      any |= c != kEmptyBlock;
      all &= c == kFullBlock;
      if (any && !all) break;
    }
  }
  return !any ? kEmptyBlock : all ? kFullBlock : kPartialBlock;
}

// Classifies the tiles of q block i of batch row b into `lists`. Only kv blocks the band can reach are visited,
// and, where a vision group on the q side can see later keys of its group, every block after them (and, when
// groups see past the window, every block before them too). Runs of tiles inside one kv run are written in one go
// where they are all empty or all full.
void classify_q_block(const RowGeometry& g, const Side& qs, const Side& ks, int64_t b, int64_t i, TileLists& lists) {
  const int64_t q0 = i * g.q_block, q1 = std::min(g.q_range.length, q0 + g.q_block);  // local [q0, q1)
  const int64_t qa = g.q_range.start + q0, qb = g.q_range.start + q1 - 1;           // global, inclusive
  const auto [j_lo, j_hi] = kv_blocks_in_reach(g, qa, qb);
  const bool scan_all = g.vision && qs.has_vision[i];
  const int64_t q_single = qs.single[i];
  const int64_t j_begin = scan_all && g.group_past_window ? 0 : j_lo, j_end = scan_all ? g.nkv - 1 : j_hi;
  // Fast path state: the kv run of the previous single-run tile and what it does with this q run
  // (kEmptyBlock regardless of position, kPartialBlock meaning "follow the band", kFullBlock meaning "follow the
  // group's band").
  int64_t cached_run = -1;
  uint8_t cached_kind = kPartialBlock;
  for (int64_t j = j_begin; j <= j_end; ++j) {
    const int64_t k0 = j * g.kv_block, k1 = std::min(g.kv_range.length, k0 + g.kv_block);
    const int64_t k_single = ks.single[j];
    const bool outside_band = j < j_lo || j > j_hi;
    if (q_single < 0 || k_single < 0) {
      if (scan_all && outside_band && !ks.has_vision[j]) continue;
      lists.add(straddling_tile_class(g, qs, ks, i, j), b, g.nkv, j);
      continue;
    }
    // The common case: one run on each side.
    if (k_single != cached_run) {
      cached_run = k_single;
      const Run& qr = qs.runs[q_single];
      const Run& kr = ks.runs[k_single];
      cached_kind = (kr.pad || (g.docs && (qr.doc != kr.doc || qr.doc <= 0)))     ? kEmptyBlock
                    : (g.vision && qr.group >= 0 && qr.group == kr.group) ? kFullBlock
                                                                           : kPartialBlock;
    }
    if (cached_kind == kEmptyBlock) {
      // Every following tile inside the same kv run is empty too: jump to the run's last whole tile.
      const int64_t run_end = ks.runs[k_single].end;
      const int64_t last = run_end == g.kv_range.length ? g.nkv - 1 : run_end / g.kv_block - 1;
      j = std::min(j_end, std::max(j, last));
      continue;
    }
    const uint8_t cls = band_class(cached_kind == kFullBlock ? group_band(g.band, g.group_past_window) : g.band, qa, qb,
                                   g.kv_range.start + k0, g.kv_range.start + k1 - 1);
    if (cls == kFullBlock && !scan_all) {
      // Full here: so are the following whole tiles of this kv run up to where the band's lower edge
      // (q - k >= lo; q - k only shrinks as j grows) cuts in. Write them in one go.
      int64_t last = std::min(j_end, ks.runs[k_single].end / g.kv_block - 1);
      if (g.band.lo != kNegInf) last = std::min(last, floor_div(qa - g.kv_range.start - g.band.lo + 1, g.kv_block) - 1);
      for (int64_t t = j; t <= last; ++t) lists.add(kFullBlock, b, g.nkv, t);
      if (last >= j) {
        j = last;
        continue;
      }
    }
    if (scan_all && cls == kEmptyBlock && outside_band && !ks.has_vision[j]) continue;
    lists.add(cls, b, g.nkv, j);
  }
}

// Counts [batch, nr] and indices [batch, nr, W] (W = the longest row; tails zero) from CSR rows.
void pack_rows(const int32_t* vals, const std::vector<int64_t>& rows, int64_t batch, int64_t nr, torch::Tensor& num,
               torch::Tensor& idx) {
  int64_t w = 0;
  for (size_t r = 0; r + 1 < rows.size(); ++r) w = std::max(w, rows[r + 1] - rows[r]);
  num = torch::empty({batch, nr}, torch::kInt32);
  idx = torch::empty({batch, nr, w}, torch::kInt32);  // filled here, not by torch ops (no thread pool)
  int32_t* n = num.data_ptr<int32_t>();
  int32_t* ix = idx.data_ptr<int32_t>();
  for (size_t r = 0; r + 1 < rows.size(); ++r) {
    const int64_t c = rows[r + 1] - rows[r];
    n[r] = int32_t(c);
    std::copy(vals + rows[r], vals + rows[r + 1], ix + r * w);
    std::fill(ix + r * w + c, ix + (r + 1) * w, 0);
  }
}

// Whether batch row b's q-major lists are band-shaped (every non-empty q row one interval of kv tiles, both
// ends nondecreasing, no empty row in between); [first, last] are then its non-empty rows.
bool band_shaped_rows(const int32_t* vals, const int64_t* rows, int64_t nq, int64_t& first, int64_t& last) {
  first = -1, last = -1;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t c = rows[i + 1] - rows[i];
    if (c == 0) {
      if (first >= 0 && last < 0) last = i - 1;
      continue;
    }
    if (last >= 0 || vals[rows[i + 1] - 1] - vals[rows[i]] + 1 != c) return false;
    if (first >= 0 && (vals[rows[i]] < vals[rows[i - 1]] || vals[rows[i + 1] - 1] < vals[rows[i] - 1])) return false;
    if (first < 0) first = i;
  }
  if (first >= 0 && last < 0) last = nq - 1;
  return true;
}

// kv-major transposes: row starts from the per-kv counts (turned into starts in place), then q blocks in
// ascending order. Band-shaped masks have interval columns too; those are written sequentially, not scattered.
std::unique_ptr<int32_t[]> transpose_rows(const int32_t* vals, const std::vector<int64_t>& rows,
                                          std::vector<int64_t>& per_kv, int64_t batch, int64_t nq, int64_t nkv) {
  for (size_t r = 1; r < per_kv.size(); ++r) per_kv[r] += per_kv[r - 1];
  std::unique_ptr<int32_t[]> out(new int32_t[std::max<int64_t>(1, per_kv.back())]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* o = rows.data() + b * nq;
    int64_t first = -1, last = -1;
    if (band_shaped_rows(vals, o, nq, first, last)) {
      int64_t lo = first;  // first row whose interval ends at or after j
      for (int64_t j = 0; j < nkv && first >= 0; ++j) {
        const int64_t count = per_kv[b * nkv + j + 1] - per_kv[b * nkv + j];
        while (lo <= last && vals[o[lo + 1] - 1] < j) ++lo;
        int32_t* dst = out.get() + per_kv[b * nkv + j];
        for (int64_t k = 0; k < count; ++k) dst[k] = int32_t(lo + k);
      }
      continue;
    }
    std::vector<int64_t> cursor(per_kv.begin() + b * nkv, per_kv.begin() + (b + 1) * nkv);
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t k = o[i]; k < o[i + 1]; ++k) out[cursor[vals[k]]++] = int32_t(i);
  }
  return out;
}

const int64_t* batch_row(const torch::Tensor& t, int64_t b, int64_t len) {
  return t.defined() ? t.data_ptr<int64_t>() + b * len : nullptr;
}

}  // namespace

BlockMask build_block_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                           TokenRange kv_range, const LayerGeometry& geometry, int64_t batch, int64_t q_block,
                           int64_t kv_block) {
  BlockMask m = block_mask_frame(q_meta, kv_meta, q_range, kv_range, geometry, batch, q_block, kv_block);
  const int64_t nq = m.num_q_blocks(), nkv = m.num_kv_blocks();

  // Per-block summaries of each side's metadata (runs of constant document / vision group / padding).
  const bool docs = q_meta.document_ids.defined() && kv_meta.document_ids.defined();
  const bool vision = vision_term_active(q_meta, kv_meta, geometry);
  const auto q_docs = docs ? cpu_i64(q_meta.document_ids) : torch::Tensor();
  const auto kv_docs = docs ? cpu_i64(kv_meta.document_ids) : torch::Tensor();
  const auto q_groups = vision ? cpu_i64(q_meta.vision_group_ids) : torch::Tensor();
  const auto kv_groups = vision ? cpu_i64(kv_meta.vision_group_ids) : torch::Tensor();
  const auto kv_padding = cpu_bool(kv_meta.padding);
  const RowGeometry g{q_range, kv_range, q_block, kv_block, nkv, docs, vision, geometry.vision_group_past_window,
                      Band{geometry.causal ? 0 : kNegInf, geometry.window ? *geometry.window - 1 : kPosInf}};

  // Tile classes, q block by q block, into CSR lists.
  TileLists lists(m.batch, nq, nkv);
  for (int64_t b = 0; b < m.batch; ++b) {
    const Side qs = make_side(q_range.length, q_block, batch_row(q_docs, b, q_range.length),
                              batch_row(q_groups, b, q_range.length), nullptr);
    const Side ks = make_side(kv_range.length, kv_block, batch_row(kv_docs, b, kv_range.length),
                              batch_row(kv_groups, b, kv_range.length),
                              kv_padding.defined() ? kv_padding.data_ptr<bool>() + b * kv_range.length : nullptr);
    for (int64_t i = 0; i < nq; ++i) {
      classify_q_block(g, qs, ks, b, i, lists);
      lists.end_row(b * nq + i);
    }
  }

  // The flex layout: q-major lists, then the kv-major transposes.
  pack_rows(lists.partial.get(), lists.partial_rows, m.batch, nq, m.kv_num_blocks, m.kv_indices);
  pack_rows(lists.full.get(), lists.full_rows, m.batch, nq, m.full_kv_num_blocks, m.full_kv_indices);
  auto partial_t = transpose_rows(lists.partial.get(), lists.partial_rows, lists.partial_per_kv, m.batch, nq, nkv);
  pack_rows(partial_t.get(), lists.partial_per_kv, m.batch, nkv, m.q_num_blocks, m.q_indices);
  auto full_t = transpose_rows(lists.full.get(), lists.full_rows, lists.full_per_kv, m.batch, nq, nkv);
  pack_rows(full_t.get(), lists.full_per_kv, m.batch, nkv, m.full_q_num_blocks, m.full_q_indices);
  return m;
}

}  // namespace cpharness::kernels
