// The tensor-core forward: one CTA's work for bf16 / fp16 inputs, written once against a small warp interface
// (`Hw`) so that the same source runs on the GPU (DeviceWarp, tensor_core_device.cuh: mma.sync, __shfl_xor_sync,
// __syncthreads) and on the CPU under an emulation of the warp (tests/tensor_core_emulation_test.cu), where its
// fragment bookkeeping is checked against a brute-force oracle without a GPU.
//
// Hw provides: int thread() (0..127); void sync() (the CTA barrier); void copy_async_16(uint16_t* shared,
// const uint16_t* global) and void copy_async_wait_all() (cp.async of 16 bytes, and the wait for this thread's); float shfl_xor(float, int lane_mask) (within
// the warp); template <bool kTrans> void ldmatrix_x4(uint32_t r[4], const uint16_t* row): ldmatrix.sync.m8n8.x4
// (.trans) of 16-bit shared memory, lanes 8j..8j+7 giving the 16-byte aligned addresses of rows 0..7 of matrix j and
// every lane receiving in r[j] the elements (lane / 4, 2 (lane % 4)..+1) of matrix j, or of its transpose;
// template <bool kBf16> void mma(float c[4], const uint32_t a[4], const uint32_t b[2]): c += A B for
// one m16n8k16 tile (fp32 accumulate) with PTX's fragment layouts (g = lane / 4, t = lane % 4):
//   A 16x16 row-major: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B 16x8:            b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]
//   C 16x8:            c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// (two 16-bit values per 32-bit register, the lower index in the low half).
//
// Work split: 4 warps; each owns 16 query rows and a slice of the head dim for O (at D 512 two warps share a row
// group, each computing the full S for its rows and O for 256 columns, so no thread holds more than 128 fp32
// accumulators). K and V sub-tiles are staged row-major in shared memory in the input dtype, rows padded by 16 bytes
// (so the 8 rows an ldmatrix phase reads fall in distinct banks); V is read down its columns by ldmatrix.trans.
// S = Q K^T on tensor cores, scale and mask (the rule per element in partial tiles only), online softmax in fp32
// on the accumulator registers (row statistics reduced over the 4 lanes of a row), P rounded to the input dtype
// (as FlashAttention does) for O += P V on tensor cores. Fixed order everywhere: bitwise repeatable.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/cuda/attention_common.cuh"

namespace cpharness::kernels::cuda::detail {

__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Full unrolling where an index names a register (o[n], s[n]); host compilers never see the pragma.
#ifdef __CUDA_ARCH__
#define CPH_UNROLL _Pragma("unroll")
#else
#define CPH_UNROLL
#endif

template <int D>
struct TcTiles {
  static_assert(D == 64 || D == 128 || D == 256 || D == 512, "compiled head dims: 64, 128, 256, 512");
  static constexpr int kDSplit = D > 256 ? D / 256 : 1;  // warps sharing a 16-row group, each a slice of D
  static constexpr int kRowGroups = kWarps / kDSplit;
  static constexpr int kQ = 16 * kRowGroups;             // query rows per CTA: 64, or 32 at D 512
  static constexpr int kK = D > 256 ? 32 : 64;           // keys per shared-memory sub-tile
  static constexpr int kDW = D / kDSplit;                // O columns per warp (<= 256: 128 accumulators)
  static constexpr int kRow = D + 8;                     // Q / K / V row in shared memory, 16-bit elements
  static_assert(kK % 16 == 0 && kDW % 8 == 0, "whole mma tiles");

