#include "kernels/cuda/chunk_attention_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/block_mask_view.h"
#include "kernels/cuda/block_sparse_attention.h"

namespace cpharness::kernels {
namespace {

namespace kc = cpharness::kernels::cuda;

kc::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return kc::DType::kFloat32;
    case torch::kFloat16: return kc::DType::kFloat16;
    case torch::kBFloat16: return kc::DType::kBFloat16;
    default: TORCH_CHECK(false, "CUDA chunk attention: dtype ", t.scalar_type(), " unsupported (fp32, fp16, bf16)");
  }
}

// The tensor with a contiguous last dimension (a copy only when it is not).
torch::Tensor rows_contiguous(const torch::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

kc::Tensor4 view4(const torch::Tensor& t) {
  return {t.data_ptr(), dtype_of(t), t.stride(0), t.stride(1), t.stride(2)};
}
kc::Tensor3 view3(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, "CUDA chunk attention: lse must be fp32 here");
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

bool on(const torch::Tensor& t, const torch::Device& d) { return !t.defined() || t.device() == d; }

bool mask_on(const BlockMask& m, const torch::Device& d) {
  for (const auto* t : {&m.kv_num_blocks, &m.kv_indices, &m.full_kv_num_blocks, &m.full_kv_indices, &m.q_num_blocks,
                        &m.q_indices, &m.full_q_num_blocks, &m.full_q_indices})
    if (!on(*t, d) || !t->is_contiguous() || t->scalar_type() != torch::kInt32) return false;
  for (const auto* md : {&m.q_meta, &m.kv_meta})
    for (const auto* t : {&md->document_ids, &md->padding, &md->vision_group_ids})
      if (!on(*t, d) || (t->defined() && (!t->is_contiguous() || t->size(0) != m.batch))) return false;
  return true;
}

kc::BlockList list_view(const torch::Tensor& num, const torch::Tensor& idx) {
  return {num.numel() ? num.data_ptr<int32_t>() : nullptr, idx.numel() ? idx.data_ptr<int32_t>() : nullptr,
          int32_t(idx.dim() == 3 ? idx.size(2) : 0)};
}

// The view of a mask already on the device (block_mask_to): its tensors' own pointers.
kc::BlockMaskView mask_view(const BlockMask& m) {
  auto meta = [](const torch::Tensor& t, torch::ScalarType dtype) -> const void* {
    if (!t.defined() || !t.numel()) return nullptr;
    TORCH_CHECK(t.scalar_type() == dtype || (dtype == torch::kUInt8 && t.scalar_type() == torch::kBool),
                "CUDA chunk attention: block-mask metadata of dtype ", t.scalar_type(), ", expected ", dtype);
    return t.data_ptr();
  };
  return kc::block_mask_view(m, list_view, meta);
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const BlockMask& mask) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "CUDA chunk attention: q, k, v must be on one CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "CUDA chunk attention: q, k, v must be [B, H, S, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "CUDA chunk attention: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "CUDA chunk attention: batch / head dim mismatch");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "CUDA chunk attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(2) == mask.q_range.length && k.size(2) == mask.kv_range.length,
              "CUDA chunk attention: sequence lengths differ from the block mask's ranges");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "CUDA chunk attention: q, k, v dtypes differ");
}

struct DeviceWork {
  torch::Tensor counters;  // int64 [4] on the device, laid out as kc::WorkCounters
  kc::WorkCounters* ptr() { return counters.defined() ? reinterpret_cast<kc::WorkCounters*>(counters.data_ptr()) : nullptr; }
  void add_to(AttentionWork* w) {
    if (!w) return;
    auto c = counters.cpu();
    auto a = c.accessor<int64_t, 1>();
    *w += AttentionWork{a[0], a[1], a[2], a[3]};
  }
};
DeviceWork device_work(AttentionWork* w, const torch::Device& d) {
  static_assert(sizeof(kc::WorkCounters) == 4 * sizeof(int64_t), "counter layout");
  return {w ? torch::zeros({4}, torch::TensorOptions().dtype(torch::kInt64).device(d)) : torch::Tensor()};
}

}  // namespace

