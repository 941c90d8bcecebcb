// Backward from dout, the merged out and LSE, in three launches on one stream, none with atomics on results:
//   1. delta = rowsum(dout * out) (fp32), one warp per row;
//   2. dQ: one CTA per (query sub-tile, query head, batch element) walking the q-major lists, as the forward;
//   3. dK, dV: one CTA per (key sub-tile inside one kv block, kv head, batch element) walking the kv-major
//      transposes, looping over the G query heads of its group inside, so each dK / dV element has one writer.
// P = exp(scale q.k - lse) on allowed elements (0 where lse = -inf), dS = P (dout.v - delta),
// dQ = scale dS K, dK = scale dS^T Q, dV = P^T dout; everything accumulates in fp32 in a fixed order.
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/tensor_core_backward.cuh"
#include "kernels/cuda/tensor_core_device.cuh"

namespace cpharness::kernels::cuda {
namespace detail {
namespace {


__global__ void __launch_bounds__(kThreads) delta_kernel(const __grid_constant__ BackwardArgs a) {
  const int64_t Sq = a.mask.q_len;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= a.g.batch * a.g.q_heads * Sq) return;
  const int64_t s = row % Sq, h = (row / Sq) % a.g.q_heads, b = row / (Sq * a.g.q_heads);
  const int lane = threadIdx.x % 32;
  const int64_t od = offset4(a.out, b, h, s), gd = offset4(a.dout, b, h, s);
  float sum = 0.f;
  for (int64_t d = lane; d < a.g.head_dim; d += 32)
    sum = fmaf(load_as_float(a.dout.data, gd + d, a.dout.dtype), load_as_float(a.out.data, od + d, a.out.dtype), sum);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) a.delta.data[offset3(a.delta, b, h, s)] = sum;
}

template <int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const __grid_constant__ BackwardArgs a) {
  using T = Tiles<D>;
  constexpr int BQ = T::kQ, BK = T::kK, S = T::kStride, PS = BK + 1, C = T::kCols;
  constexpr int RPW = BQ / kWarps, E = BQ * BK / kThreads, RSTEP = kThreads / BK;
  const BlockMaskView& m = a.mask;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  const int64_t subs = (m.q_block + BQ - 1) / BQ;
  const int64_t qb = blockIdx.x / subs, sub = blockIdx.x % subs;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t q0 = qb * m.q_block + sub * BQ;
  const int64_t q_block_end = min(m.q_len, (qb + 1) * int64_t(m.q_block));
  if (q0 >= q_block_end) return;
  const int ql = int(min(int64_t(BQ), q_block_end - q0));
  const int64_t hk = h / (a.g.q_heads / a.g.kv_heads);
  const int64_t mb = m.batch == 1 ? 0 : b;
  const int64_t dim = a.g.head_dim;
  const MaskTerms terms = mask_terms(m);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* q_doc = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* q_grp = q_doc + BQ;
  float* Qs = reinterpret_cast<float*>(q_grp + BQ);
  float* dOs = Qs + BQ * S;
  float* Ks = dOs + BQ * S;
  float* Vs = Ks + BK * S;
  float* dSs = Vs + BK * S;
  float* row_lse = dSs + BQ * PS;
  float* row_delta = row_lse + BQ;

  for (int i = tid; i < BQ * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const bool in = r < ql && d < dim;
    Qs[r * S + d] = in ? load_as_float(a.q.data, offset4(a.q, b, h, q0 + r) + d, a.q.dtype) : 0.f;
    dOs[r * S + d] = in ? load_as_float(a.dout.data, offset4(a.dout, b, h, q0 + r) + d, a.dout.dtype) : 0.f;
  }
  if (tid < BQ) {
    const bool in = tid < ql;
    const TokenMeta qm = in ? q_token_meta(m, terms, mb, q0 + tid) : TokenMeta{0, -1, false};
    q_doc[tid] = qm.doc;
    q_grp[tid] = qm.group;
    row_lse[tid] = in ? safe_lse(a.lse.data[offset3(a.lse, b, h, q0 + tid)]) : INFINITY;
    row_delta[tid] = in ? a.delta.data[offset3(a.delta, b, h, q0 + tid)] : 0.f;
  }

  float acc[RPW][C];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.f;

  unsigned long long n_score = 0, n_mask = 0;
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block;
  TileWalker walk(m.partial_kv, m.full_kv, mb, nq, qb);
  int32_t tile;
  bool partial;
  while (walk.next(tile, partial)) {
    const int64_t k_begin = int64_t(tile) * m.kv_block, k_end = min(m.kv_len, k_begin + m.kv_block);
    n_score += uint64_t(ql) * uint64_t(k_end - k_begin);
    if (partial) n_mask += uint64_t(ql) * uint64_t(k_end - k_begin);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
      const int kl = int(min(int64_t(BK), k_end - k0));
      __syncthreads();
      for (int i = tid; i < BK * D; i += kThreads) {
        const int j = i / D, d = i % D;
        const bool in = j < kl && d < dim;
        Ks[j * S + d] = in ? load_as_float(a.k.data, offset4(a.k, b, hk, k0 + j) + d, a.k.dtype) : 0.f;
        Vs[j * S + d] = in ? load_as_float(a.v.data, offset4(a.v, b, hk, k0 + j) + d, a.v.dtype) : 0.f;
      }
      __syncthreads();

      const int col = tid % BK, row0 = tid / BK;
      float s[E], dp[E];
#pragma unroll
      for (int e = 0; e < E; ++e) s[e] = dp[e] = 0.f;
#pragma unroll 2
      for (int d = 0; d < D; ++d) {
        const float kd = Ks[col * S + d], vd = Vs[col * S + d];
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int r = row0 + e * RSTEP;
          s[e] = fmaf(Qs[r * S + d], kd, s[e]);
          dp[e] = fmaf(dOs[r * S + d], vd, dp[e]);
        }
      }
      const bool col_in = col < kl;
      const int64_t kg = m.kv_start + k0 + col;
      const TokenMeta km = (partial && col_in) ? kv_token_meta(m, terms, mb, k0 + col) : TokenMeta{0, -1, false};
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int r = row0 + e * RSTEP;
        bool ok = col_in && r < ql;
        if (ok && partial) ok = element_allowed(m, terms, m.q_start + q0 + r, kg, q_doc[r], q_grp[r], km);
        const float p = ok ? expf(s[e] * a.g.scale - row_lse[r]) : 0.f;
        dSs[r * PS + col] = p * (dp[e] - row_delta[r]);
      }
      __syncthreads();

      for (int j = 0; j < kl; ++j) {
        float kj[C];
#pragma unroll
        for (int c = 0; c < C; ++c) kj[c] = Ks[j * S + lane + 32 * c];
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
          const float ds = dSs[(warp * RPW + rr) * PS + j];
#pragma unroll
          for (int c = 0; c < C; ++c) acc[rr][c] = fmaf(ds, kj[c], acc[rr][c]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    if (r >= ql) continue;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int d = lane + 32 * c;
      if (d < dim) store_from_float(a.dq.data, offset4(a.dq, b, h, q0 + r) + d, a.dq.dtype, acc[rr][c] * a.g.scale);
    }
  }

  if (a.work && tid == 0) {
    atomicAdd(&a.work->score_elements, n_score);
    if (h == 0) {
      atomicAdd(&a.work->mask_elements, n_mask);
      if (sub == 0) {
        atomicAdd(&a.work->partial_blocks, (unsigned long long)walk.num_partial);
        atomicAdd(&a.work->full_blocks, (unsigned long long)walk.num_full);
      }
    }
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const __grid_constant__ BackwardArgs a) {
  using T = Tiles<D>;
  constexpr int BKV = T::kKV, BQ = T::kQB, S = T::kStride, PQ = BQ + 1, C = T::kCols;
  constexpr int RPW = BKV / kWarps;         // key rows per warp in the accumulation
  constexpr int E = BKV * BQ / kThreads;    // (key, query) scores per thread
  constexpr int RSTEP = kThreads / BQ;      // key-row step between a thread's scores
  const BlockMaskView& m = a.mask;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  const int64_t subs = (m.kv_block + BKV - 1) / BKV;
  const int64_t kb = blockIdx.x / subs, sub = blockIdx.x % subs;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int64_t k0 = kb * m.kv_block + sub * BKV;
  const int64_t kv_block_end = min(m.kv_len, (kb + 1) * int64_t(m.kv_block));
  if (k0 >= kv_block_end) return;
  const int kl = int(min(int64_t(BKV), kv_block_end - k0));
  const int64_t G = a.g.q_heads / a.g.kv_heads;
  const int64_t mb = m.batch == 1 ? 0 : b;
  const int64_t dim = a.g.head_dim;
  const MaskTerms terms = mask_terms(m);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* k_doc = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* k_grp = k_doc + BKV;
  int64_t* q_doc = k_grp + BKV;
  int64_t* q_grp = q_doc + BQ;
  float* Ks = reinterpret_cast<float*>(q_grp + BQ);
  float* Vs = Ks + BKV * S;
  float* Qs = Vs + BKV * S;
  float* dOs = Qs + BQ * S;
  float* Pt = dOs + BQ * S;   // [BKV][PQ]: P^T
  float* dSt = Pt + BKV * PQ;  // [BKV][PQ]: dS^T
  float* row_lse = dSt + BKV * PQ;
  float* row_delta = row_lse + BQ;
  unsigned char* k_pad = reinterpret_cast<unsigned char*>(row_delta + BQ);

  for (int i = tid; i < BKV * D; i += kThreads) {
    const int j = i / D, d = i % D;
    const bool in = j < kl && d < dim;
    Ks[j * S + d] = in ? load_as_float(a.k.data, offset4(a.k, b, hk, k0 + j) + d, a.k.dtype) : 0.f;
    Vs[j * S + d] = in ? load_as_float(a.v.data, offset4(a.v, b, hk, k0 + j) + d, a.v.dtype) : 0.f;
  }
  if (tid < BKV) {
    const TokenMeta km = tid < kl ? kv_token_meta(m, terms, mb, k0 + tid) : TokenMeta{0, -1, false};
    k_doc[tid] = km.doc;
    k_grp[tid] = km.group;
    k_pad[tid] = km.pad ? 1 : 0;
  }

  float dk[RPW][C], dv[RPW][C];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) dk[r][c] = dv[r][c] = 0.f;

  unsigned long long n_score = 0, n_mask = 0;
  const int64_t nkv = (m.kv_len + m.kv_block - 1) / m.kv_block;
  TileWalker walk(m.partial_q, m.full_q, mb, nkv, kb);
  int32_t tile;
  bool partial;
  while (walk.next(tile, partial)) {
    const int64_t q_begin = int64_t(tile) * m.q_block, q_end = min(m.q_len, q_begin + m.q_block);
    n_score += uint64_t(G) * uint64_t(kl) * uint64_t(q_end - q_begin);
    if (partial) n_mask += uint64_t(kl) * uint64_t(q_end - q_begin);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += BQ) {
      const int ql = int(min(int64_t(BQ), q_end - q0));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        __syncthreads();  // the previous (sub-tile, head)'s Q, dO, P^T, dS^T are consumed
        for (int i = tid; i < BQ * D; i += kThreads) {
          const int r = i / D, d = i % D;
          const bool in = r < ql && d < dim;
          Qs[r * S + d] = in ? load_as_float(a.q.data, offset4(a.q, b, h, q0 + r) + d, a.q.dtype) : 0.f;
          dOs[r * S + d] = in ? load_as_float(a.dout.data, offset4(a.dout, b, h, q0 + r) + d, a.dout.dtype) : 0.f;
        }
        if (tid < BQ) {
          const bool in = tid < ql;
          row_lse[tid] = in ? safe_lse(a.lse.data[offset3(a.lse, b, h, q0 + tid)]) : INFINITY;
          row_delta[tid] = in ? a.delta.data[offset3(a.delta, b, h, q0 + tid)] : 0.f;
          if (g == 0) {
            const TokenMeta qm = in ? q_token_meta(m, terms, mb, q0 + tid) : TokenMeta{0, -1, false};
            q_doc[tid] = qm.doc;
            q_grp[tid] = qm.group;
          }
        }
        __syncthreads();

        // Scores: this thread's query column `qc`, key rows kr0 + e * RSTEP.
        const int qc = tid % BQ, kr0 = tid / BQ;
        float s[E], dp[E];
#pragma unroll
        for (int e = 0; e < E; ++e) s[e] = dp[e] = 0.f;
#pragma unroll 2
        for (int d = 0; d < D; ++d) {
          const float qd = Qs[qc * S + d], od = dOs[qc * S + d];
#pragma unroll
          for (int e = 0; e < E; ++e) {
            const int kr = kr0 + e * RSTEP;
            s[e] = fmaf(Ks[kr * S + d], qd, s[e]);
            dp[e] = fmaf(Vs[kr * S + d], od, dp[e]);
          }
        }
        const bool q_in = qc < ql;
        const int64_t qg = m.q_start + q0 + qc;
        const float lse_q = row_lse[qc], delta_q = row_delta[qc];
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int kr = kr0 + e * RSTEP;
          bool ok = q_in && kr < kl;
          if (ok && partial)
            ok = element_allowed(m, terms, qg, m.kv_start + k0 + kr, q_doc[qc], q_grp[qc],
                                 TokenMeta{k_doc[kr], k_grp[kr], k_pad[kr] != 0});
          const float p = ok ? expf(s[e] * a.g.scale - lse_q) : 0.f;
          Pt[kr * PQ + qc] = p;
          dSt[kr * PQ + qc] = p * (dp[e] - delta_q);
        }
        __syncthreads();

        // dV += P^T dO, dK += dS^T Q: warp `warp` owns key rows warp * RPW + rr, lane owns columns lane + 32 c.
        for (int i = 0; i < ql; ++i) {
          float oi[C], qi[C];
#pragma unroll
          for (int c = 0; c < C; ++c) {
            oi[c] = dOs[i * S + lane + 32 * c];
            qi[c] = Qs[i * S + lane + 32 * c];
          }
#pragma unroll
          for (int rr = 0; rr < RPW; ++rr) {
            const int kr = warp * RPW + rr;
            const float p = Pt[kr * PQ + i], ds = dSt[kr * PQ + i];
#pragma unroll
            for (int c = 0; c < C; ++c) {
              dv[rr][c] = fmaf(p, oi[c], dv[rr][c]);
              dk[rr][c] = fmaf(ds, qi[c], dk[rr][c]);
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int kr = warp * RPW + rr;
    if (kr >= kl) continue;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int d = lane + 32 * c;
      if (d >= dim) continue;
      store_from_float(a.dk.data, offset4(a.dk, b, hk, k0 + kr) + d, a.dk.dtype, dk[rr][c] * a.g.scale);
      store_from_float(a.dv.data, offset4(a.dv, b, hk, k0 + kr) + d, a.dv.dtype, dv[rr][c]);
    }
  }

  if (a.work && tid == 0) {
    atomicAdd(&a.work->score_elements, n_score);
    if (hk == 0) atomicAdd(&a.work->mask_elements, n_mask);
  }
}

