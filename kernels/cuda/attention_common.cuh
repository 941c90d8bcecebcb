// Shared by the forward and backward kernels: tile shapes, element loads / stores, the per-element mask rule,
// the walk over a block row's partial and full lists, argument checks.
//
// The kernels are plain tiled FMA kernels (fp32 CUDA cores, no tensor cores): shared-memory tiles of Q, K, V
// (fp32, rows padded to D + 1 floats so column walks are free of bank conflicts), per-thread accumulators in
// registers, one CTA of 128 threads per (query sub-tile, head, batch element). What would make them faster,
// in order: mma.sync / wgmma on bf16/fp16 tiles (P rounded to the input dtype, as FlashAttention does), cp.async
// / TMA double-buffering of the K/V sub-tiles, keeping K/V in the input dtype in shared memory (twice the rows
// per sub-tile), larger q tiles for head dims <= 128, and splitting the 512-wide head dim across warps.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/cuda/block_sparse_attention.h"

namespace cpharness::kernels::cuda::detail {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 512;

constexpr int cmin(int a, int b) { return a < b ? a : b; }

// Tiles for the compiled head dim D. Every per-thread accumulator set (O / dQ: BQ x D / 128; dK + dV:
// 2 x BKV x D / 128) is 32 or 64 floats, so a thread keeps it in registers at every head dim. At D = 512 a
// 128 x 128 tile would need 2 x 256 KiB of shared memory for K and V alone, so every side is cut smaller and a
// 128-wide mask block is walked in sub-tiles.
template <int D>
struct Tiles {
  static_assert(D == 64 || D == 128 || D == 256 || D == 512, "compiled head dims: 64, 128, 256, 512");
  static constexpr int kStride = D + 1;                 // shared-memory row of Q / K / V / dO, in floats
  static constexpr int kQ = cmin(64, 8192 / D);         // forward / dQ: query rows per CTA (64, 64, 32, 16)
  static constexpr int kK = kQ;                         // forward / dQ: keys per sub-tile
  static constexpr int kKV = cmin(64, 4096 / D);        // dK/dV: keys per CTA (64, 32, 16, 8)
  static constexpr int kQB = cmin(32, 8192 / D);        // dK/dV: query rows per sub-tile (32, 32, 32, 16)
  static constexpr int kCols = D / 32;                  // accumulator columns per lane (d = lane + 32 c)
  static_assert(kThreads % kK == 0 && kThreads % kQ == 0 && kThreads % kQB == 0, "thread / tile mapping");
  static_assert(kQ % kWarps == 0 && kKV % kWarps == 0, "rows per warp");

  // Dynamic shared memory, bytes: int64 metadata first (8-byte aligned), then the fp32 arrays.
  static constexpr int forward_smem() {
    return 8 * 2 * kQ + 4 * (kQ * kStride + 2 * kK * kStride + kQ * (kK + 1) + 3 * kQ);
  }
  static constexpr int dq_smem() {
    return 8 * 2 * kQ + 4 * (2 * kQ * kStride + 2 * kK * kStride + kQ * (kK + 1) + 2 * kQ);
  }
  static constexpr int dkdv_smem() {
    return 8 * (2 * kKV + 2 * kQB) + 4 * (2 * kKV * kStride + 2 * kQB * kStride + 2 * kKV * (kQB + 1) + 2 * kQB) +
           kKV;
  }
};

inline int compiled_head_dim(int64_t head_dim) {
  if (head_dim <= 0 || head_dim > kMaxHeadDim) return 0;
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : head_dim <= 256 ? 256 : 512;
}

// f(std::integral_constant<int, D>{}) with D the head dim compiled for `head_dim` (checked to be 1..512 before).
template <class F>
decltype(auto) with_compiled_head_dim(int64_t head_dim, F&& f) {
  switch (compiled_head_dim(head_dim)) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return f(std::integral_constant<int, 512>{});
  }
}

__host__ __device__ __forceinline__ float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__host__ __device__ __forceinline__ void store_from_float(void* p, int64_t i, DType t, float x) {
  switch (t) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
    default: static_cast<float*>(p)[i] = x; break;
  }
}

__host__ __device__ __forceinline__ int64_t offset4(const Tensor4& t, int64_t b, int64_t h, int64_t s) {
  return b * t.stride_b + h * t.stride_h + s * t.stride_s;
}
__host__ __device__ __forceinline__ int64_t offset3(const Tensor3& t, int64_t b, int64_t h, int64_t s) {
  return b * t.stride_b + h * t.stride_h + s * t.stride_s;
}

// Helpers below are host and device: the tensor-core kernel's CTA body also runs on the CPU under an emulation of
// the warp (tests/tensor_core_emulation_test.cu).

// exp(s - lse) must vanish for rows with no key anywhere: their lse = -inf is used as +inf.
__host__ __device__ __forceinline__ float safe_lse(float lse) { return lse == -INFINITY ? INFINITY : lse; }

// Which metadata terms of the rule are live (kernels/dense_mask.cpp: each term needs its arrays on both sides).
struct MaskTerms {
  bool documents, vision, padding;
};
__host__ __device__ inline MaskTerms mask_terms(const BlockMaskView& m) {
  return {m.q_document_ids != nullptr && m.kv_document_ids != nullptr,
          m.vision_bidirectional && m.q_vision_group_ids != nullptr && m.kv_vision_group_ids != nullptr,
          m.kv_padding != nullptr};
}

// Metadata of one token (absent terms hold neutral values and are not read).
struct TokenMeta {
  int64_t doc, group;
  bool pad;
};

