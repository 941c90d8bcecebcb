// Forward: one CTA per (query sub-tile of Tiles<D>::kQ rows inside one q block, query head, batch element).
// It walks its q block's partial and full kv lists in ascending order, each kv block in sub-tiles of kK keys:
// S = scale * Q K^T (the mask rule evaluated per element in partial tiles only, never in full ones), online
// softmax in fp32, O += P V. Empty tiles are never touched; rows that never see a key end with out = 0 and
// lse = -inf.
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/tensor_core_device.cuh"
#include "kernels/cuda/tensor_core_backward.cuh"
#include "kernels/cuda/tensor_core_forward.cuh"

namespace cpharness::kernels::cuda {
namespace detail {
namespace {

template <int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ ForwardArgs a) {
  using T = Tiles<D>;
  constexpr int BQ = T::kQ, BK = T::kK, S = T::kStride, PS = BK + 1, C = T::kCols;
  constexpr int RPW = BQ / kWarps;            // output rows per warp
  constexpr int E = BQ * BK / kThreads;       // scores per thread
  constexpr int RSTEP = kThreads / BK;        // row step between a thread's scores
  constexpr int GS = kThreads / BQ;           // threads per row in the softmax
  const BlockMaskView& m = a.mask;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  const int64_t subs = (m.q_block + BQ - 1) / BQ;
  const int64_t qb = blockIdx.x / subs, sub = blockIdx.x % subs;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t q0 = qb * m.q_block + sub * BQ;
  const int64_t q_block_end = min(m.q_len, (qb + 1) * int64_t(m.q_block));
  if (q0 >= q_block_end) return;  // the whole CTA: past a short last q block
  const int ql = int(min(int64_t(BQ), q_block_end - q0));
  const int64_t hk = h / (a.g.q_heads / a.g.kv_heads);
  const int64_t mb = m.batch == 1 ? 0 : b;
  const int64_t dim = a.g.head_dim;
  const MaskTerms terms = mask_terms(m);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* q_doc = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* q_grp = q_doc + BQ;
  float* Qs = reinterpret_cast<float*>(q_grp + BQ);
  float* Ks = Qs + BQ * S;
  float* Vs = Ks + BK * S;
  float* Ps = Vs + BK * S;
  float* row_m = Ps + BQ * PS;
  float* row_l = row_m + BQ;
  float* row_alpha = row_l + BQ;

  for (int i = tid; i < BQ * D; i += kThreads) {
    const int r = i / D, d = i % D;
    Qs[r * S + d] = (r < ql && d < dim) ? load_as_float(a.q.data, offset4(a.q, b, h, q0 + r) + d, a.q.dtype) : 0.f;
  }
  if (tid < BQ) {
    const TokenMeta qm = tid < ql ? q_token_meta(m, terms, mb, q0 + tid) : TokenMeta{0, -1, false};
    q_doc[tid] = qm.doc;
    q_grp[tid] = qm.group;
    row_m[tid] = -INFINITY;
    row_l[tid] = 0.f;
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
      __syncthreads();  // the previous sub-tile's K, V, P are consumed (and Q / row state are in place)
      for (int i = tid; i < BK * D; i += kThreads) {
        const int j = i / D, d = i % D;
        const bool in = j < kl && d < dim;
        Ks[j * S + d] = in ? load_as_float(a.k.data, offset4(a.k, b, hk, k0 + j) + d, a.k.dtype) : 0.f;
        Vs[j * S + d] = in ? load_as_float(a.v.data, offset4(a.v, b, hk, k0 + j) + d, a.v.dtype) : 0.f;
      }
      __syncthreads();

      // Scores: this thread's key column `col`, rows row0 + e * RSTEP.
      const int col = tid % BK, row0 = tid / BK;
      float s[E];
#pragma unroll
      for (int e = 0; e < E; ++e) s[e] = 0.f;
#pragma unroll 4
      for (int d = 0; d < D; ++d) {
        const float kd = Ks[col * S + d];
#pragma unroll
        for (int e = 0; e < E; ++e) s[e] = fmaf(Qs[(row0 + e * RSTEP) * S + d], kd, s[e]);
      }
      const bool col_in = col < kl;
      const int64_t kg = m.kv_start + k0 + col;
      const TokenMeta km = (partial && col_in) ? kv_token_meta(m, terms, mb, k0 + col) : TokenMeta{0, -1, false};
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int r = row0 + e * RSTEP;
        bool ok = col_in && r < ql;
        if (ok && partial) ok = element_allowed(m, terms, m.q_start + q0 + r, kg, q_doc[r], q_grp[r], km);
        Ps[r * PS + col] = ok ? s[e] * a.g.scale : -INFINITY;
      }
      __syncthreads();

      // Online softmax: GS consecutive threads per row.
      {
        const int r = tid / GS, g = tid % GS;
        float mx = -INFINITY;
        for (int c = g; c < BK; c += GS) mx = fmaxf(mx, Ps[r * PS + c]);
#pragma unroll
        for (int off = GS / 2; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_old = row_m[r];
        const float m_new = fmaxf(m_old, mx);
        const float shift = m_new == -INFINITY ? 0.f : m_new;  // never -inf - -inf
        float sum = 0.f;
        for (int c = g; c < BK; c += GS) {
          const float p = expf(Ps[r * PS + c] - shift);
          Ps[r * PS + c] = p;
          sum += p;
        }
#pragma unroll
        for (int off = GS / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        const float alpha = expf(m_old - shift);  // 0 while the row has seen no key
        __syncwarp();  // every thread of the row group has read row_m[r]
        if (g == 0) {
          row_m[r] = m_new;
          row_l[r] = row_l[r] * alpha + sum;
          row_alpha[r] = alpha;
        }
      }
      __syncthreads();

      // O = alpha O + P V: warp `warp` owns rows warp * RPW + rr, lane owns columns lane + 32 c.
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) {
        const float al = row_alpha[warp * RPW + rr];
#pragma unroll
        for (int c = 0; c < C; ++c) acc[rr][c] *= al;
      }
      for (int j = 0; j < kl; ++j) {
        float vj[C];
#pragma unroll
        for (int c = 0; c < C; ++c) vj[c] = Vs[j * S + lane + 32 * c];
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
          const float p = Ps[(warp * RPW + rr) * PS + j];
#pragma unroll
          for (int c = 0; c < C; ++c) acc[rr][c] = fmaf(p, vj[c], acc[rr][c]);
        }
      }
    }
  }
  __syncthreads();  // row_l / row_m final

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    if (r >= ql) continue;
    const float l = row_l[r];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int d = lane + 32 * c;
      if (d < dim) store_from_float(a.out.data, offset4(a.out, b, h, q0 + r) + d, a.out.dtype, l > 0.f ? acc[rr][c] / l : 0.f);
    }
  }
  if (tid < ql) {
    const float l = row_l[tid];
    a.lse.data[offset3(a.lse, b, h, q0 + tid)] = l > 0.f ? row_m[tid] + logf(l) : -INFINITY;
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

// Launches a forward kernel whose CTAs each cover `q_rows` query rows of one q block: one grid cell per (q sub-tile,
// query head, batch element).
std::string launch_forward_kernel(void (*kernel)(ForwardArgs), int q_rows, int smem, const ForwardArgs& a,
                                  cudaStream_t stream, const char* what) {
  const int64_t nq = (a.mask.q_len + a.mask.q_block - 1) / a.mask.q_block;
  const int64_t subs = (a.mask.q_block + q_rows - 1) / q_rows;
  if (nq * subs > 0x7fffffffLL) return "block_sparse_attention: too many q tiles for one grid";
  return launch_kernel(kernel, dim3(unsigned(nq * subs), unsigned(a.g.q_heads), unsigned(a.g.batch)), smem, stream, a,
                       what);
}

template <int D, bool kBf16>
__global__ void __launch_bounds__(kThreads) tc_forward_kernel(const __grid_constant__ ForwardArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceWarp hw;
  tc_forward_cta<D, kBf16>(a, hw, blockIdx.x, blockIdx.y, blockIdx.z, smem_raw);
}

}  // namespace
}  // namespace detail

