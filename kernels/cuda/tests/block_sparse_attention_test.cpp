// The CUDA block-sparse attention against the CPU chunk attention (kernels/chunk_attention.h), through the raw
// API with cudart (cudaMalloc / cudaMemcpy) and the CPU references on the host.
//   CudaAttentionHost.*  need no GPU (tile shapes, argument checks).
//   CudaAttentionGpu.*   need a CUDA device; without one every test is a GTEST_SKIP naming the reason.
// Tolerances: fp32 inputs: ||gpu - oracle|| <= 1e-5 ||oracle|| + 2 ||cpu_fp32 - oracle|| + f sqrt(n), the
// oracle being the CPU chunk attention in fp64 on the same fp32 inputs (the second term only matters where the
// CPU fp32 kernel itself misses 1e-5, the third where the oracle is ~0, e.g. dq when every row sees one key;
// f = 1e-7 for out, max(1e-7, 2^-24 sqrt(head_dim)) for the gradients).
// bf16 / fp16 inputs: oracle-relative: ||gpu - oracle|| <= 2 ||math - oracle|| + 1e-4 ||oracle|| + 1e-6 sqrt(n),
// with `math` a plain attention computed in bf16 / fp16 on the same rounded inputs. 16-bit inputs are checked on
// both kernel families: tensor cores (the default) and the fp32 CUDA-core kernels (tensor_cores = false).
// CPHARNESS_CUDA_TEST_DRY_RUN=1 on a machine without a GPU runs every GPU test with the CPU chunk attention
// standing in for the device (checks the references, tolerances and bookkeeping of this file); those tests
// still end as skipped, since the kernel did not run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <thread>

#include "kernels/block_mask_builder.h"
#include "kernels/chunk_attention.h"
#include "kernels/cuda/host_staging.h"
#include "kernels/dense_mask.h"
#include "kernels/lse_merge.h"
#include "kernels/tests/test_support.h"

namespace cpharness::kernels::cuda {
namespace {

using kernels::testing::MaskConfig;
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------------------
// Host tests (no GPU).

TEST(CudaAttentionHost, EveryHeadDimUpTo512HasATilingThatFitsSm80SharedMemory) {
  constexpr int kSm80MaxDynamicSmem = 166912;  // 163 KiB opt-in per block (sm_90: 227 KiB)
  for (int64_t d = 1; d <= 512; ++d) {
    const TileShape t = tile_shape(d);
    ASSERT_GE(t.compiled_head_dim, d);
    ASSERT_EQ(t.threads, 128);
    EXPECT_LE(t.forward_smem, kSm80MaxDynamicSmem) << d;
    EXPECT_LE(t.dq_smem, kSm80MaxDynamicSmem) << d;
    EXPECT_LE(t.dkdv_smem, kSm80MaxDynamicSmem) << d;
    EXPECT_LE(t.tc_forward_smem, kSm80MaxDynamicSmem) << d;
    EXPECT_LE(t.tc_dq_smem, kSm80MaxDynamicSmem) << d;
    EXPECT_LE(t.tc_dkdv_smem, kSm80MaxDynamicSmem) << d;
  }
  EXPECT_EQ(tile_shape(512).tc_q_rows, 32);  // two warps share a row group at head_dim 512
  EXPECT_EQ(tile_shape(256).tc_q_rows, 64);
  EXPECT_EQ(tile_shape(0).compiled_head_dim, 0);
  EXPECT_EQ(tile_shape(513).compiled_head_dim, 0);
  EXPECT_EQ(tile_shape(512).q_rows, 16);
  EXPECT_EQ(tile_shape(256).q_rows, 32);
  EXPECT_EQ(tile_shape(128).q_rows, 64);
  EXPECT_EQ(tile_shape(64).dkdv_kv_rows, 64);
}

TEST(CudaAttentionHost, SixteenBitInputsOfOneDtypeTakeTheTensorCores) {
  ForwardArgs f;
  BackwardArgs b;
  EXPECT_FALSE(uses_tensor_cores(f));  // fp32
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    f.q.dtype = f.k.dtype = f.v.dtype = t;
    b.q.dtype = b.k.dtype = b.v.dtype = b.dout.dtype = t;
    EXPECT_TRUE(uses_tensor_cores(f));
    EXPECT_TRUE(uses_tensor_cores(b));
    f.tensor_cores = b.tensor_cores = false;  // asked for the fp32 kernels
    EXPECT_FALSE(uses_tensor_cores(f));
    EXPECT_FALSE(uses_tensor_cores(b));
    f.tensor_cores = b.tensor_cores = true;
    f.v.dtype = b.dout.dtype = DType::kFloat32;  // mixed dtypes: the fp32 kernels
    EXPECT_FALSE(uses_tensor_cores(f));
    EXPECT_FALSE(uses_tensor_cores(b));
  }
}

TEST(CudaAttentionHost, BadArgumentsAreRejectedBeforeAnyLaunch) {
  int32_t zero = 0;
  ForwardArgs a;
  a.g = {1, 8, 2, 256, 1.0f};
  a.mask.q_len = a.mask.kv_len = 4;
  a.mask.partial_kv.num = a.mask.full_kv.num = a.mask.partial_q.num = a.mask.full_q.num = &zero;
  auto with = [&](auto edit) {
    ForwardArgs b = a;
    edit(b);
    return block_sparse_attention_forward(b, nullptr);
  };
  EXPECT_NE(with([](ForwardArgs& b) { b.g.head_dim = 513; }).find("head_dim"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs& b) { b.g.head_dim = 0; }).find("head_dim"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs& b) { b.g.kv_heads = 3; }).find("multiple"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs& b) { b.mask.batch = 2; b.g.batch = 3; }).find("mask batch"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs& b) { b.mask.q_block = 0; }).find("block sizes"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs& b) { b.mask.full_kv.num = nullptr; }).find("lists missing"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs& b) { b.mask.partial_kv.width = 3; }).find("indices missing"), std::string::npos);
  EXPECT_NE(with([](ForwardArgs&) {}).find("null tensor"), std::string::npos);  // checks pass up to the tensors
  BackwardArgs g;
  g.g = a.g;
  g.g.head_dim = 600;
  EXPECT_NE(block_sparse_attention_backward(g, nullptr).find("head_dim"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------------------
// GPU tests.

bool dry_run_requested() {
  const char* e = std::getenv("CPHARNESS_CUDA_TEST_DRY_RUN");
  return e && std::string(e) == "1";
}

bool g_dry_run = false;  // this GPU test runs with the CPU chunk attention standing in for the device

class CudaAttentionGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    g_dry_run = false;
    if (cuda_device_count(&why) == 0) {
      if (!dry_run_requested()) GTEST_SKIP() << "no CUDA device (" << why << ")";
      g_dry_run = true;
    }
    // The CPU references dominate the time of these tests; a GPU machine has cores to spare.
    torch::set_num_threads(int(std::max(1u, std::min(8u, std::thread::hardware_concurrency() / 2))));
  }
  void TearDown() override { torch::set_num_threads(1); }
};