__host__ __device__ __forceinline__ TokenMeta q_token_meta(const BlockMaskView& m, const MaskTerms& t, int64_t mb, int64_t i) {
  return {t.documents ? m.q_document_ids[mb * m.q_len + i] : 0, t.vision ? m.q_vision_group_ids[mb * m.q_len + i] : -1,
          false};
}
__host__ __device__ __forceinline__ TokenMeta kv_token_meta(const BlockMaskView& m, const MaskTerms& t, int64_t mb, int64_t j) {
  return {t.documents ? m.kv_document_ids[mb * m.kv_len + j] : 0,
          t.vision ? m.kv_vision_group_ids[mb * m.kv_len + j] : -1, t.padding ? m.kv_padding[mb * m.kv_len + j] != 0 : false};
}

// The rule of kernels/dense_mask.cpp for one element, q / k global token indices.
__host__ __device__ __forceinline__ bool element_allowed(const BlockMaskView& m, const MaskTerms& t, int64_t q, int64_t k,
                                                int64_t q_doc, int64_t q_group, const TokenMeta& kv) {
  const bool order = !m.causal || k <= q, window = !m.has_window || k > q - m.window;
  const bool group = t.vision && q_group == kv.group && q_group >= 0;
  // A group relaxes causality inside the window; under the 5.5 .. 5.12 rule it relaxes the window as well.
  bool a = m.vision_group_past_window ? (order && window) || group : (order || group) && window;
  if (t.documents) a = a && q_doc == kv.doc && q_doc > 0;
  if (t.padding) a = a && !kv.pad;
  return a;
}

// Walks one block row's partial and full lists merged in ascending block order (as the CPU chunk attention
// does), so the accumulation order is fixed. Every thread of a CTA runs it with the same values.
struct TileWalker {
  const int32_t* partial;
  const int32_t* full;
  int32_t num_partial, num_full, a = 0, c = 0;

  __host__ __device__ TileWalker(const BlockList& p, const BlockList& f, int64_t mb, int64_t rows_per_batch, int64_t row) {
    const int64_t r = mb * rows_per_batch + row;
    num_partial = p.num[r];
    num_full = f.num[r];
    partial = p.indices ? p.indices + r * p.width : nullptr;
    full = f.indices ? f.indices + r * f.width : nullptr;
  }
  __host__ __device__ bool next(int32_t& tile, bool& is_partial) {
    if (a >= num_partial && c >= num_full) return false;
    is_partial = c >= num_full || (a < num_partial && partial[a] < full[c]);
    tile = is_partial ? partial[a++] : full[c++];
    return true;
  }
};

// Host-side argument checks shared by forward and backward; "" when fine.
inline std::string check_common(const Geometry& g, const BlockMaskView& m) {
  if (g.head_dim <= 0 || g.head_dim > kMaxHeadDim)
    return "block_sparse_attention: head_dim " + std::to_string(g.head_dim) + " unsupported (1..512)";
  if (g.batch <= 0 || g.q_heads <= 0 || g.kv_heads <= 0) return "block_sparse_attention: batch and heads must be > 0";
  if (g.q_heads % g.kv_heads != 0) return "block_sparse_attention: Hq must be a multiple of Hkv";
  if (g.q_heads > 65535 || g.kv_heads > 65535 || g.batch > 65535)
    return "block_sparse_attention: batch and heads must be <= 65535 (grid y / z)";
  if (m.batch != 1 && m.batch != g.batch) return "block_sparse_attention: mask batch must be 1 or B";
  if (m.q_block <= 0 || m.kv_block <= 0) return "block_sparse_attention: block sizes must be > 0";
  if (m.q_len < 0 || m.kv_len < 0) return "block_sparse_attention: negative range length";
  const MaskTerms t = mask_terms(m);
  if (m.batch == 1 && g.batch > 1 && (t.documents || t.vision || t.padding))
    return "block_sparse_attention: a mask with metadata must have one row per batch element";
  const int64_t nq = (m.q_len + m.q_block - 1) / m.q_block, nkv = (m.kv_len + m.kv_block - 1) / m.kv_block;
  if (nq > 0 && (!m.partial_kv.num || !m.full_kv.num)) return "block_sparse_attention: q-major lists missing";
  if (nkv > 0 && (!m.partial_q.num || !m.full_q.num)) return "block_sparse_attention: kv-major lists missing";
  for (const BlockList* l : {&m.partial_kv, &m.full_kv, &m.partial_q, &m.full_q})
    if (l->width > 0 && !l->indices) return "block_sparse_attention: list indices missing";
  return "";
}

inline bool valid_dtype(DType t) { return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16; }

inline std::string launch_status(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return "";
  return std::string("block_sparse_attention: ") + what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

// Allows `bytes` of dynamic shared memory for `kernel` (needed above 48 KiB).
template <class K>
std::string allow_smem(K kernel, int bytes) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) return "";
  cudaGetLastError();  // clear
  return std::string("block_sparse_attention: cudaFuncSetAttribute: ") + cudaGetErrorName(e) + ": " +
         cudaGetErrorString(e);
}

// Launches `kernel` on `grid` (kThreads per CTA) with `smem` bytes of dynamic shared memory, allowed first; "" or what
// failed, named `what`.
template <class Args>
std::string launch_kernel(void (*kernel)(Args), dim3 grid, int smem, cudaStream_t stream, const Args& a,
                          const char* what) {
  if (auto e = allow_smem(kernel, smem); !e.empty()) return e;
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return launch_status(what);
}

}  // namespace cpharness::kernels::cuda::detail
