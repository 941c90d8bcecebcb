// The CUDA block-sparse attention (kernels/cuda), forward and forward + backward, timed with CUDA events on
// bf16 inputs: B 1, Hq 8, Hkv 2 / 4, S 8k / 16k / 32k, head_dim 256 / 512, masks causal / sliding 512 /
// packed documents (causal inside each document). Prints ms and TFLOP/s over allowed elements (forward
// 4·A·D·Hq flops, forward + backward 14·A·D·Hq: the backward recomputes S, so 5 more matmuls), and the
// work efficiency (score elements computed / allowed). Needs a GPU; bench/flex_attention_peer.py runs it next
// to FlexAttention and SDPA. Not a test.
//   bench_cuda_attention [--seq 8192,16384,32768] [--dim 256,512] [--hkv 2,4] [--masks causal,sliding512,docs]
//                        [--dtype bf16|fp16|fp32] [--block 128] [--warmup 2] [--reps 5] [--no-backward]
//                        [--kernels tc|fp32|both] [--json FILE]   (one JSON object per line, for the peer script)
// --kernels: bf16 / fp16 run the tensor-core kernels (tc, the default: forward and backward) or the fp32 CUDA-core
// ones (fp32); both: each configuration twice, the fp32 kernels as impl "cpharness_cuda_fp32".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/block_mask_builder.h"
#include "kernels/cuda/host_staging.h"

using namespace cpharness::kernels;
namespace kc = cpharness::kernels::cuda;

