// Block-sparse flash attention on CUDA: the fast path behind the contract of kernels/chunk_attention.h, with a
// raw-pointer API (no libtorch): device pointers, strides in elements, and the block mask's lists as int32
// device arrays. It knows nothing of any model. See kernels/cuda/README.md for tile sizes and what is verified.
//
// Every pointer below is a device pointer. Calls are asynchronous on `stream`; they return "" when the launch
// was accepted, else what was wrong (an argument, or the CUDA error of the launch). Results are written with
// plain stores, one writer per element, in a fixed order: two runs with the same inputs are bitwise identical.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace cpharness::kernels::cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A [B, H, S, D] tensor whose innermost dimension is contiguous; strides in elements.
struct Tensor4 {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

// A [B, H, S] fp32 tensor (log-sum-exp, or the backward's row sums); strides in elements.
struct Tensor3 {
  float* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_s = 1;
};

// One list family of a block mask: counts [rows, n] and ascending block indices [rows, n, width] (int32,
// contiguous; rows = the mask's batch). `indices` may be null when width is 0.
struct BlockList {
  const int32_t* num = nullptr;
  const int32_t* indices = nullptr;
  int32_t width = 0;
};

// The block mask (kernels/block_mask.h) and the rule partial tiles evaluate per element (kernels/dense_mask.h):
//   allowed = (k <= q [causal]
//              OR same vision group >= 0 [vision_bidirectional and both group arrays given])
//             AND q - k < window [has_window]
//             (with vision_group_past_window, as transformers 5.5 .. 5.12: (k <= q AND q - k < window) OR same group)
//             AND same document > 0 [both document arrays given]
//             AND key not padding [kv_padding given]
// with q, k global token indices (q_start + row, kv_start + column).
struct BlockMaskView {
  int64_t q_start = 0, q_len = 0;    // global q range; q_len = Sq
  int64_t kv_start = 0, kv_len = 0;  // global kv range; kv_len = Skv
  int32_t q_block = 128, kv_block = 128;
  int32_t batch = 1;  // rows of the lists and metadata: 1 (serves every batch element) or B
  BlockList partial_kv, full_kv;  // q-major: per q block, its partial / full kv blocks (forward, dQ)
  BlockList partial_q, full_q;    // kv-major transposes: per kv block, its partial / full q blocks (dK, dV)
  bool causal = true;
  bool has_window = false;
  int64_t window = 0;
  bool vision_bidirectional = false;
  bool vision_group_past_window = false;
  // Per-token metadata of exactly the q / kv range, [batch, q_len] / [batch, kv_len], contiguous; null = absent.
  const int64_t* q_document_ids = nullptr;  // 1-based, 0 = pad
  const int64_t* kv_document_ids = nullptr;
  const uint8_t* kv_padding = nullptr;      // 1 = padding (never a key); the q side's padding never matters
  const int64_t* q_vision_group_ids = nullptr;  // >= 0 vision run, -1 text
  const int64_t* kv_vision_group_ids = nullptr;
};

// Work counters, as kernels::AttentionWork: score_elements summed over batch and query heads; mask_elements,
// partial_blocks, full_blocks summed over batch (counted once per tile, not once per head, as on the CPU; the
// kernel evaluates a partial tile's mask once per query head). Added to with atomicAdd (counters only; no
// result goes through an atomic).
struct WorkCounters {
  unsigned long long score_elements = 0;
  unsigned long long mask_elements = 0;
  unsigned long long partial_blocks = 0;
  unsigned long long full_blocks = 0;
};

struct Geometry {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;  // query head h uses kv head h / (Hq / Hkv)
  float scale = 1.0f;
};

struct ForwardArgs {
  Geometry g;
  BlockMaskView mask;
  Tensor4 q, k, v;  // q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D]; any of the three dtypes, computed in fp32
  Tensor4 out;      // [B, Hq, Sq, D], any dtype (the input's, or fp32 for an LSE merge); rows with no key: 0
  Tensor3 lse;      // [B, Hq, Sq], natural log; rows with no key: -inf
  WorkCounters* work = nullptr;  // device; null: not counted
  // bf16 or fp16 q, k, v of one dtype run the tensor-core kernel (mma.sync, sm_80+; P rounded to the input dtype
  // before P V, as FlashAttention does); false, or any other dtypes: the fp32 CUDA-core kernel.
  bool tensor_cores = true;
};
// Whether block_sparse_attention_forward runs `args` on the tensor-core kernel.
bool uses_tensor_cores(const ForwardArgs& args);

struct BackwardArgs {
  Geometry g;
  BlockMaskView mask;
  Tensor4 q, k, v;
  Tensor4 out, dout;  // the merged forward output over all chunks and its upstream gradient, [B, Hq, Sq, D]
  Tensor3 lse;        // the merged LSE; -inf rows contribute exactly 0
  Tensor3 delta;      // workspace [B, Hq, Sq] fp32 (rowsum(dout * out)), written here
  Tensor4 dq;         // [B, Hq, Sq, D], this chunk's contribution
  Tensor4 dk, dv;     // [B, Hkv, Skv, D]
  WorkCounters* work = nullptr;
  // bf16 or fp16 q, k, v, dout of one dtype run the tensor-core dQ and dK/dV kernels (P and dS rounded to the input
  // dtype for their second products); false, or any other dtypes: the fp32 CUDA-core kernels.
  bool tensor_cores = true;
};
// Whether block_sparse_attention_backward runs `args` on the tensor-core kernels.
bool uses_tensor_cores(const BackwardArgs& args);

std::string block_sparse_attention_forward(const ForwardArgs& args, cudaStream_t stream);
std::string block_sparse_attention_backward(const BackwardArgs& args, cudaStream_t stream);

// The tiling one head dim runs with (host-side, for tests and reports). Head dims 1..512 are served by the
// kernel compiled for the next of 64 / 128 / 256 / 512 (zero-padded); 0 and > 512 are rejected.
struct TileShape {
  int compiled_head_dim = 0;  // 64, 128, 256 or 512; 0 when unsupported
  int threads = 0;            // per CTA
  int q_rows = 0;             // forward / dQ: query rows per CTA
  int kv_rows = 0;            // forward / dQ: keys per shared-memory sub-tile
  int dkdv_kv_rows = 0;       // dK/dV: keys per CTA
  int dkdv_q_rows = 0;        // dK/dV: query rows per shared-memory sub-tile
  int forward_smem = 0, dq_smem = 0, dkdv_smem = 0;  // dynamic shared memory, bytes
  int tc_q_rows = 0, tc_kv_rows = 0, tc_forward_smem = 0;  // the tensor-core forward (bf16 / fp16)
  int tc_dq_smem = 0, tc_dkdv_smem = 0, tc_dkdv_kv_rows = 0;  // and backward
};
TileShape tile_shape(int64_t head_dim);

}  // namespace cpharness::kernels::cuda
