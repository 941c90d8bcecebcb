// The harness on CUDA (GPU build, CTest label `gpu`). Without a CUDA device every test is a GTEST_SKIP naming the
// reason, which CTest reports as skipped, never as passed.
//   * the libtorch-ops chunk attention on CUDA tensors against the same function on the CPU (fp32 <= 1e-5
//     relative), at Gemma4's head dims 256 and 512, on random masks of every kind;
//   * the ring's chunk compute (CUDA kernel path) against the CPU on the same inputs;
//   * the cp 1 reference of default cases on CUDA against the CPU;
//   * cp N with ranks as threads on one GPU (--comm local): every check of the default cases, both ring modes and
//     layouts, activation checkpointing, reference_cp. Before the ring's backward ran on the rank's own thread this
//     deadlocked on the device's single autograd worker (harness/model/caller_thread_backward.h).
#include <gtest/gtest.h>

#include <random>

#include "harness/cp/chunk_compute.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/train/case.h"
#include "harness/train/device.h"
#include "kernels/block_mask_builder.h"
#include "kernels/chunk_attention.h"
#include "kernels/tests/test_support.h"

namespace cpharness {
namespace {

using kernels::testing::random_mask_config;

#define SKIP_WITHOUT_CUDA()                                                              \
  do {                                                                                   \
    if (!train::cuda_available()) GTEST_SKIP() << train::cuda_unavailable_reason();      \
  } while (0)

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  const auto d = (a.cpu().to(torch::kFloat64) - b.cpu().to(torch::kFloat64)).norm().item<double>();
  const auto n = b.cpu().to(torch::kFloat64).norm().item<double>();
  return n > 0 ? d / n : d;
}

struct Problem {
  torch::Tensor q, k, v, dout;
  kernels::BlockMask mask;
  double scale;
  std::string what;
};

Problem random_problem(uint64_t seed, int64_t head_dim) {
  auto c = random_mask_config(seed, 300);
  std::mt19937_64 rng(seed * 7 + 1);
  const int64_t hkv = 1 + int64_t(rng() % 2), groups = (rng() % 2) ? 4 : 1;
  torch::manual_seed(int64_t(seed));
  Problem p;
  p.q = torch::randn({c.batch, hkv * groups, c.q_range.length, head_dim});
  p.k = torch::randn({c.batch, hkv, c.kv_range.length, head_dim});
  p.v = torch::randn({c.batch, hkv, c.kv_range.length, head_dim});
  p.dout = torch::randn({c.batch, hkv * groups, c.q_range.length, head_dim});
  p.mask = kernels::build_block_mask(c.meta.slice(c.q_range.start, c.q_range.length),
                                     c.meta.slice(c.kv_range.start, c.kv_range.length), c.q_range, c.kv_range,
                                     c.geometry, c.batch, c.q_block, c.kv_block);
  p.scale = 1.0 / std::sqrt(double(head_dim));
  p.what = c.describe() + " D=" + std::to_string(head_dim) + " heads " + std::to_string(hkv * groups) + ":" +
           std::to_string(hkv) + " seed " + std::to_string(seed);
  return p;
}

// ||gpu - oracle|| <= tol ||oracle|| + 4 ||cpu - oracle|| + 2^-24 sqrt(D) sqrt(n), the oracle being the CPU chunk
// attention in fp64 on the same inputs. The second term covers outputs the CPU fp32 path itself gets only to its
// own rounding, the third outputs that are ~0 (a row that sees one key has dq = dk = 0 exactly: both devices return
// rounding noise of dP - delta, sums over head_dim terms).
void expect_close(const std::string& what, const torch::Tensor& gpu, const torch::Tensor& cpu, const torch::Tensor& oracle,
                  double tol, int64_t head_dim) {
  auto d = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a.cpu().to(torch::kFloat64) - b.cpu().to(torch::kFloat64)).norm().item<double>();
  };
  const double err = d(gpu, oracle), cpu_err = d(cpu, oracle);
  const double allowed = tol * oracle.norm().item<double>() + 4 * cpu_err +
                         std::ldexp(1.0, -24) * std::sqrt(double(head_dim)) * std::sqrt(double(std::max<int64_t>(1, gpu.numel())));
  EXPECT_LE(err, allowed) << what << ": error " << err << " vs the fp64 oracle (cpu fp32: " << cpu_err << ")";
  EXPECT_FALSE(torch::isnan(gpu).any().item<bool>()) << what << ": NaN";
}