namespace {

// Packed documents: these lengths, repeated, the last cut at S (bench/flex_attention_peer.py uses the same).
const int64_t kDocLengths[] = {3000, 1000, 2048, 4096, 500, 1644};

std::vector<int64_t> doc_lengths(int64_t S) {
  std::vector<int64_t> out;
  for (int64_t t = 0, i = 0; t < S; ++i) {
    const int64_t len = std::min(kDocLengths[i % 6], S - t);
    out.push_back(len);
    t += len;
  }
  return out;
}

// Allowed (q, k) pairs of one head.
double allowed_elements(const std::string& kind, int64_t S) {
  if (kind == "causal") return double(S) * double(S + 1) / 2;
  if (kind == "sliding512") {
    double a = 0;
    for (int64_t q = 0; q < S; ++q) a += double(std::min<int64_t>(q + 1, 512));
    return a;
  }
  double a = 0;
  for (int64_t L : doc_lengths(S)) a += double(L) * double(L + 1) / 2;
  return a;
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) v.push_back(std::stoll(item));
  return v;
}
std::vector<std::string> parse_names(const char* s) {
  std::vector<std::string> v;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) v.push_back(item);
  return v;
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    kc::check_cuda(cudaEventCreate(&a), "cudaEventCreate");
    kc::check_cuda(cudaEventCreate(&b), "cudaEventCreate");
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  template <class F>
  double median_ms(int warmup, int reps, F&& f) {
    for (int i = 0; i < warmup; ++i) f();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
      kc::check_cuda(cudaEventRecord(a), "cudaEventRecord");
      f();
      kc::check_cuda(cudaEventRecord(b), "cudaEventRecord");
      kc::check_cuda(cudaEventSynchronize(b), "cudaEventSynchronize");
      float ms = 0;
      kc::check_cuda(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

void ok(const std::string& e) {
  if (!e.empty()) throw std::runtime_error(e);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> seqs = {8192, 16384, 32768}, dims = {256, 512}, hkvs = {2, 4};
  std::vector<std::string> masks = {"causal", "sliding512", "docs"};
  std::string dtype_name = "bf16", json_path;
  int64_t hq = 8, block = 128;
  int warmup = 2, reps = 5;
  bool backward = true;
  std::string kernels = "tc";
  for (int i = 1; i < argc; ++i) {
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", argv[i]);
        std::exit(2);
      }
      return argv[++i];
    };
    if (!std::strcmp(argv[i], "--seq")) seqs = parse_list(next());
    else if (!std::strcmp(argv[i], "--dim")) dims = parse_list(next());
    else if (!std::strcmp(argv[i], "--hkv")) hkvs = parse_list(next());
    else if (!std::strcmp(argv[i], "--hq")) hq = std::stoll(next());
    else if (!std::strcmp(argv[i], "--masks")) masks = parse_names(next());
    else if (!std::strcmp(argv[i], "--dtype")) dtype_name = next();
    else if (!std::strcmp(argv[i], "--block")) block = std::stoll(next());
    else if (!std::strcmp(argv[i], "--warmup")) warmup = std::atoi(next());
    else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(next());
    else if (!std::strcmp(argv[i], "--no-backward")) backward = false;
    else if (!std::strcmp(argv[i], "--json")) json_path = next();
    else if (!std::strcmp(argv[i], "--kernels")) kernels = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  std::string why;
  if (kc::cuda_device_count(&why) == 0) {
    std::fprintf(stderr, "bench_cuda_attention: no CUDA device (%s)\n", why.c_str());
    return 2;
  }
  const torch::ScalarType dtype = dtype_name == "fp32" ? torch::kFloat32
                                  : dtype_name == "fp16" ? torch::kFloat16
                                                         : torch::kBFloat16;
  std::ofstream json;
  if (!json_path.empty()) json.open(json_path);
  std::vector<bool> forwards;
  if (kernels == "tc" || kernels == "both") forwards.push_back(true);
  if (kernels == "fp32" || kernels == "both") forwards.push_back(false);
  if (forwards.empty()) {
    std::fprintf(stderr, "--kernels must be tc, fp32 or both\n");
    return 2;
  }
  std::printf("%-5s %-10s %6s %4s %4s %4s | %10s %8s | %10s %8s | %6s\n", "fwd", "mask", "S", "D", "Hq", "Hkv", "fwd ms",
              "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "work");
  try {
    for (const auto& kind : masks)
      for (int64_t S : seqs)
        for (int64_t D : dims)
          for (int64_t hkv : hkvs) {
            const int64_t B = 1;
            TokenMetadata meta;
            LayerGeometry geo;
            if (kind == "sliding512") geo.window = 512;
            if (kind == "docs") {
              meta.document_ids = torch::empty({1, S}, torch::kInt64);
              int64_t t = 0, id = 1;
              for (int64_t L : doc_lengths(S)) {
                meta.document_ids.narrow(1, t, L).fill_(id++);
                t += L;
              }
            }
            auto mask = build_block_mask(meta, meta, {0, S}, {0, S}, geo, B, block, block);
            auto dm = kc::upload_block_mask(mask);
            torch::manual_seed(0);
            auto q = torch::randn({B, hq, S, D}).to(dtype), k = torch::randn({B, hkv, S, D}).to(dtype);
            auto v = torch::randn({B, hkv, S, D}).to(dtype), dout = torch::randn({B, hq, S, D}).to(dtype);
            kc::DeviceBuffer qb = kc::upload(q), kb = kc::upload(k), vb = kc::upload(v), gb = kc::upload(dout);
            const kc::DType dt = kc::dtype_of(dtype);
            const size_t el = q.element_size();
            kc::DeviceBuffer ob(B * hq * S * D * el), lb(B * hq * S * 4), db(B * hq * S * 4);
            kc::DeviceBuffer dqb(B * hq * S * D * el), dkb(B * hkv * S * D * el), dvb(B * hkv * S * D * el);
            kc::ForwardArgs fa;
            fa.g = {B, hq, hkv, D, float(1.0 / std::sqrt(double(D)))};
            fa.mask = dm.view;
            fa.q = kc::contiguous4(qb, dt, hq, S, D);
            fa.k = kc::contiguous4(kb, dt, hkv, S, D);
            fa.v = kc::contiguous4(vb, dt, hkv, S, D);
            fa.out = kc::contiguous4(ob, dt, hq, S, D);
            fa.lse = kc::contiguous3(lb, hq, S);
            kc::BackwardArgs ba;
            ba.g = fa.g;
            ba.mask = dm.view;
            ba.q = fa.q;
            ba.k = fa.k;
            ba.v = fa.v;
            ba.out = fa.out;
            ba.lse = fa.lse;
            ba.dout = kc::contiguous4(gb, dt, hq, S, D);
            ba.delta = kc::contiguous3(db, hq, S);
            ba.dq = kc::contiguous4(dqb, dt, hq, S, D);
            ba.dk = kc::contiguous4(dkb, dt, hkv, S, D);
            ba.dv = kc::contiguous4(dvb, dt, hkv, S, D);
            for (bool tc : forwards) {
              fa.tensor_cores = ba.tensor_cores = tc;
              const std::string impl = tc ? "cpharness_cuda" : "cpharness_cuda_fp32";
              Timer timer;
              const double fwd = timer.median_ms(warmup, reps, [&] { ok(kc::block_sparse_attention_forward(fa, nullptr)); });
              double both = 0;
              if (backward)
                both = timer.median_ms(warmup, reps, [&] {
                  ok(kc::block_sparse_attention_forward(fa, nullptr));
                  ok(kc::block_sparse_attention_backward(ba, nullptr));
                });
              const double allowed = allowed_elements(kind, S) * double(B);
              const double work = double(computed_score_elements(mask)) * (mask.batch == 1 ? double(B) : 1.0) / allowed;
              const double fwd_tflops = 4.0 * allowed * double(D) * double(hq) / (fwd * 1e-3) / 1e12;
              const double both_tflops = backward ? 14.0 * allowed * double(D) * double(hq) / (both * 1e-3) / 1e12 : 0;
              std::printf("%-5s %-10s %6ld %4ld %4ld %4ld | %10.3f %8.2f | %10.3f %8.2f | %6.3f\n", tc ? "tc" : "fp32",
                          kind.c_str(), long(S), long(D), long(hq), long(hkv), fwd, fwd_tflops, both, both_tflops, work);
              std::fflush(stdout);
              if (json)
                json << "{\"impl\":\"" << impl << "\",\"mask\":\"" << kind << "\",\"S\":" << S << ",\"D\":" << D
                     << ",\"Hq\":" << hq << ",\"Hkv\":" << hkv << ",\"dtype\":\"" << dtype_name << "\",\"block\":" << block
                     << ",\"allowed_elements\":" << allowed << ",\"work_ratio\":" << work << ",\"fwd_ms\":" << fwd
                     << ",\"fwd_tflops\":" << fwd_tflops << ",\"fwd_bwd_ms\":" << both
                     << ",\"fwd_bwd_tflops\":" << both_tflops << "}\n";
            }
          }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}
