// The tensor-core backward for bf16 / fp16: the dQ and dK/dV CTA bodies, written against the warp interface of
// tensor_core_forward.cuh (GPU: DeviceWarp; CPU: the emulation in tests/tensor_core_emulation_test.cu). delta =
// rowsum(dout * out) comes from the fp32 delta kernel first. With s = scale q.k, P = exp(s - lse) (0 where masked or
// lse = -inf), dP = dout.v, dS = P (dP - delta):
//   dQ = scale dS K       one CTA per (query sub-tile, query head), over the q-major lists, as the forward;
//   dK = scale dS^T Q     one CTA per (key sub-tile, kv head), over the kv-major transposes and the G query heads of
//   dV = P^T dout         its group, so every element has one writer (no atomics, bitwise repeatable).
// Products on tensor cores (m16n8k16, fp32 accumulate); P and dS are rounded to the input dtype for the second
// product of each pair, as FlashAttention does. Operands a product needs column-wise are staged transposed in
// shared memory (K^T for dQ; Q^T and dout^T for dK/dV), so every fragment is two adjacent 16-bit values.
#pragma once
#include "kernels/cuda/tensor_core_forward.cuh"

namespace cpharness::kernels::cuda::detail {

// Fragments from 16-bit tiles in shared memory (row stride `rs` elements), lane coordinates g = lane / 4, t = lane % 4.
// A operand (16 x 16) = rows r0..r0+15, columns c..c+15 of a row-major tile.
__host__ __device__ inline void fragment_a(uint32_t a[4], const uint16_t* tile, int rs, int r0, int c, int g, int t) {
  a[0] = load_pair(&tile[(r0 + g) * rs + c + 2 * t]);
  a[1] = load_pair(&tile[(r0 + g + 8) * rs + c + 2 * t]);
  a[2] = load_pair(&tile[(r0 + g) * rs + c + 8 + 2 * t]);
  a[3] = load_pair(&tile[(r0 + g + 8) * rs + c + 8 + 2 * t]);
}
// B operand (16 x 8) with B[k][n] = tile[n0 + n][c + k]: the rows of a row-major tile as B's columns.
__host__ __device__ inline void fragment_b(uint32_t b[2], const uint16_t* tile, int rs, int n0, int c, int g, int t) {
  b[0] = load_pair(&tile[(n0 + g) * rs + c + 2 * t]);
  b[1] = load_pair(&tile[(n0 + g) * rs + c + 8 + 2 * t]);
}
// Two adjacent 16 x 8 accumulator tiles (columns 16j..16j+15) as one A operand, rounded to the input dtype.
template <bool kBf16>
__host__ __device__ inline void fragment_a_from(uint32_t a[4], const float lo[4], const float hi[4]) {
  a[0] = pack2<kBf16>(lo[0], lo[1]);
  a[1] = pack2<kBf16>(lo[2], lo[3]);
  a[2] = pack2<kBf16>(hi[0], hi[1]);
  a[3] = pack2<kBf16>(hi[2], hi[3]);
}

// exp(s - lse) must vanish for rows with no key anywhere: their lse = -inf is used as +inf.
__host__ __device__ inline float finite_lse(float lse) { return lse == -INFINITY ? INFINITY : lse; }

template <int D>
struct TcDqTiles {
  static constexpr int kDSplit = D > 256 ? D / 256 : 1;  // as the forward: warps sharing a row group
  static constexpr int kQ = 16 * (kWarps / kDSplit);     // 64, or 32 at D 512
  static constexpr int kK = D <= 128 ? 64 : D == 256 ? 32 : 16;
  static constexpr int kDW = D / kDSplit;
  static constexpr int kRow = D + 8, kKtRow = kK + 8;
  static constexpr int kMetaBytes = 8 * (2 * kQ + 2 * kK) + 4 * 2 * kQ + ((kK + 15) / 16) * 16;
  static constexpr int smem() { return kMetaBytes + 2 * (2 * kQ * kRow + 2 * kK * kRow + D * kKtRow); }
};

template <int D>
struct TcDkdvTiles {
  static constexpr int kDSplit = D > 128 ? D / 128 : 1;  // warps sharing 16 keys, each 128 columns of dK and dV
  static constexpr int kKV = 16 * (kWarps / kDSplit);    // keys per CTA: 64, 32 at D 256, 16 at D 512
  static constexpr int kQ = D <= 64 ? 64 : D <= 256 ? 32 : 16;  // query rows per sub-tile (registers: S^T, dP^T)
  static constexpr int kDW = D / kDSplit;
  static constexpr int kRow = D + 8, kTRow = kQ + 8;
  static constexpr int kMetaBytes = 8 * (2 * kKV + 2 * kQ) + 4 * 2 * kQ + ((kKV + 15) / 16) * 16;
  static constexpr int smem() { return kMetaBytes + 2 * (2 * kKV * kRow + 2 * kQ * kRow + 2 * D * kTRow); }
};

#pragma nv_exec_check_disable
template <int D, bool kBf16, class Hw>
__host__ __device__ void tc_dq_cta(const BackwardArgs& a, Hw& hw, int64_t bx, int64_t by, int64_t bz,
                                   unsigned char* smem) {
  using T = TcDqTiles<D>;
  constexpr int BQ = T::kQ, BK = T::kK, DW = T::kDW, RS = T::kRow, KS = T::kKtRow;
  constexpr int NS = BK / 8, NO = DW / 8;
  const BlockMaskView& m = a.mask;
  const int tid = hw.thread(), lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int r0 = (warp / T::kDSplit) * 16, c0 = (warp % T::kDSplit) * DW;

  const int64_t subs = (m.q_block + BQ - 1) / BQ;
  const int64_t qb = bx / subs, sub = bx % subs;
  const int64_t h = by, b = bz;
  const int64_t q0 = qb * m.q_block + sub * BQ;
  const int64_t q_block_end = min64(m.q_len, (qb + 1) * int64_t(m.q_block));
  if (q0 >= q_block_end) return;
  const int ql = int(min64(BQ, q_block_end - q0));
  const int64_t hk = h / (a.g.q_heads / a.g.kv_heads);
  const int64_t mb = m.batch == 1 ? 0 : b;
  const int64_t dim = a.g.head_dim;
  const MaskTerms terms = mask_terms(m);

  int64_t* q_doc = reinterpret_cast<int64_t*>(smem);
  int64_t* q_grp = q_doc + BQ;
  int64_t* kv_doc = q_grp + BQ;
  int64_t* kv_grp = kv_doc + BK;
  float* row_lse = reinterpret_cast<float*>(kv_grp + BK);
  float* row_delta = row_lse + BQ;
  bool* kv_pad = reinterpret_cast<bool*>(row_delta + BQ);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + T::kMetaBytes);
  uint16_t* dOs = Qs + BQ * RS;
  uint16_t* Ks = dOs + BQ * RS;
  uint16_t* Vs = Ks + BK * RS;
  uint16_t* Kt = Vs + BK * RS;