void expect_matches_cpu(const Problem& p, bool kernel_path, double tol) {
  const auto dev = torch::Device(torch::kCUDA);
  const int64_t D = p.q.size(3);
  auto f64 = [](const torch::Tensor& t) { return t.to(torch::kFloat64); };
  auto fo = kernels::chunk_attention_forward(f64(p.q), f64(p.k), f64(p.v), p.mask, p.scale);
  auto go = kernels::chunk_attention_backward(f64(p.q), f64(p.k), f64(p.v), fo.out, fo.lse, f64(p.dout), p.mask, p.scale);
  auto fc = kernels::chunk_attention_forward(p.q, p.k, p.v, p.mask, p.scale);
  auto gc = kernels::chunk_attention_backward(p.q, p.k, p.v, fc.out, fc.lse, p.dout, p.mask, p.scale);
  cp::ChunkCompute compute(kernel_path ? cp::CudaAttentionPath::kKernel : cp::CudaAttentionPath::kOps);
  auto mask = std::make_shared<const kernels::BlockMask>(p.mask);
  auto q = p.q.to(dev), k = p.k.to(dev), v = p.v.to(dev), dout = p.dout.to(dev);
  auto fg = compute.forward(q, k, v, mask, p.scale);
  auto gg = compute.backward(q, k, v, fg.out, fg.lse, dout, mask, p.scale);
  ASSERT_TRUE(fg.out.is_cuda() && gg.dq.is_cuda()) << p.what;
  EXPECT_TRUE(torch::equal(torch::isneginf(fg.lse).cpu(), torch::isneginf(fo.lse))) << p.what << ": empty rows differ";
  auto finite = torch::isfinite(fo.lse);
  expect_close(p.what + " lse", fg.lse.cpu().masked_select(finite), fc.lse.masked_select(finite),
               fo.lse.masked_select(finite), tol, D);
  expect_close(p.what + " out", fg.out, fc.out, fo.out, tol, D);
  expect_close(p.what + " dq", gg.dq, gc.dq, go.dq, tol, D);
  expect_close(p.what + " dk", gg.dk, gc.dk, go.dk, tol, D);
  expect_close(p.what + " dv", gg.dv, gc.dv, go.dv, tol, D);
}

TEST(GpuChunkAttention, OpsPathOnCudaMatchesTheCpuAtGemma4HeadDims) {
  SKIP_WITHOUT_CUDA();
  for (int64_t d : {256, 512})
    for (uint64_t seed = 1; seed <= 24; ++seed) expect_matches_cpu(random_problem(seed * 31 + uint64_t(d), d), false, 1e-5);
}

TEST(GpuChunkAttention, KernelPathOnCudaMatchesTheCpuAtGemma4HeadDims) {
  SKIP_WITHOUT_CUDA();
  for (int64_t d : {256, 512})
    for (uint64_t seed = 1; seed <= 24; ++seed) expect_matches_cpu(random_problem(seed * 37 + uint64_t(d), d), true, 1e-5);
}