// Ends a GPU test: in a dry run the kernel did not run, so the test is reported skipped (or failed, if a check
// of this file failed).
#define END_GPU_TEST() \
  if (g_dry_run) GTEST_SKIP() << "dry run: the CPU chunk attention stood in for the CUDA kernel"

struct Heads {
  int64_t hq, hkv, d;
};

struct Inputs {
  torch::Tensor q, k, v, dout;  // fp32 masters
};

Inputs random_inputs(const MaskConfig& c, Heads h, uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({c.batch, h.hq, c.q_range.length, h.d}), torch::randn({c.batch, h.hkv, c.kv_range.length, h.d}),
          torch::randn({c.batch, h.hkv, c.kv_range.length, h.d}), torch::randn({c.batch, h.hq, c.q_range.length, h.d})};
}

BlockMask mask_of(const MaskConfig& c, TokenRange kv_range) {
  return build_block_mask(c.meta.slice(c.q_range.start, c.q_range.length), c.meta.slice(kv_range.start, kv_range.length),
                          c.q_range, kv_range, c.geometry, c.batch, c.q_block, c.kv_block);
}

torch::Tensor allowed_of(const MaskConfig& c, TokenRange kv_range) {
  return dense_mask(c.meta.slice(c.q_range.start, c.q_range.length), c.meta.slice(kv_range.start, kv_range.length),
                    c.q_range, kv_range, c.geometry, c.batch);
}

struct Result {
  torch::Tensor out, lse, dq, dk, dv;  // CPU tensors
  AttentionWork fwd_work, bwd_work;
};

AttentionWork to_work(const WorkCounters& w) {
  return {int64_t(w.score_elements), int64_t(w.mask_elements), int64_t(w.partial_blocks), int64_t(w.full_blocks)};
}

struct RunOptions {
  torch::ScalarType out_dtype = torch::kFloat32;   // dtype the forward writes out in
  torch::ScalarType grad_dtype = torch::kFloat32;  // dtype of dq, dk, dv
  bool backward = true;
  torch::Tensor merged_out, merged_lse;  // for the backward; undefined: this run's own out / lse
  bool strided_q = false;                // q stored as [B, S, H, D] in memory
  bool tensor_cores = true;              // bf16 / fp16 inputs: the tensor-core kernels (false: the fp32 ones)
};

