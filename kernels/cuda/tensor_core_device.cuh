// The warp interface of the tensor-core CTA bodies (tensor_core_forward.cuh, tensor_core_backward.cuh) on the GPU:
// cp.async (sm_80+), ldmatrix.sync.m8n8.x4 (sm_75+), mma.sync m16n8k16 (sm_80+), __shfl_xor_sync, __syncthreads, atomic work counters.
// Device code only.
#pragma once
#include "kernels/cuda/attention_common.cuh"

namespace cpharness::kernels::cuda::detail {

struct DeviceWarp {
  __device__ int thread() const { return int(threadIdx.x); }
  __device__ void sync() { __syncthreads(); }
  __device__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
  // 16 bytes global -> shared without a register round trip (.cg: through L2 only; both addresses 16-byte aligned).
  __device__ void copy_async_16(uint16_t* shared, const uint16_t* global) {
    const unsigned address = unsigned(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global));
  }
  __device__ void copy_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
  template <bool kTrans>
  __device__ void ldmatrix_x4(uint32_t r[4], const uint16_t* row) {
    const unsigned address = unsigned(__cvta_generic_to_shared(row));
    if constexpr (kTrans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(address));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(address));
  }
  template <bool kBf16>
  __device__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    if constexpr (kBf16)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ void count_work(WorkCounters* w, unsigned long long score, unsigned long long mask, int32_t partial,
                             int32_t full) {
    atomicAdd(&w->score_elements, score);
    if (mask) atomicAdd(&w->mask_elements, mask);
    if (partial) atomicAdd(&w->partial_blocks, (unsigned long long)partial);
    if (full) atomicAdd(&w->full_blocks, (unsigned long long)full);
  }
};

}  // namespace cpharness::kernels::cuda::detail