  // int64 metadata (q documents and groups, kv documents and groups), kv padding flags, then 16-bit tiles.
  static constexpr int kMetaBytes = 8 * (2 * kQ + 2 * kK) + ((kK + 15) / 16) * 16;
  static constexpr int smem() { return kMetaBytes + 2 * (kQ * kRow + 2 * kK * kRow); }
};

// Two floats rounded to the 16-bit input type, packed low-first into one mma register.
template <bool kBf16>
__host__ __device__ inline uint32_t pack2(float lo, float hi) {
  uint16_t l, h;
  if constexpr (kBf16) {
    const __nv_bfloat16 a = __float2bfloat16_rn(lo), b = __float2bfloat16_rn(hi);
    memcpy(&l, &a, 2);
    memcpy(&h, &b, 2);
  } else {
    const __half a = __float2half_rn(lo), b = __float2half_rn(hi);
    memcpy(&l, &a, 2);
    memcpy(&h, &b, 2);
  }
  return uint32_t(l) | (uint32_t(h) << 16);
}

// Starts staging `rows` rows of a 16-bit [B, H, S, D] tensor (row r = token s0 + r of batch b, head h; zeros past
// `valid` rows and past `dim` columns) into a row-major shared tile (row stride rs): 16-byte asynchronous copies
// (cp.async) when every row is whole and 16-byte aligned, else plain stores one element at a time. The tile is
// complete once every thread has called hw.copy_async_wait_all() and passed a barrier. Every thread of the CTA calls
// it with the same arguments.
#pragma nv_exec_check_disable
template <int D, class Hw>
__host__ __device__ void stage_rows_async(Hw& hw, uint16_t* tile, int rs, const Tensor4& t, int64_t b, int64_t h,
                                          int64_t s0, int rows, int valid, int64_t dim, int tid) {
  const uint16_t* bits = static_cast<const uint16_t*>(t.data);
  const int64_t base = valid > 0 ? offset4(t, b, h, s0) : 0;
  const bool whole = dim == D && t.stride_s % 8 == 0 && base % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
  if (whole) {
    constexpr int kChunks = D / 8;
    for (int i = tid; i < rows * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      if (r < valid)
        hw.copy_async_16(tile + r * rs + c, bits + base + int64_t(r) * t.stride_s + c);
      else
        *reinterpret_cast<uint4*>(tile + r * rs + c) = make_uint4(0u, 0u, 0u, 0u);
    }
    return;
  }
  for (int i = tid; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    tile[r * rs + d] = (r < valid && d < dim) ? bits[base + int64_t(r) * t.stride_s + d] : uint16_t(0);  // 0 bits: +0
  }
}

// Fragments from 16-bit row-major tiles in shared memory (row stride `rs` elements, a multiple of 8), one ldmatrix.x4
// each: lane l gives the address of row l % 8 of matrix l / 8.
// A operand (16 x 16) = rows r0..r0+15, columns c..c+15.
#pragma nv_exec_check_disable
template <class Hw>
__host__ __device__ __forceinline__ void fragment_a(Hw& hw, uint32_t a[4], const uint16_t* tile, int rs, int r0, int c,
                                                    int lane) {
  const int i = lane % 8, j = lane / 8;  // matrices: (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8)
  hw.template ldmatrix_x4<false>(a, &tile[(r0 + i + 8 * (j % 2)) * rs + c + 8 * (j / 2)]);
}
// B operands (16 x 8) of two adjacent n-tiles with B[k][n] = tile[n0 + n][c + k] (the rows of a tile as B's columns:
// K for S = Q K^T): b[0..1] for columns n0..n0+7, b[2..3] for n0+8..n0+15.
#pragma nv_exec_check_disable
template <class Hw>
__host__ __device__ __forceinline__ void fragment_b_pair(Hw& hw, uint32_t b[4], const uint16_t* tile, int rs, int n0,
                                                         int c, int lane) {
  const int i = lane % 8, j = lane / 8;  // matrices: (rows +0, cols +0), (+0, +8), (+8, +0), (+8, +8)
  hw.template ldmatrix_x4<false>(b, &tile[(n0 + i + 8 * (j / 2)) * rs + c + 8 * (j % 2)]);
}
// B operands of two adjacent n-tiles with B[k][n] = tile[k0 + k][n0 + n] (a tile read down its columns: V for P V),
// by ldmatrix.trans.
#pragma nv_exec_check_disable
template <class Hw>
__host__ __device__ __forceinline__ void fragment_b_pair_down(Hw& hw, uint32_t b[4], const uint16_t* tile, int rs,
                                                              int k0, int n0, int lane) {
  const int i = lane % 8, j = lane / 8;  // matrices: (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8)
  hw.template ldmatrix_x4<true>(b, &tile[(k0 + i + 8 * (j % 2)) * rs + n0 + 8 * (j / 2)]);
}
// Two adjacent 16 x 8 accumulator tiles (columns 16j..16j+15) as one A operand, rounded to the input dtype.
template <bool kBf16>
__host__ __device__ inline void fragment_a_from(uint32_t a[4], const float lo[4], const float hi[4]) {
  a[0] = pack2<kBf16>(lo[0], lo[1]);
  a[1] = pack2<kBf16>(lo[2], lo[3]);
  a[2] = pack2<kBf16>(hi[0], hi[1]);
  a[3] = pack2<kBf16>(hi[2], hi[3]);
}

template <int N>
__host__ __device__ __forceinline__ void zero(float (&acc)[N][4]) {
  CPH_UNROLL
  for (int n = 0; n < N; ++n)
    CPH_UNROLL
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
}

// One warp's 16 x 8N block of A B^T over the head dim, for two row-major staged tiles (row stride rs): acc[n] =
// rows r0..r0+15 of `a` times rows n*8..n*8+7 of `b` (S = Q K^T, dP = dO V^T and their transposes). N even.
#pragma nv_exec_check_disable
template <int D, int N, bool kBf16, class Hw>
__host__ __device__ __forceinline__ void rows_times_rows(Hw& hw, float (&acc)[N][4], const uint16_t* a, const uint16_t* b,
                                                         int rs, int r0, int lane) {
  static_assert(N % 2 == 0, "B fragments come in pairs of n-tiles");
  zero(acc);
  for (int kk = 0; kk < D; kk += 16) {
    uint32_t fa[4];
    fragment_a(hw, fa, a, rs, r0, kk, lane);
    CPH_UNROLL
    for (int n = 0; n < N; n += 2) {
      uint32_t fb[4];
      fragment_b_pair(hw, fb, b, rs, n * 8, kk, lane);
      hw.template mma<kBf16>(acc[n], fa, fb);
      hw.template mma<kBf16>(acc[n + 1], fa, fb + 2);
    }
  }
}

// acc[n] += P X for one warp: P its NP accumulator tiles (16 x 8NP, rounded to the input dtype: two adjacent tiles
// are one A operand of 16 columns), X the first 8NP rows of a row-major staged tile (row stride rs), acc[n] its
// columns c0 + n*8.. (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q). N even.
#pragma nv_exec_check_disable
template <int NP, int N, bool kBf16, class Hw>
__host__ __device__ __forceinline__ void accumulate_times(Hw& hw, float (&acc)[N][4], const float (&p)[NP][4],
                                                          const uint16_t* x, int rs, int c0, int lane) {
  static_assert(N % 2 == 0 && NP % 2 == 0, "fragments come in pairs of n-tiles");
  CPH_UNROLL
  for (int j = 0; j < NP / 2; ++j) {
    uint32_t fa[4];
    fragment_a_from<kBf16>(fa, p[2 * j], p[2 * j + 1]);
    CPH_UNROLL
    for (int n = 0; n < N; n += 2) {
      uint32_t fb[4];
      fragment_b_pair_down(hw, fb, x, rs, j * 16, c0 + n * 8, lane);
      hw.template mma<kBf16>(acc[n], fa, fb);
      hw.template mma<kBf16>(acc[n + 1], fa, fb + 2);
    }
  }
}

// The metadata of `count` staged tokens (query side: q0 + i; key side: k0 + i, padding as a key), for the per-element
// rule of partial tiles; entries past `valid` are neutral (a key past the end counts as padding).
__host__ __device__ __forceinline__ void stage_q_meta(const BlockMaskView& m, const MaskTerms& terms, int64_t mb,
                                                      int64_t q0, int count, int valid, int64_t* doc, int64_t* grp,
                                                      int tid) {
  if (tid >= count) return;
  const TokenMeta qm = tid < valid ? q_token_meta(m, terms, mb, q0 + tid) : TokenMeta{0, -1, false};
  doc[tid] = qm.doc;
  grp[tid] = qm.group;
}
__host__ __device__ __forceinline__ void stage_kv_meta(const BlockMaskView& m, const MaskTerms& terms, int64_t mb,
                                                       int64_t k0, int count, int valid, int64_t* doc, int64_t* grp,
                                                       bool* pad, int tid) {
  if (tid >= count) return;
  const TokenMeta km = tid < valid ? kv_token_meta(m, terms, mb, k0 + tid) : TokenMeta{0, -1, true};
  doc[tid] = km.doc;
  grp[tid] = km.group;
  pad[tid] = km.pad;
}

// The key sub-tiles (kSub keys, the last of a tile shorter) of one query block's tiles, in the order of its lists,
// one at a time so a kernel can start copying the next while it computes on this one. Counts the keys it walks.
struct SubTile {
  int64_t k0 = 0;
  int kl = 0;
  bool partial = false;
};
template <int kSub>
struct SubTileWalk {
  TileWalker tiles;
  int64_t k0 = 0, k_end = 0;
  bool partial = false;
  int64_t keys = 0, partial_keys = 0;  // over the tiles walked (the work counts are these times the CTA's rows)

