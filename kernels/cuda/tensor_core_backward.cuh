// The tensor-core backward for bf16 / fp16: the dQ and dK/dV CTA bodies, written against the warp interface of
// tensor_core_forward.cuh (GPU: DeviceWarp; CPU: the emulation in tests/tensor_core_emulation_test.cu). delta =
// rowsum(dout * out) comes from the fp32 delta kernel first. With s = scale q.k, P = exp(s - lse) (0 where masked or
// lse = -inf), dP = dout.v, dS = P (dP - delta):
//   dQ = scale dS K       one CTA per (query sub-tile, query head), over the q-major lists, as the forward;
//   dK = scale dS^T Q     one CTA per (key sub-tile, kv head), over the kv-major transposes and the G query heads of
//   dV = P^T dout         its group, so every element has one writer (no atomics, bitwise repeatable).
// Products on tensor cores (m16n8k16, fp32 accumulate); P and dS are rounded to the input dtype for the second
// product of each pair, as FlashAttention does. Every operand is staged row-major in shared memory once; the products
// that need one column-wise (K for dQ, Q and dout for dK/dV) read it down its columns by ldmatrix.trans.
#pragma once
#include "kernels/cuda/tensor_core_forward.cuh"

namespace cpharness::kernels::cuda::detail {

// The backward's per-row state of `count` staged query rows q0.. of head h: mask metadata, LSE (-inf as +inf, so that
// exp(s - lse) vanishes) and delta; rows past `valid` have P = 0.
__host__ __device__ __forceinline__ void stage_q_rows(const BackwardArgs& a, const MaskTerms& terms, int64_t mb,
                                                      int64_t b, int64_t h, int64_t q0, int count, int valid,
                                                      int64_t* doc, int64_t* grp, float* lse, float* delta, int tid) {
  stage_q_meta(a.mask, terms, mb, q0, count, valid, doc, grp, tid);
  if (tid >= count) return;
  const bool in = tid < valid;
  lse[tid] = in ? safe_lse(a.lse.data[offset3(a.lse, b, h, q0 + tid)]) : INFINITY;
  delta[tid] = in ? a.delta.data[offset3(a.delta, b, h, q0 + tid)] : 0.f;
}

template <int D>
struct TcDqTiles {
  static constexpr int kDSplit = D > 256 ? D / 256 : 1;  // as the forward: warps sharing a row group
  static constexpr int kQ = 16 * (kWarps / kDSplit);     // 64, or 32 at D 512
  static constexpr int kK = D <= 128 ? 64 : D == 256 ? 32 : 16;
  static constexpr int kDW = D / kDSplit;
  static constexpr int kRow = D + 8;
  static constexpr int kMetaBytes = 8 * (2 * kQ + 2 * kK) + 4 * 2 * kQ + ((kK + 15) / 16) * 16;
  static constexpr int smem() { return kMetaBytes + 2 * (2 * kQ * kRow + 2 * kK * kRow); }
};

template <int D>
struct TcDkdvTiles {
  static constexpr int kDSplit = D > 128 ? D / 128 : 1;  // warps sharing 16 keys, each 128 columns of dK and dV
  static constexpr int kKV = 16 * (kWarps / kDSplit);    // keys per CTA: 64, 32 at D 256, 16 at D 512
  static constexpr int kQ = D <= 64 ? 64 : D <= 256 ? 32 : 16;  // query rows per sub-tile (registers: S^T, dP^T)
  static constexpr int kDW = D / kDSplit;
  static constexpr int kRow = D + 8;
  static constexpr int kMetaBytes = 8 * (2 * kKV + 2 * kQ) + 4 * 2 * kQ + ((kKV + 15) / 16) * 16;
  static constexpr int smem() { return kMetaBytes + 2 * (2 * kKV * kRow + 2 * kQ * kRow); }
};

#pragma nv_exec_check_disable
template <int D, bool kBf16, class Hw>
__host__ __device__ void tc_dq_cta(const BackwardArgs& a, Hw& hw, int64_t bx, int64_t by, int64_t bz,
                                   unsigned char* smem) {
  using T = TcDqTiles<D>;
  constexpr int BQ = T::kQ, BK = T::kK, DW = T::kDW, RS = T::kRow;
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

  stage_rows_async<D>(hw, Qs, RS, a.q, b, h, q0, BQ, ql, dim, tid);
  stage_rows_async<D>(hw, dOs, RS, a.dout, b, h, q0, BQ, ql, dim, tid);
  stage_q_rows(a, terms, mb, b, h, q0, BQ, ql, q_doc, q_grp, row_lse, row_delta, tid);

  float dq[NO][4];
  zero(dq);

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
      hw.sync();  // the previous sub-tile's K and V are consumed (and Q, dO, row state are in place)
      stage_rows_async<D>(hw, Ks, RS, a.k, b, hk, k0, BK, kl, dim, tid);
      stage_rows_async<D>(hw, Vs, RS, a.v, b, hk, k0, BK, kl, dim, tid);
      if (partial) stage_kv_meta(m, terms, mb, k0, BK, kl, kv_doc, kv_grp, kv_pad, tid);
      hw.copy_async_wait_all();
      hw.sync();

      // S = Q K^T and dP = dO V^T for this warp's 16 rows.
      float s[NS][4], dp[NS][4];
      rows_times_rows<D, NS, kBf16>(hw, s, Qs, Ks, RS, r0, lane);
      rows_times_rows<D, NS, kBf16>(hw, dp, dOs, Vs, RS, r0, lane);
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
      accumulate_times<NS, NO, kBf16>(hw, dq, s, Ks, RS, c0, lane);
    }
  }
  // Q's and dO's copies when there was no tile: a thread never exits with a cp.async in flight (PTX leaves that
  // undefined).
  hw.copy_async_wait_all();

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
  constexpr int BKV = T::kKV, BQ = T::kQ, DW = T::kDW, RS = T::kRow;
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

  stage_rows_async<D>(hw, Ks, RS, a.k, b, hk, k0, BKV, kl, dim, tid);
  stage_rows_async<D>(hw, Vs, RS, a.v, b, hk, k0, BKV, kl, dim, tid);
  stage_kv_meta(m, terms, mb, k0, BKV, kl, k_doc, k_grp, k_pad, tid);

  float dk[NO][4], dv[NO][4];
  zero(dk);
  zero(dv);

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
        hw.sync();  // the previous (sub-tile, head)'s Q and dO are consumed
        stage_rows_async<D>(hw, Qs, RS, a.q, b, h, q0, BQ, ql, dim, tid);
        stage_rows_async<D>(hw, dOs, RS, a.dout, b, h, q0, BQ, ql, dim, tid);
        stage_q_rows(a, terms, mb, b, h, q0, BQ, ql, q_doc, q_grp, row_lse, row_delta, tid);
        hw.copy_async_wait_all();  // (the key tiles' copies too, on the first pass)
        hw.sync();

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and every query row of the sub-tile.
        float st[NS][4], dpt[NS][4];
        rows_times_rows<D, NS, kBf16>(hw, st, Ks, Qs, RS, r0, lane);
        rows_times_rows<D, NS, kBf16>(hw, dpt, Vs, dOs, RS, r0, lane);
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
        // dV += P^T dO and dK += dS^T Q (scaled at the end), dO and Q read down their columns.
        accumulate_times<NS, NO, kBf16>(hw, dv, st, dOs, RS, c0, lane);
        accumulate_times<NS, NO, kBf16>(hw, dk, dpt, Qs, RS, c0, lane);
      }
    }
  }
  hw.copy_async_wait_all();  // K's and V's copies when there was no tile (as in tc_dq_cta)

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