template <int D, bool kBf16>
__global__ void __launch_bounds__(kThreads) tc_dq_kernel(const __grid_constant__ BackwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceWarp hw;
  tc_dq_cta<D, kBf16>(a, hw, blockIdx.x, blockIdx.y, blockIdx.z, smem_raw);
}

template <int D, bool kBf16>
__global__ void __launch_bounds__(kThreads) tc_dkdv_kernel(const __grid_constant__ BackwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceWarp hw;
  tc_dkdv_cta<D, kBf16>(a, hw, blockIdx.x, blockIdx.y, blockIdx.z, smem_raw);
}

// Launches a backward: the delta kernel, then `dq` over CTAs of `q_rows` query rows per q block (grid: q sub-tile,
// query head, batch element) and `dkdv` over CTAs of `kv_rows` keys per kv block (kv sub-tile, kv head, batch).
std::string launch_backward_kernels(void (*dq)(BackwardArgs), int q_rows, int dq_smem, void (*dkdv)(BackwardArgs),
                                    int kv_rows, int dkdv_smem, const BackwardArgs& a, cudaStream_t stream,
                                    const char* dq_what, const char* dkdv_what) {
  const BlockMaskView& m = a.mask;
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block, q_subs = (m.q_block + q_rows - 1) / q_rows;
  const int64_t nkv = (m.kv_len + m.kv_block - 1) / m.kv_block, kv_subs = (m.kv_block + kv_rows - 1) / kv_rows;
  const int64_t rows = a.g.batch * a.g.q_heads * m.q_len;
  if (nq * q_subs > 0x7fffffffLL || nkv * kv_subs > 0x7fffffffLL || (rows + kWarps - 1) / kWarps > 0x7fffffffLL)
    return "block_sparse_attention: too many tiles for one grid";
  if (rows > 0) {
    delta_kernel<<<unsigned((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(a);
    if (auto e = launch_status("delta launch"); !e.empty()) return e;
  }
  if (nq > 0)
    if (auto e = launch_kernel(dq, dim3(unsigned(nq * q_subs), unsigned(a.g.q_heads), unsigned(a.g.batch)), dq_smem,
                               stream, a, dq_what);
        !e.empty())
      return e;
  if (nkv > 0)
    return launch_kernel(dkdv, dim3(unsigned(nkv * kv_subs), unsigned(a.g.kv_heads), unsigned(a.g.batch)), dkdv_smem,
                         stream, a, dkdv_what);
  return "";
}

}  // namespace
}  // namespace detail