  __host__ __device__ explicit SubTileWalk(const TileWalker& t) : tiles(t) {}
  __host__ __device__ bool next(SubTile& st, const BlockMaskView& m) {
    while (k0 >= k_end) {  // (a tile past kv_len has no keys)
      int32_t tile;
      if (!tiles.next(tile, partial)) return false;
      k0 = int64_t(tile) * m.kv_block;
      k_end = min64(m.kv_len, k0 + m.kv_block);
      const int64_t n = k_end > k0 ? k_end - k0 : 0;
      keys += n;
      if (partial) partial_keys += n;
    }
    st = SubTile{k0, int(min64(kSub, k_end - k0)), partial};
    k0 += kSub;
    return true;
  }
};

// One CTA (block index bx, by, bz as the grid of launch_forward_tc) of the forward for bf16 (kBf16) or fp16
// q, k, v of one dtype. `smem` holds TcTiles<D>::smem() bytes, 16-byte aligned.
#pragma nv_exec_check_disable
template <int D, bool kBf16, class Hw>
__host__ __device__ void tc_forward_cta(const ForwardArgs& a, Hw& hw, int64_t bx, int64_t by, int64_t bz,
                                        unsigned char* smem) {
  using T = TcTiles<D>;
  constexpr int BQ = T::kQ, BK = T::kK, DW = T::kDW, RS = T::kRow;
  constexpr int NS = BK / 8;  // score n-tiles per warp
  constexpr int NO = DW / 8;  // output n-tiles per warp
  const BlockMaskView& m = a.mask;
  const int tid = hw.thread(), lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int r0 = (warp / T::kDSplit) * 16;  // this warp's first row in the CTA
  const int c0 = (warp % T::kDSplit) * DW;  // and first O column

  const int64_t subs = (m.q_block + BQ - 1) / BQ;
  const int64_t qb = bx / subs, sub = bx % subs;
  const int64_t h = by, b = bz;
  const int64_t q0 = qb * m.q_block + sub * BQ;
  const int64_t q_block_end = min64(m.q_len, (qb + 1) * int64_t(m.q_block));
  if (q0 >= q_block_end) return;  // the whole CTA: past a short last q block
  const int ql = int(min64(BQ, q_block_end - q0));
  const int64_t hk = h / (a.g.q_heads / a.g.kv_heads);
  const int64_t mb = m.batch == 1 ? 0 : b;
  const int64_t dim = a.g.head_dim;
  const MaskTerms terms = mask_terms(m);

  int64_t* q_doc = reinterpret_cast<int64_t*>(smem);
  int64_t* q_grp = q_doc + BQ;
  int64_t* kv_doc = q_grp + BQ;
  int64_t* kv_grp = kv_doc + BK;
  bool* kv_pad = reinterpret_cast<bool*>(kv_grp + BK);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + T::kMetaBytes);
  uint16_t* Ks = Qs + BQ * RS;
  uint16_t* Vs = Ks + BK * RS;