bool uses_tensor_cores(const ForwardArgs& a) {
  return a.tensor_cores && a.q.dtype != DType::kFloat32 && a.q.dtype == a.k.dtype && a.k.dtype == a.v.dtype;
}

std::string block_sparse_attention_forward(const ForwardArgs& a, cudaStream_t stream) {
  using namespace detail;
  if (auto e = check_common(a.g, a.mask); !e.empty()) return e;
  for (const Tensor4* t : {&a.q, &a.k, &a.v, &a.out})
    if (!valid_dtype(t->dtype)) return "block_sparse_attention: unknown dtype";
  if (a.mask.q_len == 0) return "";
  if (!a.q.data || !a.out.data || !a.lse.data || (a.mask.kv_len > 0 && (!a.k.data || !a.v.data)))
    return "block_sparse_attention: forward: null tensor";
  const bool tensor_cores = uses_tensor_cores(a), bf16 = a.q.dtype == DType::kBFloat16;
  return with_compiled_head_dim(a.g.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    if (!tensor_cores)
      return launch_forward_kernel(forward_kernel<D>, Tiles<D>::kQ, Tiles<D>::forward_smem(), a, stream, "forward launch");
    return launch_forward_kernel(bf16 ? tc_forward_kernel<D, true> : tc_forward_kernel<D, false>, TcTiles<D>::kQ,
                                 TcTiles<D>::smem(), a, stream, "tensor-core forward launch");
  });
}

TileShape tile_shape(int64_t head_dim) {
  using namespace detail;
  if (compiled_head_dim(head_dim) == 0) return TileShape{};
  return with_compiled_head_dim(head_dim, [](auto d) {
    constexpr int D = decltype(d)::value;
    using T = Tiles<D>;
    return TileShape{D, kThreads, T::kQ, T::kK, T::kKV, T::kQB, T::forward_smem(), T::dq_smem(), T::dkdv_smem(),
                     TcTiles<D>::kQ, TcTiles<D>::kK, TcTiles<D>::smem(), TcDqTiles<D>::smem(), TcDkdvTiles<D>::smem(),
                     TcDkdvTiles<D>::kKV};
  });
}

}  // namespace cpharness::kernels::cuda