// One forward (+ backward) on the device. q, k, v, dout are CPU tensors in the input dtype.
Result run_device(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& dout,
                  const BlockMask& mask, double scale, const RunOptions& o) {
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Skv = k.size(2);
  Result r;
  if (g_dry_run) {
    auto f = chunk_attention_forward(q, k, v, mask, scale, &r.fwd_work);
    r.out = f.out.to(o.out_dtype);
    r.lse = f.lse;
    if (o.backward) {
      auto out = o.merged_out.defined() ? o.merged_out : r.out, lse = o.merged_lse.defined() ? o.merged_lse : r.lse;
      auto g = chunk_attention_backward(q, k, v, out.to(torch::kFloat32), lse, dout, mask, scale, &r.bwd_work);
      r.dq = g.dq.to(o.grad_dtype);
      r.dk = g.dk.to(o.grad_dtype);
      r.dv = g.dv.to(o.grad_dtype);
    }
    return r;
  }
  const DType in = dtype_of(q.scalar_type());
  auto dm = upload_block_mask(mask);
  DeviceBuffer qb = upload(o.strided_q ? q.transpose(1, 2).contiguous() : q), kb = upload(k), vb = upload(v);
  const int64_t out_el = torch::elementSize(o.out_dtype), grad_el = torch::elementSize(o.grad_dtype);
  DeviceBuffer ob(size_t(B * Hq * Sq * D * out_el)), lb(size_t(B * Hq * Sq * 4));
  DeviceBuffer work(2 * sizeof(WorkCounters));
  check_cuda(cudaMemset(work.get(), 0, work.bytes()), "cudaMemset");
  auto* counters = static_cast<WorkCounters*>(work.get());

  ForwardArgs fa;
  fa.g = {B, Hq, Hkv, D, float(scale)};
  fa.mask = dm.view;
  fa.q = contiguous4(qb, in, Hq, Sq, D);
  if (o.strided_q) fa.q = {qb.get(), in, Sq * Hq * D, D, Hq * D};
  fa.k = contiguous4(kb, in, Hkv, Skv, D);
  fa.v = contiguous4(vb, in, Hkv, Skv, D);
  fa.out = contiguous4(ob, dtype_of(o.out_dtype), Hq, Sq, D);
  fa.lse = contiguous3(lb, Hq, Sq);
  fa.work = counters;
  fa.tensor_cores = o.tensor_cores;
  const std::string fe = block_sparse_attention_forward(fa, nullptr);
  if (!fe.empty()) throw std::runtime_error(fe);
  check_cuda(cudaDeviceSynchronize(), "forward");
  r.out = download(ob, {B, Hq, Sq, D}, o.out_dtype);
  r.lse = download(lb, {B, Hq, Sq}, torch::kFloat32);
  if (o.backward) {
    DeviceBuffer mob, mlb;
    BackwardArgs ba;
    ba.g = fa.g;
    ba.mask = dm.view;
    ba.tensor_cores = o.tensor_cores;
    ba.q = fa.q;
    ba.k = fa.k;
    ba.v = fa.v;
    ba.out = fa.out;
    ba.lse = fa.lse;
    if (o.merged_out.defined()) {
      mob = upload(o.merged_out);
      mlb = upload(o.merged_lse.to(torch::kFloat32));
      ba.out = contiguous4(mob, dtype_of(o.merged_out.scalar_type()), Hq, Sq, D);
      ba.lse = contiguous3(mlb, Hq, Sq);
    }
    DeviceBuffer gb = upload(dout), db(size_t(B * Hq * Sq * 4));
    DeviceBuffer dqb(size_t(B * Hq * Sq * D * grad_el)), dkb(size_t(B * Hkv * Skv * D * grad_el)),
        dvb(size_t(B * Hkv * Skv * D * grad_el));
    ba.dout = contiguous4(gb, dtype_of(dout.scalar_type()), Hq, Sq, D);
    ba.delta = contiguous3(db, Hq, Sq);
    ba.dq = contiguous4(dqb, dtype_of(o.grad_dtype), Hq, Sq, D);
    ba.dk = contiguous4(dkb, dtype_of(o.grad_dtype), Hkv, Skv, D);
    ba.dv = contiguous4(dvb, dtype_of(o.grad_dtype), Hkv, Skv, D);
    ba.work = counters + 1;
    const std::string be = block_sparse_attention_backward(ba, nullptr);
    if (!be.empty()) throw std::runtime_error(be);
    check_cuda(cudaDeviceSynchronize(), "backward");
    r.dq = download(dqb, {B, Hq, Sq, D}, o.grad_dtype);
    r.dk = download(dkb, {B, Hkv, Skv, D}, o.grad_dtype);
    r.dv = download(dvb, {B, Hkv, Skv, D}, o.grad_dtype);
  }
  WorkCounters host[2];
  check_cuda(cudaMemcpy(host, work.get(), sizeof(host), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  r.fwd_work = to_work(host[0]);
  r.bwd_work = to_work(host[1]);
  return r;
}

// Dense masked attention with autograd, every op in `q`'s dtype (bf16 / fp16): the low-precision peer.
Result math_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& allowed, double scale, const torch::Tensor& dout) {
  auto qd = q.detach().requires_grad_(true), kd = k.detach().requires_grad_(true), vd = v.detach().requires_grad_(true);
  const int64_t G = q.size(1) / k.size(1);
  auto kk = kd.repeat_interleave(G, 1), vv = vd.repeat_interleave(G, 1);
  auto m = allowed.unsqueeze(1);
  auto s = (torch::matmul(qd, kk.transpose(2, 3)) * scale).masked_fill(m.logical_not(), -kInf);
  auto lse = torch::logsumexp(s, -1);
  auto empty = m.any(-1, true).logical_not();
  auto p = torch::softmax(s.masked_fill(empty, 0.0), -1) * empty.logical_not();
  auto out = torch::matmul(p, vv);
  out.backward(dout);
  return {out.detach(), lse.detach(), qd.grad(), kd.grad(), vd.grad(), {}, {}};
}

double l2(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).norm().item<double>();
}

// ||gpu - oracle|| <= rel ||oracle|| + k ||peer - oracle|| + floor sqrt(n).
void expect_oracle_close(const std::string& what, const char* name, const torch::Tensor& gpu,
                         const torch::Tensor& oracle, const torch::Tensor& peer, double rel, double k, double floor) {
  ASSERT_EQ(gpu.sizes(), oracle.sizes()) << what << " " << name;
  ASSERT_TRUE(torch::isfinite(gpu).all().item<bool>()) << what << " " << name << ": NaN or inf";
  const double err = l2(gpu, oracle), peer_err = l2(peer, oracle);
  const double allowed = rel * oracle.to(torch::kFloat64).norm().item<double>() + k * peer_err +
                         floor * std::sqrt(double(std::max<int64_t>(1, gpu.numel())));
  EXPECT_LE(err, allowed) << what << " " << name << ": error " << err << " vs oracle (peer " << peer_err << ")";
}