  float o[NO][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // rows g and g + 8

  // Two copies in flight at any time: V of this sub-tile while S is computed, K of the next while O += P V is.
  // Ks and the key metadata are free once every warp has its S (the barrier after V's wait); Vs once every warp
  // has added its P V (the barrier that starts the next sub-tile).
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block;
  SubTileWalk<BK> walk(TileWalker(m.partial_kv, m.full_kv, mb, nq, qb));
  SubTile cur, nxt;
  bool have = walk.next(cur, m);
  stage_rows_async<D>(hw, Qs, RS, a.q, b, h, q0, BQ, ql, dim, tid);
  stage_q_meta(m, terms, mb, q0, BQ, ql, q_doc, q_grp, tid);
  if (have) {
    stage_rows_async<D>(hw, Ks, RS, a.k, b, hk, cur.k0, BK, cur.kl, dim, tid);
    if (cur.partial) stage_kv_meta(m, terms, mb, cur.k0, BK, cur.kl, kv_doc, kv_grp, kv_pad, tid);
  }
  while (have) {
    const int64_t k0 = cur.k0;
    const int kl = cur.kl;
    const bool partial = cur.partial;
    hw.copy_async_wait_all();
    hw.sync();  // K, its metadata (and Q) in place; every warp's P V of the previous sub-tile done
    stage_rows_async<D>(hw, Vs, RS, a.v, b, hk, k0, BK, kl, dim, tid);

    // S = Q K^T for this warp's 16 rows and every key of the sub-tile.
    float s[NS][4];
    rows_times_rows<D, NS, kBf16>(hw, s, Qs, Ks, RS, r0, lane);

    // Scale and mask: element e of n-tile n is row r0 + g + 8 (e / 2), key n * 8 + 2t + e % 2.
    CPH_UNROLL
    for (int n = 0; n < NS; ++n)
      CPH_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + g + 8 * (e / 2), col = n * 8 + 2 * t + e % 2;
        bool ok = col < kl && row < ql;
        if (ok && partial)
          ok = element_allowed(m, terms, m.q_start + q0 + row, m.kv_start + k0 + col, q_doc[row], q_grp[row],
                               TokenMeta{kv_doc[col], kv_grp[col], kv_pad[col]});
        s[n][e] = ok ? s[n][e] * a.g.scale : -INFINITY;
      }

    // Online softmax per row (the 4 lanes of a row hold its 2 x NS values each; butterflies give all 4 the same
    // result bit for bit), then O rescaled.
    CPH_UNROLL
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
      CPH_UNROLL
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
      mx = fmaxf(mx, hw.shfl_xor(mx, 1));
      mx = fmaxf(mx, hw.shfl_xor(mx, 2));
      const float m_new = fmaxf(row_max[i], mx);
      const float shift = m_new == -INFINITY ? 0.f : m_new;  // never -inf - -inf
      float sum = 0.f;
      CPH_UNROLL
      for (int n = 0; n < NS; ++n)
        CPH_UNROLL
        for (int e = 2 * i; e < 2 * i + 2; ++e) {
          s[n][e] = expf(s[n][e] - shift);
          sum += s[n][e];
        }
      sum += hw.shfl_xor(sum, 1);
      sum += hw.shfl_xor(sum, 2);
      const float alpha = expf(row_max[i] - shift);  // 0 while the row has seen no key
      row_sum[i] = row_sum[i] * alpha + sum;
      row_max[i] = m_new;
      CPH_UNROLL
      for (int n = 0; n < NO; ++n) {
        o[n][2 * i] *= alpha;
        o[n][2 * i + 1] *= alpha;
      }
    }

