// Block-mask build time, analytic vs brute force, for the masks a contiguous ring builds (every q shard
// against every kv chunk), and the work efficiency of block-sparse attention. Prints figures; not a test.
//   bench_block_mask [--quick] [--threads N] [--profile [packed]]   (libtorch intra-op threads for the brute force; default 1)
#include <algorithm>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/block_mask.h"
#include "kernels/block_mask_builder.h"

using namespace cpharness::kernels;

namespace {

struct Kind {
  std::string name;
  LayerGeometry geometry;
  bool documents;
};

// Packed documents with lengths uniform in [128, 4096], ids 1, 2, ... (seeded).
TokenMetadata packed_documents(int64_t S) {
  std::mt19937_64 rng(1234);
  auto ids = torch::empty({1, S}, torch::kInt64);
  auto a = ids.accessor<int64_t, 2>();
  int64_t t = 0, doc = 1;
  while (t < S) {
    const int64_t len = std::uniform_int_distribution<int64_t>(128, 4096)(rng);
    for (int64_t e = std::min(S, t + len); t < e; ++t) a[0][t] = doc;
    ++doc;
  }
  TokenMetadata m;
  m.document_ids = ids;
  return m;
}

// CPU time of this thread, in microseconds: the 2-core machine is shared, so wall time mostly measures the
// load of other processes. With one torch thread (the default here) all work runs on this thread.
double thread_cpu_us() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) * 1e6 + double(ts.tv_nsec) * 1e-3;
}