// LSE: -inf exactly where the oracle has it; finite values within rel * max(1, |lse|) + k * the peer's error.
void expect_lse_close(const std::string& what, const torch::Tensor& gpu, const torch::Tensor& oracle,
                      const torch::Tensor& peer, double rel, double k) {
  ASSERT_FALSE(torch::isnan(gpu).any().item<bool>()) << what << ": NaN in the LSE";
  auto inf_g = torch::isneginf(gpu), inf_o = torch::isneginf(oracle);
  ASSERT_TRUE(torch::equal(inf_g, inf_o)) << what << ": -inf pattern of the LSE differs";
  ASSERT_FALSE(torch::isposinf(gpu).any().item<bool>()) << what;
  auto fin = inf_o.logical_not();
  if (!fin.any().item<bool>()) return;
  auto g = gpu.masked_select(fin).to(torch::kFloat64), o = oracle.masked_select(fin).to(torch::kFloat64);
  auto p = peer.masked_select(fin).to(torch::kFloat64);
  const double err = (g - o).abs().max().item<double>(), peer_err = (p - o).abs().max().item<double>();
  const double allowed = rel * std::max(1.0, o.abs().max().item<double>()) + k * peer_err + 1e-6;
  EXPECT_LE(err, allowed) << what << ": LSE error " << err << " (peer " << peer_err << ")";
}

void expect_work_equal(const std::string& what, const AttentionWork& gpu, const AttentionWork& cpu, const char* pass) {
  EXPECT_EQ(gpu.score_elements, cpu.score_elements) << what << " " << pass << " score elements";
  EXPECT_EQ(gpu.mask_elements, cpu.mask_elements) << what << " " << pass << " mask elements";
  EXPECT_EQ(gpu.partial_blocks, cpu.partial_blocks) << what << " " << pass << " partial blocks";
  EXPECT_EQ(gpu.full_blocks, cpu.full_blocks) << what << " " << pass << " full blocks";
}

std::string dtype_name(torch::ScalarType t) { return c10::toString(t); }

// The reference side of one problem, computed once and shared by the dtypes.
struct Oracle {
  Result fp64;   // CPU chunk attention in fp64 on the fp32 masters
  Result fp32;   // CPU chunk attention in fp32
  torch::Tensor allowed;
};

Oracle make_oracle(const Inputs& in, const BlockMask& mask, const torch::Tensor& allowed, double scale) {
  Oracle o;
  o.allowed = allowed;
  auto d = [](const torch::Tensor& t) { return t.to(torch::kFloat64); };
  auto f = chunk_attention_forward(d(in.q), d(in.k), d(in.v), mask, scale, &o.fp64.fwd_work);
  auto g = chunk_attention_backward(d(in.q), d(in.k), d(in.v), f.out, f.lse, d(in.dout), mask, scale, &o.fp64.bwd_work);
  o.fp64.out = f.out;
  o.fp64.lse = f.lse;
  o.fp64.dq = g.dq;
  o.fp64.dk = g.dk;
  o.fp64.dv = g.dv;
  auto f32 = chunk_attention_forward(in.q, in.k, in.v, mask, scale);
  auto g32 = chunk_attention_backward(in.q, in.k, in.v, f32.out, f32.lse, in.dout, mask, scale);
  o.fp32 = {f32.out, f32.lse, g32.dq, g32.dk, g32.dv, {}, {}};
  return o;
}

// Runs the device on `dtype` inputs (rounded from the masters) and checks out, LSE, dQ, dK, dV, empty rows,
// unseen keys and work counters against the oracle.
void check_dtype(const std::string& what0, const Inputs& in, const BlockMask& mask, const Oracle& o, double scale,
                 torch::ScalarType dtype, bool tensor_cores = true) {
  const std::string what = what0 + " " + dtype_name(dtype) + (tensor_cores ? "" : " (fp32 kernel)");
  auto q = in.q.to(dtype), k = in.k.to(dtype), v = in.v.to(dtype), dout = in.dout.to(dtype);
  RunOptions opt;
  opt.tensor_cores = tensor_cores;
  opt.out_dtype = opt.grad_dtype = dtype;  // low precision: out and grads in the input dtype, as a framework uses them
  const Result gpu = run_device(q, k, v, dout, mask, scale, opt);
  Result peer;
  double rel, kk, floor;
  if (dtype == torch::kFloat32) {
    peer = o.fp32;
    rel = 1e-5;
    kk = 2;
    floor = 1e-7;
  } else {
    peer = math_attention(q, k, v, o.allowed, scale, dout);
    rel = 1e-4;
    kk = 2;
    floor = 1e-6;
  }
  expect_oracle_close(what, "out", gpu.out, o.fp64.out, peer.out, rel, kk, floor);
  expect_lse_close(what, gpu.lse, o.fp64.lse, peer.lse, dtype == torch::kFloat32 ? 1e-5 : 1e-4, kk);
  // Gradients where the oracle is ~0 (a row that sees one key: dS = P (dP - delta) cancels exactly) are the rounding
  // noise of two fp32 dot products over head_dim terms summed in different orders (the kernel's dP, the delta
  // kernel's warp reduction), which grows as sqrt(D) units in the last place: measured on an H200, 1.8e-5 over
  // 2048 elements at D = 512 (one of 320 random configurations), 5x the CPU kernel's, above a fixed 1e-7 floor.
  const double grad_floor =
      dtype == torch::kFloat32 ? std::max(floor, std::ldexp(1.0, -24) * std::sqrt(double(in.q.size(3)))) : floor;
  expect_oracle_close(what, "dq", gpu.dq, o.fp64.dq, peer.dq, rel, kk, grad_floor);
  expect_oracle_close(what, "dk", gpu.dk, o.fp64.dk, peer.dk, rel, kk, grad_floor);
  expect_oracle_close(what, "dv", gpu.dv, o.fp64.dv, peer.dv, rel, kk, grad_floor);
  // Empty rows: exact zeros in out and dq, -inf LSE; keys nobody sees: exact zero dk, dv.
  const int64_t B = in.q.size(0), Sq = in.q.size(2), Skv = in.k.size(2);
  auto empty = o.allowed.any(-1).logical_not().expand({B, Sq});
  auto empty4 = empty.unsqueeze(1).unsqueeze(-1).expand_as(gpu.out);
  EXPECT_TRUE(gpu.out.masked_select(empty4).eq(0).all().item<bool>()) << what << ": empty rows of out";
  EXPECT_TRUE(gpu.dq.masked_select(empty4).eq(0).all().item<bool>()) << what << ": empty rows of dq";
  EXPECT_TRUE(torch::isneginf(gpu.lse.masked_select(empty.unsqueeze(1).expand_as(gpu.lse))).all().item<bool>()) << what;
  auto unseen = o.allowed.any(1).logical_not().expand({B, Skv});
  auto unseen4 = unseen.unsqueeze(1).unsqueeze(-1).expand_as(gpu.dk);
  EXPECT_TRUE(gpu.dk.masked_select(unseen4).eq(0).all().item<bool>()) << what << ": unseen keys of dk";
  EXPECT_TRUE(gpu.dv.masked_select(unseen4).eq(0).all().item<bool>()) << what << ": unseen keys of dv";
  expect_work_equal(what, gpu.fwd_work, o.fp64.fwd_work, "forward");
  expect_work_equal(what, gpu.bwd_work, o.fp64.bwd_work, "backward");
}