TEST(GpuChunkAttention, DeviceMaskCopiesAreMadeOncePerMaskAndBatch) {
  SKIP_WITHOUT_CUDA();
  auto p = random_problem(5, 256);
  cp::ChunkCompute compute(cp::CudaAttentionPath::kKernel);
  auto mask = std::make_shared<const kernels::BlockMask>(p.mask);
  const auto dev = torch::Device(torch::kCUDA);
  auto q = p.q.to(dev), k = p.k.to(dev), v = p.v.to(dev);
  auto f = compute.forward(q, k, v, mask, p.scale);
  compute.backward(q, k, v, f.out, f.lse, p.dout.to(dev), mask, p.scale);
  EXPECT_EQ(compute.device_copies(), 1u);
  compute.new_batch();
  EXPECT_EQ(compute.device_copies(), 0u);
}

train::Case default_case(const std::string& name) {
  return train::load_case(std::string(CPHARNESS_SOURCE_DIR) + "/cases/default/" + name + ".json");
}

TEST(GpuCases, RanksAsThreadsOnOneGpuPassEveryCheck) {
  SKIP_WITHOUT_CUDA();
  runner::SuiteOptions o;
  o.device = "cuda";
  // e4b-pattern: 168 lookups -> 4 builds at cp 2; the zigzag case checkpoints layers; the stream case streams.
  for (const char* name : {"e4b-pattern", "tiny-e4b-zigzag", "tiny-31b-stream"}) {
    SCOPED_TRACE(name);
    auto c = default_case(name);
    EXPECT_FALSE(runner::unsupported_configuration(c, o).has_value());
    const auto rep = runner::run_case(c, o);
    ASSERT_FALSE(rep.error) << *rep.error;
    testing::expect_no_failed_check(rep);
    EXPECT_FALSE(testing::results_of(rep, "cache.hit_count").empty());
  }
}

TEST(GpuCases, AReferenceAtCp2OnOneGpuJudgesCp4) {
  SKIP_WITHOUT_CUDA();
  runner::SuiteOptions o;
  o.device = "cuda";
  auto c = default_case("e4b-pattern");
  c.reference_cp = 2;
  c.cp_sizes = {4};
  const auto rep = runner::run_case(c, o);
  ASSERT_FALSE(rep.error) << *rep.error;
  testing::expect_no_failed_check(rep);
}

// The cp 1 reference on CUDA against the same reference on the CPU: same weights, batches and steps; fp32 within
// the fp32 lane's 1e-5, fp64 within 1e-10 (only summation order differs); device figures recorded.
TEST(GpuCases, TheReferenceOnCudaMatchesTheCpu) {
  SKIP_WITHOUT_CUDA();
  for (auto lane : {train::DtypeLane::kFp32, train::DtypeLane::kFp64}) {
    const double tol = lane == train::DtypeLane::kFp64 ? 1e-10 : 1e-5;
    for (const char* name : {"e4b-pattern", "tiny-31b-vision", "tiny-e2b-packed"}) {
      const auto c = default_case(name);
      runner::RunOptions on_gpu;
      on_gpu.device = torch::Device(torch::kCUDA);
      const auto cpu = runner::run_reference(c, lane);
      const auto gpu = runner::run_reference(c, lane, on_gpu);
      ASSERT_EQ(cpu.steps.size(), gpu.steps.size());
      for (size_t s = 0; s < cpu.steps.size(); ++s) {
        EXPECT_NEAR(gpu.steps[s].loss, cpu.steps[s].loss, tol * std::abs(cpu.steps[s].loss)) << name << " step " << s;
        EXPECT_NEAR(gpu.steps[s].grad_norm, cpu.steps[s].grad_norm, tol * cpu.steps[s].grad_norm) << name << " step " << s;
        EXPECT_GT(gpu.steps[s].peak_allocated, 0) << name;
        EXPECT_GE(gpu.steps[s].peak_reserved, gpu.steps[s].peak_allocated) << name;
        EXPECT_EQ(cpu.steps[s].peak_allocated, -1) << name << ": the CPU has no device memory figure";
      }
      EXPECT_LE(rel(gpu.logits, cpu.logits), tol) << name;
      EXPECT_EQ(gpu.device, "cuda");
    }
  }
}

}  // namespace
}  // namespace cpharness