  stage_rows<D>(Qs, RS, nullptr, 0, a.q, b, h, q0, BQ, ql, dim, tid);
  stage_rows<D>(dOs, RS, nullptr, 0, a.dout, b, h, q0, BQ, ql, dim, tid);
  if (tid < BQ) {
    const bool in = tid < ql;
    const TokenMeta qm = in ? q_token_meta(m, terms, mb, q0 + tid) : TokenMeta{0, -1, false};
    q_doc[tid] = qm.doc;
    q_grp[tid] = qm.group;
    row_lse[tid] = in ? finite_lse(a.lse.data[offset3(a.lse, b, h, q0 + tid)]) : INFINITY;
    row_delta[tid] = in ? a.delta.data[offset3(a.delta, b, h, q0 + tid)] : 0.f;
  }

  float dq[NO][4];
  CPH_UNROLL
  for (int n = 0; n < NO; ++n)
    CPH_UNROLL
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;

  unsigned long long n_score = 0, n_mask = 0;
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block;
  TileWalker walk(m.partial_kv, m.full_kv, mb, nq, qb);
  int32_t tile;
  bool partial;
  while (walk.next(tile, partial)) {
    const int64_t k_begin = int64_t(tile) * m.kv_block, k_end = min64(m.kv_len, k_begin + m.kv_block);
    n_score += uint64_t(ql) * uint64_t(k_end - k_begin);
    if (partial) n_mask += uint64_t(ql) * uint64_t(k_end - k_begin);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
      const int kl = int(min64(BK, k_end - k0));
      hw.sync();  // the previous sub-tile's K, V, K^T are consumed (and Q, dO, row state are in place)
      stage_rows<D>(Ks, RS, Kt, KS, a.k, b, hk, k0, BK, kl, dim, tid);
      stage_rows<D>(Vs, RS, nullptr, 0, a.v, b, hk, k0, BK, kl, dim, tid);
      if (partial && tid < BK) {
        const TokenMeta km = tid < kl ? kv_token_meta(m, terms, mb, k0 + tid) : TokenMeta{0, -1, true};
        kv_doc[tid] = km.doc;
        kv_grp[tid] = km.group;
        kv_pad[tid] = km.pad;
      }
      hw.sync();

      // S = Q K^T and dP = dO V^T for this warp's 16 rows.
      float s[NS][4], dp[NS][4];
      CPH_UNROLL
      for (int n = 0; n < NS; ++n)
        CPH_UNROLL
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
      for (int kk = 0; kk < D; kk += 16) {
        uint32_t qa[4], oa[4];
        fragment_a(qa, Qs, RS, r0, kk, g, t);
        fragment_a(oa, dOs, RS, r0, kk, g, t);
        CPH_UNROLL
        for (int n = 0; n < NS; ++n) {
          uint32_t kb[2], vb[2];
          fragment_b(kb, Ks, RS, n * 8, kk, g, t);
          fragment_b(vb, Vs, RS, n * 8, kk, g, t);
          hw.template mma<kBf16>(s[n], qa, kb);
          hw.template mma<kBf16>(dp[n], oa, vb);
        }
      }
      // dS = P (dP - delta), P = exp(scale S - lse) on allowed elements; kept in s.
      CPH_UNROLL
      for (int n = 0; n < NS; ++n)
        CPH_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int row = r0 + g + 8 * (e / 2), col = n * 8 + 2 * t + e % 2;
          bool ok = col < kl && row < ql;
          if (ok && partial)
            ok = element_allowed(m, terms, m.q_start + q0 + row, m.kv_start + k0 + col, q_doc[row], q_grp[row],
                                 TokenMeta{kv_doc[col], kv_grp[col], kv_pad[col]});
          const float p = ok ? expf(s[n][e] * a.g.scale - row_lse[row]) : 0.f;
          s[n][e] = p * (dp[n][e] - row_delta[row]);
        }
      // dQ += dS K (scaled at the end).
      CPH_UNROLL
      for (int j = 0; j < BK / 16; ++j) {
        uint32_t da[4];
        fragment_a_from<kBf16>(da, s[2 * j], s[2 * j + 1]);
        CPH_UNROLL
        for (int n = 0; n < NO; ++n) {
          uint32_t kb[2];
          fragment_b(kb, Kt, KS, c0 + n * 8, j * 16, g, t);
          hw.template mma<kBf16>(dq[n], da, kb);
        }
      }
    }
  }

  CPH_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int row = r0 + g + 8 * i;
    if (row >= ql) continue;
    const int64_t base = offset4(a.dq, b, h, q0 + row);
    CPH_UNROLL
    for (int n = 0; n < NO; ++n)
      CPH_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = c0 + n * 8 + 2 * t + e;
        if (d < dim) store_from_float(a.dq.data, base + d, a.dq.dtype, dq[n][2 * i + e] * a.g.scale);
      }
  }
  if (a.work && tid == 0)
    hw.count_work(a.work, n_score, h == 0 ? n_mask : 0, h == 0 && sub == 0 ? walk.num_partial : 0,
                  h == 0 && sub == 0 ? walk.num_full : 0);
}

