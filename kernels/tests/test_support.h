// Shared by the kernels tests: seeded random mask configurations and the dense autograd attention reference.
#pragma once
#include <torch/torch.h>

#include <limits>
#include <random>
#include <string>

#include "kernels/reference_attention.h"
#include "kernels/relative_error.h"
#include "kernels/dense_mask.h"

namespace cpharness::kernels::testing {

// Small tensors, shared 2-core machines: libtorch's intra-op pool costs ~10x here (threads spin against each
// other and against other processes). Every test binary that includes this runs single-threaded.
inline const bool kSingleThreaded = [] {
  torch::set_num_threads(1);
  return true;
}();

// One random mask problem: global metadata for [0, S), a geometry, a q range, a kv range and block sizes.
struct MaskConfig {
  int64_t batch = 1;
  int64_t seq_len = 0;
  TokenMetadata meta;  // global, [batch, seq_len]
  LayerGeometry geometry;
  TokenRange q_range, kv_range;
  int64_t q_block = 16, kv_block = 16;
  std::string describe() const {
    std::string s = "B=" + std::to_string(batch) + " S=" + std::to_string(seq_len) +
                    " causal=" + std::to_string(geometry.causal) +
                    " W=" + (geometry.window ? std::to_string(*geometry.window) : std::string("none")) +
                    " vision=" + std::to_string(geometry.vision_bidirectional) +
                    (geometry.vision_group_past_window ? " (groups past the window)" : "") + " q=[" + std::to_string(q_range.start) +
                    ",+" + std::to_string(q_range.length) + ") kv=[" + std::to_string(kv_range.start) + ",+" +
                    std::to_string(kv_range.length) + ") blocks=" + std::to_string(q_block) + "x" +
                    std::to_string(kv_block) + " docs=" + std::to_string(meta.document_ids.defined()) +
                    " pad=" + std::to_string(meta.padding.defined()) +
                    " groups=" + std::to_string(meta.vision_group_ids.defined());
    return s;
  }
};

inline int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
inline bool coin(std::mt19937_64& rng, double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

// Packed documents (1-based runs, sometimes pad runs with id 0), occasionally arbitrary ids per token.
inline torch::Tensor random_documents(std::mt19937_64& rng, int64_t B, int64_t S) {
  auto ids = torch::zeros({B, S}, torch::kInt64);
  auto a = ids.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    if (coin(rng, 0.1)) {
      for (int64_t t = 0; t < S; ++t) a[b][t] = uniform(rng, 0, 2);
      continue;
    }
    const int64_t max_len = std::max<int64_t>(1, S / uniform(rng, 1, 6));
    int64_t t = 0, doc = 1;
    while (t < S) {
      const int64_t len = uniform(rng, 1, max_len);
      const int64_t id = coin(rng, 0.15) ? 0 : doc++;
      for (int64_t e = std::min(S, t + len); t < e; ++t) a[b][t] = id;
    }
    if (coin(rng, 0.3)) {  // tail padding
      for (int64_t u = S - uniform(rng, 0, S / 2); u < S; ++u) a[b][u] = 0;
    }
  }
  return ids;
}

// Key padding: a tail run, a run covering one whole shard, or sprinkled tokens.
inline torch::Tensor random_padding(std::mt19937_64& rng, int64_t B, int64_t S) {
  auto pad = torch::zeros({B, S}, torch::kBool);
  auto a = pad.accessor<bool, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t kind = uniform(rng, 0, 3);
    if (kind == 0) {
      for (int64_t t = S - uniform(rng, 0, S); t < S; ++t) a[b][t] = true;
    } else if (kind == 1) {
      const int64_t cp = uniform(rng, 1, 4), shard = (S + cp - 1) / cp, r = uniform(rng, 0, cp - 1);
      for (int64_t t = r * shard; t < std::min(S, (r + 1) * shard); ++t) a[b][t] = true;
    } else if (kind == 2) {
      for (int64_t t = 0; t < S; ++t) a[b][t] = coin(rng, 0.2);
    }
  }
  return pad;
}

// Vision groups: contiguous runs with globally consecutive ids, text -1; occasionally arbitrary ids.
inline torch::Tensor random_groups(std::mt19937_64& rng, int64_t B, int64_t S) {
  auto g = torch::full({B, S}, -1, torch::kInt64);
  auto a = g.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    if (coin(rng, 0.1)) {
      for (int64_t t = 0; t < S; ++t) a[b][t] = uniform(rng, -1, 1);
      continue;
    }
    int64_t t = 0, id = 0;
    while (t < S) {
      const int64_t len = uniform(rng, 1, std::max<int64_t>(1, S / 3));
      const bool vis = coin(rng, 0.4);
      for (int64_t e = std::min(S, t + len); t < e; ++t) a[b][t] = vis ? id : -1;
      if (vis) ++id;
    }
  }
  return g;
}

inline int64_t random_block(std::mt19937_64& rng) {
  static const int64_t sizes[] = {1, 2, 3, 5, 8, 13, 16, 32, 64, 128};
  return sizes[uniform(rng, 0, 9)];
}

inline MaskConfig random_mask_config(uint64_t seed, int64_t max_len = 320) {
  std::mt19937_64 rng(seed);
  MaskConfig c;
  c.batch = uniform(rng, 1, 2);
  c.seq_len = uniform(rng, 1, max_len);
  const int64_t B = c.batch, S = c.seq_len;
  if (coin(rng, 0.7)) c.meta.document_ids = random_documents(rng, B, S);
  if (coin(rng, 0.5)) c.meta.padding = random_padding(rng, B, S);
  if (coin(rng, 0.5)) c.meta.vision_group_ids = random_groups(rng, B, S);
  c.geometry.causal = coin(rng, 0.85);
  if (coin(rng, 0.6)) c.geometry.window = uniform(rng, 1, S + 8);
  c.geometry.vision_bidirectional = coin(rng, 0.5);
  if (coin(rng, 0.5)) {  // a ring pair: q shard r against kv chunk c
    const int64_t cp = uniform(rng, 1, std::min<int64_t>(S, 8)), shard = S / cp;
    const int64_t r = uniform(rng, 0, cp - 1), o = uniform(rng, 0, cp - 1);
    c.q_range = {r * shard, shard};
    c.kv_range = {o * shard, shard};
  } else {  // arbitrary offsets and lengths
    const int64_t qs = uniform(rng, 0, S - 1), ks = uniform(rng, 0, S - 1);
    c.q_range = {qs, uniform(rng, 1, S - qs)};
    c.kv_range = {ks, uniform(rng, 1, S - ks)};
  }
  c.q_block = random_block(rng);
  c.kv_block = coin(rng, 0.5) ? c.q_block : random_block(rng);
  c.geometry.vision_group_past_window = coin(rng, 0.5);  // drawn last: the earlier draws stay as they were
  return c;
}

// The fp64 oracle (kernels/reference_attention.h) with its gradients for `dout`.
inline kernels::DenseAttentionGrads reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                                        const torch::Tensor& allowed, double scale, const torch::Tensor& dout) {
  return kernels::dense_reference_attention_grads(q, k, v, allowed, scale, dout);
}

inline double rel_error(const torch::Tensor& a, const torch::Tensor& b) { return kernels::relative_error(a, b); }

inline double max_abs_error(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0) return 0;
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

}  // namespace cpharness::kernels::testing
