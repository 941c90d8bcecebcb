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

// exp(s - lse) must vanish for rows with no key anywhere: their lse = -inf is used as +inf.
__device__ __forceinline__ float safe_lse(float lse) { return lse == -INFINITY ? INFINITY : lse; }

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

// Checks the grids of a backward whose dQ CTAs cover `q_rows` query rows and dK/dV CTAs `kv_rows` keys, then
// launches the delta kernel (shared by both backwards).
std::string launch_delta(const BackwardArgs& a, int q_rows, int kv_rows, cudaStream_t stream) {
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
  return "";
}

template <int D>
std::string launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  using T = Tiles<D>;
  const BlockMaskView& m = a.mask;
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block, q_subs = (m.q_block + T::kQ - 1) / T::kQ;
  const int64_t nkv = (m.kv_len + m.kv_block - 1) / m.kv_block, kv_subs = (m.kv_block + T::kKV - 1) / T::kKV;
  if (auto e = launch_delta(a, T::kQ, T::kKV, stream); !e.empty()) return e;
  if (nq > 0) {
    if (auto e = allow_smem(dq_kernel<D>, T::dq_smem()); !e.empty()) return e;
    dq_kernel<D><<<dim3(unsigned(nq * q_subs), unsigned(a.g.q_heads), unsigned(a.g.batch)), kThreads, T::dq_smem(),
                   stream>>>(a);
    if (auto e = launch_status("dq launch"); !e.empty()) return e;
  }
  if (nkv > 0) {
    if (auto e = allow_smem(dkdv_kernel<D>, T::dkdv_smem()); !e.empty()) return e;
    dkdv_kernel<D><<<dim3(unsigned(nkv * kv_subs), unsigned(a.g.kv_heads), unsigned(a.g.batch)), kThreads,
                     T::dkdv_smem(), stream>>>(a);
    if (auto e = launch_status("dkdv launch"); !e.empty()) return e;
  }
  return "";
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

template <int D, bool kBf16>
std::string launch_backward_tc(const BackwardArgs& a, cudaStream_t stream) {
  using Q = TcDqTiles<D>;
  using K = TcDkdvTiles<D>;
  const BlockMaskView& m = a.mask;
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block, q_subs = (m.q_block + Q::kQ - 1) / Q::kQ;
  const int64_t nkv = (m.kv_len + m.kv_block - 1) / m.kv_block, kv_subs = (m.kv_block + K::kKV - 1) / K::kKV;
  if (auto e = launch_delta(a, Q::kQ, K::kKV, stream); !e.empty()) return e;
  if (nq > 0) {
    if (auto e = allow_smem(tc_dq_kernel<D, kBf16>, Q::smem()); !e.empty()) return e;
    tc_dq_kernel<D, kBf16><<<dim3(unsigned(nq * q_subs), unsigned(a.g.q_heads), unsigned(a.g.batch)), kThreads,
                             Q::smem(), stream>>>(a);
    if (auto e = launch_status("tensor-core dq launch"); !e.empty()) return e;
  }
  if (nkv > 0) {
    if (auto e = allow_smem(tc_dkdv_kernel<D, kBf16>, K::smem()); !e.empty()) return e;
    tc_dkdv_kernel<D, kBf16><<<dim3(unsigned(nkv * kv_subs), unsigned(a.g.kv_heads), unsigned(a.g.batch)), kThreads,
                               K::smem(), stream>>>(a);
    if (auto e = launch_status("tensor-core dkdv launch"); !e.empty()) return e;
  }
  return "";
}

template <bool kBf16>
std::string dispatch_backward_tc(const BackwardArgs& a, cudaStream_t stream) {
  switch (compiled_head_dim(a.g.head_dim)) {
    case 64: return launch_backward_tc<64, kBf16>(a, stream);
    case 128: return launch_backward_tc<128, kBf16>(a, stream);
    case 256: return launch_backward_tc<256, kBf16>(a, stream);
    default: return launch_backward_tc<512, kBf16>(a, stream);
  }
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
  if (uses_tensor_cores(a))
    return a.q.dtype == DType::kBFloat16 ? dispatch_backward_tc<true>(a, stream) : dispatch_backward_tc<false>(a, stream);
  switch (compiled_head_dim(a.g.head_dim)) {
    case 64: return launch_backward<64>(a, stream);
    case 128: return launch_backward<128>(a, stream);
    case 256: return launch_backward<256>(a, stream);
    default: return launch_backward<512>(a, stream);
  }
}

}  // namespace cpharness::kernels::cuda