void check_problem(const std::string& what, const MaskConfig& c, Heads h, uint64_t seed,
                   const std::vector<torch::ScalarType>& dtypes) {
  const double scale = 1.0 / std::sqrt(double(h.d));
  auto in = random_inputs(c, h, seed);
  auto mask = mask_of(c, c.kv_range);
  const Oracle o = make_oracle(in, mask, allowed_of(c, c.kv_range), scale);
  for (auto dt : dtypes) {
    check_dtype(what, in, mask, o, scale, dt);
    // 16-bit inputs run the tensor-core kernels by default; the fp32 kernels serve them too (tensor_cores = false).
    if (dt != torch::kFloat32) check_dtype(what, in, mask, o, scale, dt, false);
    if (::testing::Test::HasFailure()) return;
  }
}

std::string describe(uint64_t seed, const MaskConfig& c, Heads h) {
  return "seed " + std::to_string(seed) + " " + c.describe() + " heads " + std::to_string(h.hq) + ":" +
         std::to_string(h.hkv) + " D=" + std::to_string(h.d);
}

// The mask kinds by name, on a global sequence of 400 tokens; q = [130, 270) (not a multiple of any block).
MaskConfig named(const std::string& kind, int64_t q_block, int64_t kv_block, TokenRange kv_range) {
  MaskConfig c;
  c.batch = 2;
  c.seq_len = 400;
  c.q_range = {130, 140};
  c.kv_range = kv_range;
  c.q_block = q_block;
  c.kv_block = kv_block;
  auto docs = [&] {
    auto ids = torch::ones({2, 400}, torch::kInt64);
    ids[0].narrow(0, 77, 150).fill_(2);  // [0, 77), [77, 227), [227, 400)
    ids[0].narrow(0, 227, 173).fill_(3);
    ids[1].narrow(0, 130, 140).fill_(0);  // batch row 1: the whole q shard is padding (document 0)
    ids[1].narrow(0, 270, 130).fill_(2);
    return ids;
  };
  if (kind == "causal") {
  } else if (kind == "sliding_smaller_than_chunk") {
    c.geometry.window = 40;
  } else if (kind == "sliding_larger_than_chunk") {
    c.geometry.window = 300;
  } else if (kind == "documents") {
    c.meta.document_ids = docs();
  } else if (kind == "padding") {
    c.meta.padding = torch::zeros({2, 400}, torch::kBool);
    c.meta.padding[0].narrow(0, 350, 50).fill_(true);  // tail padding
    c.meta.padding[1].narrow(0, 0, 270).fill_(true);   // batch row 1: every key up to the shard's end
  } else if (kind == "vision") {
    c.geometry.window = 32;
    c.geometry.vision_bidirectional = true;
    c.meta.vision_group_ids = torch::full({2, 400}, -1, torch::kInt64);
    c.meta.vision_group_ids[0].narrow(0, 100, 120).fill_(0);  // crosses the q shard and several blocks
    c.meta.vision_group_ids[1].narrow(0, 200, 30).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 250, 90).fill_(1);
  } else if (kind == "vision_past_window") {  // the transformers 5.5 .. 5.12 rule: groups longer than the window
    c.geometry.window = 32;
    c.geometry.vision_bidirectional = true;
    c.geometry.vision_group_past_window = true;
    c.meta.vision_group_ids = torch::full({2, 400}, -1, torch::kInt64);
    c.meta.vision_group_ids[0].narrow(0, 100, 120).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 250, 90).fill_(1);
  } else if (kind == "vision_full_layer") {  // transformers 5.9 .. 5.12: a group open on a layer with no window too
    c.geometry.vision_bidirectional = true;
    c.meta.vision_group_ids = torch::full({2, 400}, -1, torch::kInt64);
    c.meta.vision_group_ids[0].narrow(0, 100, 120).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 250, 90).fill_(1);
  } else if (kind == "non_causal") {
    c.geometry.causal = false;
  } else if (kind == "combined") {
    c.geometry.window = 90;
    c.geometry.vision_bidirectional = true;
    c.meta.document_ids = docs();
    c.meta.padding = torch::zeros({2, 400}, torch::kBool);
    c.meta.padding[0].narrow(0, 380, 20).fill_(true);
    c.meta.vision_group_ids = torch::full({2, 400}, -1, torch::kInt64);
    c.meta.vision_group_ids[0].narrow(0, 140, 100).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 280, 60).fill_(0);
  } else {
    throw std::runtime_error("unknown kind " + kind);
  }
  return c;
}