BlockMask block_mask_to(const BlockMask& mask, const torch::Device& device) {
  BlockMask m = mask;
  auto lists = [&](torch::Tensor& t) { t = t.to(device, torch::kInt32).contiguous(); };
  for (auto* t : {&m.kv_num_blocks, &m.kv_indices, &m.full_kv_num_blocks, &m.full_kv_indices, &m.q_num_blocks,
                  &m.q_indices, &m.full_q_num_blocks, &m.full_q_indices})
    lists(*t);
  auto meta = [&](TokenMetadata& md) {
    auto move = [&](torch::Tensor& t, torch::ScalarType dt) {
      if (t.defined()) t = t.narrow(0, 0, m.batch).to(device, dt).contiguous();
    };
    move(md.document_ids, torch::kInt64);
    move(md.padding, torch::kBool);
    move(md.vision_group_ids, torch::kInt64);
  };
  meta(m.q_meta);
  meta(m.kv_meta);
  return m;
}

AttentionPartial chunk_attention_forward_cuda(const torch::Tensor& q_in, const torch::Tensor& k_in,
                                              const torch::Tensor& v_in, const BlockMask& mask_in, double scale,
                                              AttentionWork* work, bool tensor_cores) {
  check_inputs(q_in, k_in, v_in, mask_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto dev = q_in.device();
  const BlockMask mask = mask_on(mask_in, dev) ? mask_in : block_mask_to(mask_in, dev);
  auto q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  auto f32 = q.options().dtype(torch::kFloat32);
  auto out = torch::empty({B, Hq, Sq, D}, f32);
  auto lse = torch::empty({B, Hq, Sq}, f32);
  DeviceWork w = device_work(work, dev);
  kc::ForwardArgs a;
  a.g = {B, Hq, k.size(1), D, float(scale)};
  a.mask = mask_view(mask);
  a.q = view4(q);
  a.k = view4(k);
  a.v = view4(v);
  a.out = view4(out);
  a.lse = view3(lse);
  a.work = w.ptr();
  a.tensor_cores = tensor_cores;
  const std::string e = kc::block_sparse_attention_forward(a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(e.empty(), e);
  w.add_to(work);
  return {out, lse};
}

ChunkAttentionGrads chunk_attention_backward_cuda(const torch::Tensor& q_in, const torch::Tensor& k_in,
                                                  const torch::Tensor& v_in, const torch::Tensor& out_in,
                                                  const torch::Tensor& lse_in, const torch::Tensor& dout_in,
                                                  const BlockMask& mask_in, double scale, AttentionWork* work,
                                                  bool tensor_cores) {
  check_inputs(q_in, k_in, v_in, mask_in);
  TORCH_CHECK(out_in.sizes() == q_in.sizes() && dout_in.sizes() == q_in.sizes(),
              "CUDA chunk attention backward: out/dout shape");
  TORCH_CHECK(lse_in.sizes() == q_in.sizes().slice(0, 3), "CUDA chunk attention backward: lse must be [B, Hq, Sq]");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto dev = q_in.device();
  const BlockMask mask = mask_on(mask_in, dev) ? mask_in : block_mask_to(mask_in, dev);
  auto q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  auto out = rows_contiguous(out_in.to(dev)), dout = rows_contiguous(dout_in.to(dev));
  auto lse = lse_in.to(dev, torch::kFloat32);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Skv = k.size(2);
  auto f32 = q.options().dtype(torch::kFloat32);
  auto delta = torch::empty({B, Hq, Sq}, f32);
  auto dq = torch::empty({B, Hq, Sq, D}, f32), dk = torch::empty({B, Hkv, Skv, D}, f32),
       dv = torch::empty({B, Hkv, Skv, D}, f32);
  DeviceWork w = device_work(work, dev);
  kc::BackwardArgs a;
  a.g = {B, Hq, Hkv, D, float(scale)};
  a.mask = mask_view(mask);
  a.q = view4(q);
  a.k = view4(k);
  a.v = view4(v);
  a.out = view4(out);
  a.dout = view4(dout);
  a.lse = view3(lse);
  a.delta = view3(delta);
  a.dq = view4(dq);
  a.dk = view4(dk);
  a.dv = view4(dv);
  a.work = w.ptr();
  a.tensor_cores = tensor_cores;
  const std::string e = kc::block_sparse_attention_backward(a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(e.empty(), e);
  w.add_to(work);
  return {dq, dk, dv};
}

}  // namespace cpharness::kernels