bool uses_tensor_cores(const BackwardArgs& a) {
  return a.tensor_cores && a.q.dtype != DType::kFloat32 && a.q.dtype == a.k.dtype && a.k.dtype == a.v.dtype &&
         a.v.dtype == a.dout.dtype;
}

std::string block_sparse_attention_backward(const BackwardArgs& a, cudaStream_t stream) {
  using namespace detail;
  if (auto e = check_common(a.g, a.mask); !e.empty()) return e;
  for (const Tensor4* t : {&a.q, &a.k, &a.v, &a.out, &a.dout, &a.dq, &a.dk, &a.dv})
    if (!valid_dtype(t->dtype)) return "block_sparse_attention: unknown dtype";
  if (a.mask.q_len == 0 && a.mask.kv_len == 0) return "";
  const bool q_side = a.q.data && a.out.data && a.dout.data && a.lse.data && a.delta.data && a.dq.data;
  const bool kv_side = a.k.data && a.v.data && a.dk.data && a.dv.data;
  if ((a.mask.q_len > 0 && !q_side) || (a.mask.kv_len > 0 && !kv_side))
    return "block_sparse_attention: backward: null tensor";
  const bool tensor_cores = uses_tensor_cores(a), bf16 = a.q.dtype == DType::kBFloat16;
  return with_compiled_head_dim(a.g.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    if (!tensor_cores)
      return launch_backward_kernels(dq_kernel<D>, Tiles<D>::kQ, Tiles<D>::dq_smem(), dkdv_kernel<D>, Tiles<D>::kKV,
                                     Tiles<D>::dkdv_smem(), a, stream, "dq launch", "dkdv launch");
    using Q = TcDqTiles<D>;
    using K = TcDkdvTiles<D>;
    return launch_backward_kernels(bf16 ? tc_dq_kernel<D, true> : tc_dq_kernel<D, false>, Q::kQ, Q::smem(),
                                   bf16 ? tc_dkdv_kernel<D, true> : tc_dkdv_kernel<D, false>, K::kKV, K::smem(), a,
                                   stream, "tensor-core dq launch", "tensor-core dkdv launch");
  });
}

}  // namespace cpharness::kernels::cuda