const std::vector<torch::ScalarType> kAllDtypes = {torch::kFloat32, torch::kBFloat16, torch::kFloat16};

TEST_F(CudaAttentionGpu, EveryMaskKindAtEveryHeadDimMatchesTheCpuChunkAttention) {
  const std::vector<std::string> kinds = {"causal", "sliding_smaller_than_chunk", "sliding_larger_than_chunk",
                                          "documents", "padding", "vision", "vision_past_window", "vision_full_layer",
                                          "non_causal", "combined"};
  const std::vector<std::pair<int64_t, int64_t>> blocks = {{128, 128}, {64, 64}, {128, 64}};
  const std::vector<TokenRange> kv_ranges = {{0, 400}, {100, 150}, {270, 130}};  // all keys, chunks
  uint64_t seed = 0;
  for (const auto& kind : kinds)
    for (int64_t d : {64, 128, 256, 512}) {
      const Heads h{8, seed % 2 ? 1 : 2, d};  // GQA 8:2 and 8:1
      const auto [qb, kb] = blocks[seed % blocks.size()];
      auto c = named(kind, qb, kb, kv_ranges[seed % kv_ranges.size()]);
      check_problem(kind + " " + describe(seed, c, h), c, h, seed, kAllDtypes);
      ++seed;
      if (HasFailure()) return;
    }
  END_GPU_TEST();
}

TEST_F(CudaAttentionGpu, RandomConfigurationsMatchTheCpuChunkAttention_320) {
  const std::vector<Heads> heads = {{8, 2, 0}, {8, 1, 0}, {4, 4, 0}, {2, 1, 0}};
  const int64_t dims[] = {64, 128, 256, 512, 64, 128, 256, 512, 40, 200};
  for (uint64_t seed = 0; seed < 320; ++seed) {
    auto c = testing::random_mask_config(50000 + seed, 192);
    Heads h = heads[seed % heads.size()];
    h.d = dims[seed % 10];
    check_problem(describe(seed, c, h), c, h, seed, {kAllDtypes[seed % 3]});
    if (HasFailure()) return;
  }
  END_GPU_TEST();
}

bool bytes_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  auto x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), size_t(x.numel()) * x.element_size()) == 0;
}

TEST_F(CudaAttentionGpu, TwoRunsAreBitwiseIdentical) {
  MaskConfig c;
  c.batch = 2;
  c.seq_len = 1100;
  c.q_range = c.kv_range = {0, 1100};
  c.q_block = c.kv_block = 128;
  c.geometry.window = 700;
  c.meta.document_ids = torch::ones({2, 1100}, torch::kInt64);
  c.meta.document_ids[1].narrow(0, 300, 800).fill_(2);
  auto mask = mask_of(c, c.kv_range);
  for (int64_t d : {256, 512})
    for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
      auto in = random_inputs(c, {8, 2, d}, 7);
      RunOptions o;
      const double scale = 1.0 / std::sqrt(double(d));
      auto a = run_device(in.q.to(dt), in.k.to(dt), in.v.to(dt), in.dout.to(dt), mask, scale, o);
      auto b = run_device(in.q.to(dt), in.k.to(dt), in.v.to(dt), in.dout.to(dt), mask, scale, o);
      const std::string what = "D=" + std::to_string(d) + " " + dtype_name(dt);
      EXPECT_TRUE(bytes_equal(a.out, b.out)) << what;
      EXPECT_TRUE(bytes_equal(a.lse, b.lse)) << what;
      EXPECT_TRUE(bytes_equal(a.dq, b.dq)) << what;
      EXPECT_TRUE(bytes_equal(a.dk, b.dk)) << what;
      EXPECT_TRUE(bytes_equal(a.dv, b.dv)) << what;
    }
  END_GPU_TEST();
}

TEST_F(CudaAttentionGpu, AllPaddingShardsGiveExactZerosAndNoNaN) {
  for (int64_t d : {64, 128, 256, 512})
    for (auto dt : kAllDtypes) {
      // q shard [128, 256) all document 0; kv chunk [256, 384) all key padding.
      MaskConfig c;
      c.batch = 1;
      c.seq_len = 384;
      c.meta.document_ids = torch::ones({1, 384}, torch::kInt64);
      c.meta.document_ids.narrow(1, 128, 128).fill_(0);
      c.meta.padding = torch::zeros({1, 384}, torch::kBool);
      c.meta.padding.narrow(1, 256, 128).fill_(true);
      c.q_block = c.kv_block = 128;
      for (auto [qr, kr] : std::vector<std::pair<TokenRange, TokenRange>>{{{128, 128}, {0, 384}}, {{256, 128}, {256, 128}}}) {
        c.q_range = qr;
        c.kv_range = kr;
        auto mask = mask_of(c, kr);
        ASSERT_EQ(computed_score_elements(mask), 0);
        auto in = random_inputs(c, {8, 2, d}, 3);
        RunOptions o;
        o.out_dtype = o.grad_dtype = dt;
        auto r = run_device(in.q.to(dt), in.k.to(dt), in.v.to(dt), in.dout.to(dt), mask, 1.0, o);
        const std::string what = "D=" + std::to_string(d) + " " + dtype_name(dt) + " q " + std::to_string(qr.start);
        EXPECT_TRUE(r.out.eq(0).all().item<bool>()) << what;
        EXPECT_TRUE(torch::isneginf(r.lse).all().item<bool>()) << what;
        EXPECT_TRUE(r.dq.eq(0).all().item<bool>()) << what;
        EXPECT_TRUE(r.dk.eq(0).all().item<bool>()) << what;
        EXPECT_TRUE(r.dv.eq(0).all().item<bool>()) << what;
        EXPECT_EQ(r.fwd_work.score_elements, 0) << what;
      }
    }
  END_GPU_TEST();
}