#pragma nv_exec_check_disable
template <int D, bool kBf16, class Hw>
__host__ __device__ void tc_dkdv_cta(const BackwardArgs& a, Hw& hw, int64_t bx, int64_t by, int64_t bz,
                                     unsigned char* smem) {
  using T = TcDkdvTiles<D>;
  constexpr int BKV = T::kKV, BQ = T::kQ, DW = T::kDW, RS = T::kRow, TS = T::kTRow;
  constexpr int NS = BQ / 8, NO = DW / 8;
  const BlockMaskView& m = a.mask;
  const int tid = hw.thread(), lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int r0 = (warp / T::kDSplit) * 16, c0 = (warp % T::kDSplit) * DW;  // key rows and dK/dV columns

  const int64_t subs = (m.kv_block + BKV - 1) / BKV;
  const int64_t kb = bx / subs, sub = bx % subs;
  const int64_t hk = by, b = bz;
  const int64_t k0 = kb * m.kv_block + sub * BKV;
  const int64_t kv_block_end = min64(m.kv_len, (kb + 1) * int64_t(m.kv_block));
  if (k0 >= kv_block_end) return;
  const int kl = int(min64(BKV, kv_block_end - k0));
  const int64_t G = a.g.q_heads / a.g.kv_heads;
  const int64_t mb = m.batch == 1 ? 0 : b;
  const int64_t dim = a.g.head_dim;
  const MaskTerms terms = mask_terms(m);

  int64_t* k_doc = reinterpret_cast<int64_t*>(smem);
  int64_t* k_grp = k_doc + BKV;
  int64_t* q_doc = k_grp + BKV;
  int64_t* q_grp = q_doc + BQ;
  float* row_lse = reinterpret_cast<float*>(q_grp + BQ);
  float* row_delta = row_lse + BQ;
  bool* k_pad = reinterpret_cast<bool*>(row_delta + BQ);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + T::kMetaBytes);
  uint16_t* Vs = Ks + BKV * RS;
  uint16_t* Qs = Vs + BKV * RS;
  uint16_t* dOs = Qs + BQ * RS;
  uint16_t* Qt = dOs + BQ * RS;
  uint16_t* dOt = Qt + D * TS;

  stage_rows<D>(Ks, RS, nullptr, 0, a.k, b, hk, k0, BKV, kl, dim, tid);
  stage_rows<D>(Vs, RS, nullptr, 0, a.v, b, hk, k0, BKV, kl, dim, tid);
  if (tid < BKV) {
    const TokenMeta km = tid < kl ? kv_token_meta(m, terms, mb, k0 + tid) : TokenMeta{0, -1, true};
    k_doc[tid] = km.doc;
    k_grp[tid] = km.group;
    k_pad[tid] = km.pad;
  }

  float dk[NO][4], dv[NO][4];
  CPH_UNROLL
  for (int n = 0; n < NO; ++n)
    CPH_UNROLL
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  unsigned long long n_score = 0, n_mask = 0;
  const int64_t nkv = (m.kv_len + m.kv_block - 1) / m.kv_block;
  TileWalker walk(m.partial_q, m.full_q, mb, nkv, kb);
  int32_t tile;
  bool partial;
  while (walk.next(tile, partial)) {
    const int64_t q_begin = int64_t(tile) * m.q_block, q_end = min64(m.q_len, q_begin + m.q_block);
    n_score += uint64_t(G) * uint64_t(kl) * uint64_t(q_end - q_begin);
    if (partial) n_mask += uint64_t(kl) * uint64_t(q_end - q_begin);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += BQ) {
      const int ql = int(min64(BQ, q_end - q0));
      for (int64_t gq = 0; gq < G; ++gq) {
        const int64_t h = hk * G + gq;
        hw.sync();  // the previous (sub-tile, head)'s Q, dO and their transposes are consumed
        stage_rows<D>(Qs, RS, Qt, TS, a.q, b, h, q0, BQ, ql, dim, tid);
        stage_rows<D>(dOs, RS, dOt, TS, a.dout, b, h, q0, BQ, ql, dim, tid);
        if (tid < BQ) {
          const bool in = tid < ql;
          const TokenMeta qm = in ? q_token_meta(m, terms, mb, q0 + tid) : TokenMeta{0, -1, false};
          q_doc[tid] = qm.doc;
          q_grp[tid] = qm.group;
          row_lse[tid] = in ? finite_lse(a.lse.data[offset3(a.lse, b, h, q0 + tid)]) : INFINITY;
          row_delta[tid] = in ? a.delta.data[offset3(a.delta, b, h, q0 + tid)] : 0.f;
        }
        hw.sync();

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and every query row of the sub-tile.
        float st[NS][4], dpt[NS][4];
        CPH_UNROLL
        for (int n = 0; n < NS; ++n)
          CPH_UNROLL
          for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
        for (int kk = 0; kk < D; kk += 16) {
          uint32_t ka[4], va[4];
          fragment_a(ka, Ks, RS, r0, kk, g, t);
          fragment_a(va, Vs, RS, r0, kk, g, t);
          CPH_UNROLL
          for (int n = 0; n < NS; ++n) {
            uint32_t qb[2], ob[2];
            fragment_b(qb, Qs, RS, n * 8, kk, g, t);
            fragment_b(ob, dOs, RS, n * 8, kk, g, t);
            hw.template mma<kBf16>(st[n], ka, qb);
            hw.template mma<kBf16>(dpt[n], va, ob);
          }
        }
        // P^T (kept in st) and dS^T = P^T (dP^T - delta) (kept in dpt); element e: key r0 + g + 8 (e / 2), query
        // column n * 8 + 2t + e % 2.
        CPH_UNROLL
        for (int n = 0; n < NS; ++n)
          CPH_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int kr = r0 + g + 8 * (e / 2), qc = n * 8 + 2 * t + e % 2;
            bool ok = kr < kl && qc < ql;
            if (ok && partial)
              ok = element_allowed(m, terms, m.q_start + q0 + qc, m.kv_start + k0 + kr, q_doc[qc], q_grp[qc],
                                   TokenMeta{k_doc[kr], k_grp[kr], k_pad[kr]});
            const float p = ok ? expf(st[n][e] * a.g.scale - row_lse[qc]) : 0.f;
            st[n][e] = p;
            dpt[n][e] = p * (dpt[n][e] - row_delta[qc]);
          }
        // dV += P^T dO and dK += dS^T Q (scaled at the end): B[k = query][n = d] from the transposed tiles.
        CPH_UNROLL
        for (int j = 0; j < BQ / 16; ++j) {
          uint32_t pa[4], da[4];
          fragment_a_from<kBf16>(pa, st[2 * j], st[2 * j + 1]);
          fragment_a_from<kBf16>(da, dpt[2 * j], dpt[2 * j + 1]);
          CPH_UNROLL
          for (int n = 0; n < NO; ++n) {
            uint32_t ob[2], qb[2];
            fragment_b(ob, dOt, TS, c0 + n * 8, j * 16, g, t);
            fragment_b(qb, Qt, TS, c0 + n * 8, j * 16, g, t);
            hw.template mma<kBf16>(dv[n], pa, ob);
            hw.template mma<kBf16>(dk[n], da, qb);
          }
        }
      }
    }
  }

  CPH_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int kr = r0 + g + 8 * i;
    if (kr >= kl) continue;
    const int64_t kbase = offset4(a.dk, b, hk, k0 + kr), vbase = offset4(a.dv, b, hk, k0 + kr);
    CPH_UNROLL
    for (int n = 0; n < NO; ++n)
      CPH_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = c0 + n * 8 + 2 * t + e;
        if (d >= dim) continue;
        store_from_float(a.dk.data, kbase + d, a.dk.dtype, dk[n][2 * i + e] * a.g.scale);
        store_from_float(a.dv.data, vbase + d, a.dv.dtype, dv[n][2 * i + e]);
      }
  }
  if (a.work && tid == 0) hw.count_work(a.work, n_score, hk == 0 ? n_mask : 0, 0, 0);
}

}  // namespace cpharness::kernels::cuda::detail