// Median of `reps` runs of f(), in microseconds of thread CPU time.
template <class F>
double median_us(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_cpu_us();
    f();
    t.push_back(thread_cpu_us() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int threads = 1;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--quick") == 0) quick = true;
    else if (std::strcmp(argv[a], "--profile") == 0) {  // one 64k causal mask, many times (for perf)
      torch::set_num_threads(1);
      const bool docs = a + 1 < argc && std::strcmp(argv[a + 1], "packed") == 0;
      const TokenMetadata meta = docs ? packed_documents(65536) : TokenMetadata{};
      const double us = median_us(200, [&] {
        build_block_mask(meta, meta, {0, 65536}, {0, 65536}, LayerGeometry{}, 1, 128, 128);
      });
      std::printf("%s 64k cp1 analytic: %.1f us (median of 200)\n", docs ? "packed_docs" : "causal", us);
      return 0;
    } else if (std::strcmp(argv[a], "--threads") == 0 && a + 1 < argc) threads = std::atoi(argv[++a]);
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--threads N]\n", argv[0]);
      return 2;
    }
  }
  torch::set_num_threads(threads);
  const int64_t block = 128;
  const int64_t brute_limit = int64_t(1) << 28;  // dense elements per pair the brute force may allocate
  const std::vector<int64_t> lengths = quick ? std::vector<int64_t>{4096} : std::vector<int64_t>{4096, 16384, 65536};
  const std::vector<int64_t> cps = {1, 2, 8, 16};
  const std::vector<Kind> kinds = {{"causal", LayerGeometry{true, std::nullopt, false}, false},
                                   {"sliding512", LayerGeometry{true, 512, false}, false},
                                   {"packed_docs", LayerGeometry{true, std::nullopt, false}, true}};
  std::printf("block-mask build, block %lld, batch 1, torch threads %d (analytic is single-threaded); times are\n"
              "medians of thread CPU time (the machine is shared)\n",
              (long long)block, torch::get_num_threads());
  std::printf("analytic: mean over all cp*cp (q shard, kv chunk) pairs; brute force and the ratio: on a sample of\n"
              "pairs (diagonal and the previous chunk), analytic timed on the same pairs; n/a: a pair's dense mask\n"
              "would exceed %lld elements\n\n",
              (long long)brute_limit);
  std::printf("%-12s %6s %3s %6s %15s %15s %15s %9s\n", "mask", "S", "cp", "pairs", "analytic us/mask",
              "sample analytic", "brute us/mask", "ratio");
  for (int64_t S : lengths) {
    for (const auto& kind : kinds) {
      const TokenMetadata global = kind.documents ? packed_documents(S) : TokenMetadata{};
      for (int64_t cp : cps) {
        const int64_t L = S / cp;
        auto build = [&](int64_t r, int64_t o, bool brute) {
          const TokenRange q{r * L, L}, kv{o * L, L};
          const auto qm = global.slice(q.start, L), km = global.slice(kv.start, L);
          return brute ? build_block_mask_brute_force(qm, km, q, kv, kind.geometry, 1, block, block)
                       : build_block_mask(qm, km, q, kv, kind.geometry, 1, block, block);
        };
        // Analytic over every pair the ring builds.
        const int reps = cp == 1 ? 21 : 5;
        double total = 0;
        for (int64_t r = 0; r < cp; ++r)
          for (int64_t o = 0; o < cp; ++o) total += median_us(reps, [&] { build(r, o, false); });
        const double analytic = total / double(cp * cp);
        // Brute force on a sample: the last rank against its own chunk and the previous one.
        std::vector<std::pair<int64_t, int64_t>> sample = {{cp - 1, cp - 1}};
        if (cp > 1) sample.push_back({cp - 1, cp - 2});
        if (L * L > brute_limit) {
          std::printf("%-12s %6lld %3lld %6lld %15.1f %15s %15s %9s\n", kind.name.c_str(), (long long)S, (long long)cp,
                      (long long)(cp * cp), analytic, "-", "n/a", "n/a");
          std::fflush(stdout);
          continue;
        }
        double sa = 0, sb = 0;
        for (auto [r, o] : sample) {
          sa += median_us(reps, [&] { build(r, o, false); });
          sb += median_us(L * L >= (int64_t(1) << 26) ? 1 : 3, [&] { build(r, o, true); });
          // Same answer from both builders (the benchmark measures the real thing).
          if (block_mask_mismatch(build(r, o, false), build(r, o, true))) {
            std::printf("MISMATCH %s S=%lld cp=%lld pair %lld,%lld\n", kind.name.c_str(), (long long)S, (long long)cp,
                        (long long)r, (long long)o);
            return 1;
          }
        }
        sa /= double(sample.size());
        sb /= double(sample.size());
        std::printf("%-12s %6lld %3lld %6lld %15.1f %15.1f %15.1f %8.0fx\n", kind.name.c_str(), (long long)S,
                    (long long)cp, (long long)(cp * cp), analytic, sa, sb, sb / sa);
        std::fflush(stdout);
      }
    }
  }

  // Work efficiency: computed / allowed score elements, sliding W = 512, block 128, S = 16k, summed over the
  // ring's pairs; dense attention computes S*S (the whole score matrix).
  const int64_t S = quick ? 4096 : 16384, W = 512;
  int64_t allowed = 0;
  for (int64_t q = 0; q < S; ++q) allowed += std::min(q + 1, W);
  std::printf("\nwork efficiency, sliding W=%lld, S=%lld, block %lld: allowed %lld score elements per head\n",
              (long long)W, (long long)S, (long long)block, (long long)allowed);
  std::printf("%3s %16s %10s %14s %16s\n", "cp", "computed", "computed/", "dense S*S/", "causal-dense/");
  std::printf("%3s %16s %10s %14s %16s\n", "", "", "allowed", "allowed", "allowed");
  for (int64_t cp : cps) {
    const int64_t L = S / cp;
    int64_t computed = 0;
    for (int64_t r = 0; r < cp; ++r)
      for (int64_t o = 0; o < cp; ++o)
        computed += computed_score_elements(build_block_mask(TokenMetadata{}, TokenMetadata{}, {r * L, L}, {o * L, L},
                                                             LayerGeometry{true, W, false}, 1, block, block));
    std::printf("%3lld %16lld %10.3f %14.1f %16.1f\n", (long long)cp, (long long)computed,
                double(computed) / double(allowed), double(S) * double(S) / double(allowed),
                double(S) * double(S + 1) / 2.0 / double(allowed));
  }
  return 0;
}