// Forward of every key chunk, merged by LSE, equals the forward over all keys; the backward of every chunk with
// the merged out / LSE sums (dq) and concatenates (dk, dv) to the backward over all keys. Exactly so (1e-5) where the
// kernel computes in fp32 (fp32 inputs, or bf16 on the fp32 kernels). The tensor-core kernels round P to bf16
// against each chunk's own running max, so split and whole round differently (1e-3 relative measured under
// emulation, as FlashAttention does): there the merged result is judged against the fp64 oracle by the bf16 rule.
TEST_F(CudaAttentionGpu, SplitKeysAndLseMergeEqualAllKeys_48Seeds) {
  const int64_t dims[] = {64, 256, 512};
  for (uint64_t seed = 0; seed < 48; ++seed) {
    auto c = testing::random_mask_config(80000 + seed, 200);
    c.kv_range = {0, c.seq_len};
    std::mt19937_64 rng(seed);
    const Heads h{8, 2, dims[seed % 3]};
    const auto dt = seed % 2 ? torch::kBFloat16 : torch::kFloat32;
    auto in = random_inputs(c, h, seed);
    auto q = in.q.to(dt), k = in.k.to(dt), v = in.v.to(dt), dout = in.dout.to(dt);
    const double scale = 1.0 / std::sqrt(double(h.d));
    std::vector<int64_t> cuts{0, c.seq_len};
    for (int64_t n = testing::uniform(rng, 1, 4); n > 0; --n)
      cuts.push_back(testing::uniform(rng, 1, std::max<int64_t>(1, c.seq_len - 1)));
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<BlockMask> masks;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) masks.push_back(mask_of(c, {cuts[i], cuts[i + 1] - cuts[i]}));
    auto chunk = [&](const torch::Tensor& t, size_t i) { return t.narrow(2, cuts[i], cuts[i + 1] - cuts[i]); };
    // Every chunk's forward, merged; every chunk's backward from the merged out / LSE, summed and concatenated.
    auto split = [&](bool tensor_cores) {
      RunOptions fwd_only;
      fwd_only.backward = false;
      fwd_only.tensor_cores = tensor_cores;
      std::vector<AttentionPartial> parts;
      for (size_t i = 0; i < masks.size(); ++i) {
        auto r = run_device(q, chunk(k, i), chunk(v, i), dout, masks[i], scale, fwd_only);
        parts.push_back({r.out, r.lse});
      }
      auto merged = lse_merge(parts);
      Result s{merged.out, merged.lse, {}, {}, {}, {}, {}};
      s.dq = torch::zeros_like(q, torch::kFloat32);
      std::vector<torch::Tensor> dks, dvs;
      for (size_t i = 0; i < masks.size(); ++i) {
        RunOptions o;
        o.tensor_cores = tensor_cores;
        o.merged_out = merged.out;
        o.merged_lse = merged.lse;
        auto r = run_device(q, chunk(k, i), chunk(v, i), dout, masks[i], scale, o);
        s.dq = s.dq + r.dq;
        dks.push_back(r.dk);
        dvs.push_back(r.dv);
      }
      s.dk = torch::cat(dks, 2);
      s.dv = torch::cat(dvs, 2);
      return s;
    };
    const std::string what = "seed " + std::to_string(seed) + " chunks " + std::to_string(cuts.size() - 1) + " " +
                             c.describe() + " D=" + std::to_string(h.d) + " " + dtype_name(dt);
    RunOptions fp32_kernels;
    fp32_kernels.tensor_cores = false;
    const auto merged = split(false);
    const auto whole = run_device(q, k, v, dout, mask_of(c, c.kv_range), scale, fp32_kernels);
    ASSERT_TRUE(torch::isfinite(merged.out).all().item<bool>()) << what;
    EXPECT_LE(testing::rel_error(merged.out, whole.out), 1e-5) << what;
    ASSERT_TRUE(torch::equal(torch::isneginf(merged.lse), torch::isneginf(whole.lse))) << what;
    auto fin = torch::isfinite(whole.lse);
    if (fin.any().item<bool>()) {
      EXPECT_LE(testing::max_abs_error(merged.lse.masked_select(fin), whole.lse.masked_select(fin)), 1e-4) << what;
    }
    EXPECT_LE(testing::rel_error(merged.dq, whole.dq), 1e-5) << what;
    EXPECT_LE(testing::rel_error(merged.dk, whole.dk), 1e-5) << what;
    EXPECT_LE(testing::rel_error(merged.dv, whole.dv), 1e-5) << what;
    if (dt != torch::kFloat32) {
      const auto tc = split(true);
      const Oracle o = make_oracle(in, mask_of(c, c.kv_range), allowed_of(c, c.kv_range), scale);
      const auto peer = math_attention(q, k, v, o.allowed, scale, dout);
      const std::string tc_what = what + " (tensor cores)";
      expect_oracle_close(tc_what, "out", tc.out, o.fp64.out, peer.out, 1e-4, 2, 1e-6);
      expect_lse_close(tc_what, tc.lse, o.fp64.lse, peer.lse, 1e-4, 2);
      expect_oracle_close(tc_what, "dq", tc.dq, o.fp64.dq, peer.dq, 1e-4, 2, 1e-6);
      expect_oracle_close(tc_what, "dk", tc.dk, o.fp64.dk, peer.dk, 1e-4, 2, 1e-6);
      expect_oracle_close(tc_what, "dv", tc.dv, o.fp64.dv, peer.dv, 1e-4, 2, 1e-6);
    }
    if (HasFailure()) return;
  }
  END_GPU_TEST();
}