    have = walk.next(nxt, m);
    hw.copy_async_wait_all();
    hw.sync();  // V in place; every warp's S (and mask) of this sub-tile done
    if (have) {
      stage_rows_async<D>(hw, Ks, RS, a.k, b, hk, nxt.k0, BK, nxt.kl, dim, tid);
      if (nxt.partial) stage_kv_meta(m, terms, mb, nxt.k0, BK, nxt.kl, kv_doc, kv_grp, kv_pad, tid);
    }
    cur = nxt;

    // O += P V: P's accumulator layout over two adjacent n-tiles is the A layout of one k-step of 16 keys.
    accumulate_times<NS, NO, kBf16>(hw, o, s, Vs, RS, c0, lane);
  }
  hw.copy_async_wait_all();  // (Q's copy, when there was no key to attend to)

  CPH_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int row = r0 + g + 8 * i;
    if (row >= ql) continue;
    const float l = row_sum[i];
    const int64_t base = offset4(a.out, b, h, q0 + row);
    CPH_UNROLL
    for (int n = 0; n < NO; ++n)
      CPH_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int d = c0 + n * 8 + 2 * t + e;
        if (d < dim) store_from_float(a.out.data, base + d, a.out.dtype, l > 0.f ? o[n][2 * i + e] / l : 0.f);
      }
    if (c0 == 0 && t == 0) a.lse.data[offset3(a.lse, b, h, q0 + row)] = l > 0.f ? row_max[i] + logf(l) : -INFINITY;
  }

  if (a.work && tid == 0)
    hw.count_work(a.work, uint64_t(ql) * uint64_t(walk.keys), h == 0 ? uint64_t(ql) * uint64_t(walk.partial_keys) : 0,
                  h == 0 && sub == 0 ? walk.tiles.num_partial : 0, h == 0 && sub == 0 ? walk.tiles.num_full : 0);
}

}  // namespace cpharness::kernels::cuda::detail