TEST_F(CudaAttentionGpu, FullTilesNeverEvaluateTheMask) {
  // Every non-empty tile of a causal mask declared full: the kernel must attend to every element of those
  // tiles (future keys included), so it provably does not look at the mask inside full tiles.
  MaskConfig c;
  c.batch = 1;
  c.seq_len = 256;
  c.q_range = c.kv_range = {0, 256};
  c.q_block = c.kv_block = 64;
  auto mask = mask_of(c, c.kv_range);
  auto classes = block_classes(mask);
  fill_block_lists(mask, torch::where(classes == kPartialBlock, int64_t(kFullBlock), classes.to(torch::kInt64)).to(torch::kUInt8));
  auto tiles = torch::ones({4, 4}, torch::kBool).tril().repeat_interleave(64, 0).repeat_interleave(64, 1).unsqueeze(0);
  for (int64_t d : {64, 512}) {
    auto in = random_inputs(c, {4, 2, d}, 11);
    const double scale = 1.0 / std::sqrt(double(d));
    auto r = run_device(in.q, in.k, in.v, in.dout, mask, scale, RunOptions{});
    EXPECT_EQ(r.fwd_work.mask_elements, 0);
    EXPECT_EQ(r.fwd_work.partial_blocks, 0);
    EXPECT_EQ(r.fwd_work.full_blocks, 10);
    EXPECT_EQ(r.bwd_work.mask_elements, 0);
    auto ref = testing::reference_attention(in.q, in.k, in.v, tiles, scale, in.dout);
    EXPECT_LE(testing::rel_error(r.out, ref.out), 1e-5) << d;
    EXPECT_LE(testing::rel_error(r.dq, ref.dq), 1e-5) << d;
    EXPECT_LE(testing::rel_error(r.dk, ref.dk), 1e-5) << d;
    EXPECT_LE(testing::rel_error(r.dv, ref.dv), 1e-5) << d;
  }
  END_GPU_TEST();
}

TEST_F(CudaAttentionGpu, LowPrecisionOutputsAreTheRoundedFp32Results) {
  auto c = named("combined", 128, 64, {0, 400});
  auto mask = mask_of(c, c.kv_range);
  for (auto dt : {torch::kBFloat16, torch::kFloat16})
    for (int64_t d : {128, 512}) {
      auto in = random_inputs(c, {8, 2, d}, 5);
      auto q = in.q.to(dt), k = in.k.to(dt), v = in.v.to(dt), dout = in.dout.to(dt);
      RunOptions wide, narrow;
      narrow.out_dtype = narrow.grad_dtype = dt;
      // The backward of both runs must see the same out, so both take the fp32 forward's out / LSE.
      auto a = run_device(q, k, v, dout, mask, 0.1, wide);
      wide.merged_out = narrow.merged_out = a.out;
      wide.merged_lse = narrow.merged_lse = a.lse;
      auto w = run_device(q, k, v, dout, mask, 0.1, wide), n = run_device(q, k, v, dout, mask, 0.1, narrow);
      const std::string what = dtype_name(dt) + " D=" + std::to_string(d);
      EXPECT_TRUE(bytes_equal(n.out, w.out.to(dt))) << what;
      EXPECT_TRUE(bytes_equal(n.lse, w.lse)) << what;
      EXPECT_TRUE(bytes_equal(n.dq, w.dq.to(dt))) << what;
      EXPECT_TRUE(bytes_equal(n.dk, w.dk.to(dt))) << what;
      EXPECT_TRUE(bytes_equal(n.dv, w.dv.to(dt))) << what;
    }
  END_GPU_TEST();
}

// fp32 on the CUDA-core kernels, bf16 on the tensor cores (their 16-byte cp.async loads from strided rows).
TEST_F(CudaAttentionGpu, StridedQueriesGiveTheSameBits) {
  auto c = named("vision", 64, 64, {0, 400});
  auto mask = mask_of(c, c.kv_range);
  auto in = random_inputs(c, {8, 1, 256}, 9);
  for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
    auto q = in.q.to(dt), k = in.k.to(dt), v = in.v.to(dt), dout = in.dout.to(dt);
    RunOptions plain, strided;
    strided.strided_q = true;
    auto a = run_device(q, k, v, dout, mask, 0.0625, plain);
    auto b = run_device(q, k, v, dout, mask, 0.0625, strided);
    const std::string what = dtype_name(dt);
    EXPECT_TRUE(bytes_equal(a.out, b.out)) << what;
    EXPECT_TRUE(bytes_equal(a.lse, b.lse)) << what;
    EXPECT_TRUE(bytes_equal(a.dq, b.dq)) << what;
    EXPECT_TRUE(bytes_equal(a.dk, b.dk)) << what;
    EXPECT_TRUE(bytes_equal(a.dv, b.dv)) << what;
  }
  END_GPU_TEST();
}

}  // namespace
}  // namespace cpharness::kernels::cuda
