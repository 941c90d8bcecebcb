// Ring attention against full attention in the sharded frame, shared by the local-thread tests and the MPI
// tests: scenarios, the fp64 reference with autograd, one rank's ring run and the per-rank/per-chunk checks.
#pragma once
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include "harness/cp/comm.h"
#include "harness/cp/ring_attention.h"
#include "harness/cp/shard_plan.h"
#include "kernels/dense_mask.h"
#include "kernels/reference_attention.h"
#include "kernels/relative_error.h"

namespace cpharness::cp::testing {

using torch::Tensor;

struct Scenario {
  std::string name;
  int64_t seq_len = 24, batch = 2, heads = 4, kv_heads = 2, dim = 8;
  std::vector<int64_t> docs;  // empty: one document
  int64_t padding = 0;
  std::vector<std::pair<int64_t, int64_t>> vision;  // [start, length)
  std::optional<int64_t> window;
  bool vision_bidirectional = false;
  bool vision_group_past_window = false;  // the transformers 5.5 .. 5.12 sliding rule
  int64_t block = 4;
  Sharding sharding = Sharding::kContiguous;
  RingMode mode = RingMode::kCollect;
};

struct Reference {
  Tensor out, lse, dq, dk, dv;  // full sequence (padded length)
};

struct Data {
  ShardPlan plan;
  kernels::TokenMetadata meta;  // padded global
  kernels::LayerGeometry geometry;
  Tensor q, k, v, dout;          // padded global
  Tensor allowed;                // [B, S_pad, S_pad]
};

inline Data make_data(const Scenario& sc, int cp, uint64_t seed) {
  Data d;
  d.plan = ShardPlan(sc.seq_len, cp, sc.sharding);
  const int64_t S = sc.seq_len, P = d.plan.padded_len(), B = sc.batch;
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto docs = torch::zeros({B, S}, i64);
  int64_t start = 0, id = 1;
  auto lengths = sc.docs.empty() ? std::vector<int64_t>{S - sc.padding} : sc.docs;
  for (auto len : lengths) docs.narrow(1, start, len).fill_(id++), start += len;
  auto padding = torch::zeros({B, S}, torch::kBool);
  if (sc.padding) padding.narrow(1, S - sc.padding, sc.padding).fill_(true);
  d.meta.document_ids = d.plan.pad(docs, 0);
  d.meta.padding = d.plan.pad(padding, true);
  if (!sc.vision.empty()) {
    auto groups = torch::full({B, S}, -1, i64);
    int64_t g = 0;
    for (auto [s0, len] : sc.vision) groups.narrow(1, s0, len).fill_(g++);
    d.meta.vision_group_ids = d.plan.pad(groups, -1);
  }
  d.geometry = {true, sc.window, sc.vision_bidirectional};
  d.geometry.vision_group_past_window = sc.vision_group_past_window;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  d.q = torch::randn({B, sc.heads, P, sc.dim}, gen, f64);
  d.k = torch::randn({B, sc.kv_heads, P, sc.dim}, gen, f64);
  d.v = torch::randn({B, sc.kv_heads, P, sc.dim}, gen, f64);
  d.dout = torch::randn({B, sc.heads, P, sc.dim}, gen, f64);
  d.allowed = kernels::dense_mask(d.meta, d.geometry, B, P);
  return d;
}

inline Reference reference(const Data& d) {
  auto q = d.q.clone().requires_grad_(), k = d.k.clone().requires_grad_(), v = d.v.clone().requires_grad_();
  Reference r;
  auto dense = kernels::dense_reference_attention(q, k, v, d.allowed);
  r.out = dense.out, r.lse = dense.lse;
  (r.out * d.dout).sum().backward();
  r.out = r.out.detach();
  r.dq = q.grad(), r.dk = k.grad(), r.dv = v.grad();
  return r;
}

inline double rel(const Tensor& a, const Tensor& b) { return kernels::relative_error(a, b); }

inline void expect_close(const Tensor& actual, const Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  EXPECT_FALSE(torch::isnan(actual).any().item<bool>()) << what;
  if (expected.abs().max().item<double>() == 0) {
    EXPECT_EQ(actual.abs().max().item<double>(), 0.0) << what << " must be exactly zero";
  } else {
    EXPECT_LE(rel(actual, expected), 1e-10) << what;
  }
}

struct RankOutput {
  Tensor out, dq, dk, dv;
  std::vector<ChunkRecord> records;
  std::vector<RingTraceEntry> trace;
  CommStats forward_stats, backward_stats;
};

// This rank's ring attention on its shard of `data`, forward and backward, with every chunk recorded.
inline RankOutput rank_output(Comm& comm, const Scenario& sc, const Data& data) {
  const int r = comm.rank();
  RingOptions options;
  options.q_block = options.kv_block = sc.block;
  options.record_chunks = true;
  options.mode = sc.mode;
  RingAttention ring(comm, options);
  ring.begin_batch(1, data.plan.local_len(), data.plan.sharding());
  auto shard = [&](const Tensor& t) { return data.plan.shard(t, r, 2).clone(); };
  auto q = shard(data.q).requires_grad_(), k = shard(data.k).requires_grad_(), v = shard(data.v).requires_grad_();
  kernels::TokenMetadata meta;
  meta.document_ids = data.plan.shard(data.meta.document_ids, r);
  meta.padding = data.plan.shard(data.meta.padding, r);
  if (data.meta.vision_group_ids.defined()) meta.vision_group_ids = data.plan.shard(data.meta.vision_group_ids, r);
  model::AttentionInputs in{q, k, v, data.geometry, 1.0, 0};
  comm.reset_stats();
  auto out = ring.attend(in, meta);
  auto fwd = comm.stats();
  comm.reset_stats();
  (out * shard(data.dout)).sum().backward();
  return {out.detach(), q.grad(), k.grad(), v.grad(), ring.records(), ring.trace(), fwd, comm.stats()};
}

// Every parity, trace and op-count assertion for rank r (gtest assertions; call inside a test).
inline void check_rank(const Data& data, const Reference& ref, int r, int cp, const RankOutput& o,
                       RingMode mode = RingMode::kCollect) {
  {
    // This rank's tokens and the chunk owner's, wherever the layout puts them (index_select: a copy).
    const auto mine = data.plan.global_indices(r);
    auto rows = [&](const Tensor& t) { return t.index_select(2, mine); };
    expect_close(o.out, rows(ref.out), fmt::format("rank {} out", r));
    expect_close(o.dq, rows(ref.dq), fmt::format("rank {} dq", r));
    expect_close(o.dk, rows(ref.dk), fmt::format("rank {} dk", r));
    expect_close(o.dv, rows(ref.dv), fmt::format("rank {} dv", r));

    // Per chunk: this rank's queries against one owner's keys only.
    ASSERT_EQ(o.records.size(), size_t(cp));
    auto dq_sum = torch::zeros_like(o.dq);
    for (auto& rec : o.records) {
      const auto theirs = data.plan.global_indices(rec.owner);
      auto cols = [&](const Tensor& t) { return t.index_select(2, theirs); };
      auto allowed = data.allowed.index_select(1, mine).index_select(2, theirs);
      const bool any = allowed.any().item<bool>();
      EXPECT_EQ(rec.computed, any) << "rank " << r << " owner " << rec.owner;
      if (!any) continue;
      auto qs = rows(data.q).clone().requires_grad_();
      auto ks = cols(data.k).clone().requires_grad_(), vs = cols(data.v).clone().requires_grad_();
      auto [chunk_out, lse] = kernels::dense_reference_attention(qs, ks, vs, allowed);
      expect_close(rec.out, chunk_out.detach(), fmt::format("rank {} chunk {} out", r, rec.owner));
      auto finite = torch::isfinite(lse);
      EXPECT_TRUE(torch::equal(torch::isfinite(rec.lse), finite)) << "rank " << r << " chunk " << rec.owner << " lse -inf pattern";
      EXPECT_LE(rel(torch::where(finite, rec.lse, torch::zeros_like(rec.lse)), torch::where(finite, lse, torch::zeros_like(lse))), 1e-10);
      // dK/dV of this chunk from this rank's queries = the full reference's gradient with dout zero off this shard.
      auto q_all = data.q.clone().requires_grad_(), k_all = data.k.clone().requires_grad_(), v_all = data.v.clone().requires_grad_();
      auto dout_rows = torch::zeros_like(data.dout);
      dout_rows.index_copy_(2, mine, rows(data.dout));
      (kernels::dense_reference_attention(q_all, k_all, v_all, data.allowed).out * dout_rows).sum().backward();
      expect_close(rec.dk, cols(k_all.grad()), fmt::format("rank {} chunk {} dk", r, rec.owner));
      expect_close(rec.dv, cols(v_all.grad()), fmt::format("rank {} chunk {} dv", r, rec.owner));
      dq_sum += rec.dq;
    }
    expect_close(dq_sum, rows(ref.dq), fmt::format("rank {} sum of chunk dq", r));

    // Trace: at step s rank r processes the chunk of rank (r - s) mod cp, every owner once. collect: cp - 1 direct
    // returns, every chunk held at once; stream: the accumulators travel (cp - 1 more ring exchanges) and go home in
    // one exchange, at most two chunks held, every exchange posted before the compute it overlaps.
    const bool stream = mode == RingMode::kStream;
    const int64_t returns = stream ? (cp > 1) : cp - 1;
    ASSERT_EQ(o.trace.size(), 2u);
    for (auto& entry : o.trace) {
      ASSERT_EQ(entry.owners.size(), size_t(cp));
      for (int s = 0; s < cp; ++s) EXPECT_EQ(entry.owners[s], ((r - s) % cp + cp) % cp) << entry.pass << " step " << s;
      EXPECT_EQ(entry.ring_exchanges, (stream && entry.pass == "backward" ? 2 : 1) * (cp - 1)) << entry.pass;
      EXPECT_EQ(entry.peak_chunks, stream ? std::min(cp, 2) : cp) << entry.pass;
      ASSERT_EQ(entry.posted_s.size(), entry.waited_s.size());
      EXPECT_EQ(int64_t(entry.posted_s.size()), entry.ring_exchanges + entry.grad_returns) << entry.pass;
      for (size_t i = 0; i < entry.posted_s.size(); ++i) EXPECT_LE(entry.posted_s[i], entry.waited_s[i]);
    }
    EXPECT_EQ(o.trace[1].grad_returns, returns);
    // Op counts: forward cp - 1 ring steps; backward cp - 1 ring steps (replay), plus the returns.
    EXPECT_EQ(o.forward_stats.ops(CommOp::RingExchange), cp - 1);
    EXPECT_EQ(o.forward_stats.ops(CommOp::Exchange), 0);
    EXPECT_EQ(o.backward_stats.ops(CommOp::RingExchange), (stream ? 2 : 1) * (cp - 1));
    EXPECT_EQ(o.backward_stats.ops(CommOp::Exchange), returns);
    EXPECT_EQ(o.backward_stats.bytes(CommOp::Exchange), returns * int64_t(o.dk.nbytes() + o.dv.nbytes()));
  }
}

inline std::vector<Scenario> scenarios() {
  std::vector<Scenario> s;
  s.push_back({"causal"});
  { Scenario x{"window smaller than a shard"}; x.window = 3; s.push_back(x); }
  { Scenario x{"window larger than a shard"}; x.window = 11; s.push_back(x); }
  { Scenario x{"packed documents spanning ranks"}; x.docs = {7, 9, 8}; x.window = 5; s.push_back(x); }
  { Scenario x{"padding on the last rank"}; x.padding = 5; s.push_back(x); }
  { Scenario x{"last shard all padding"}; x.seq_len = 24; x.padding = 14; s.push_back(x); }
  { Scenario x{"vision groups spanning ranks"}; x.vision = {{4, 9}, {15, 5}}; x.window = 3; x.vision_bidirectional = true; s.push_back(x); }
  { Scenario x{"vision groups past the window (5.5 .. 5.12)"}; x.vision = {{2, 13}, {17, 6}}; x.window = 3; x.vision_bidirectional = true; x.vision_group_past_window = true; s.push_back(x); }
  { Scenario x{"vision groups on a full layer (5.9 .. 5.12)"}; x.vision = {{3, 12}, {18, 5}}; x.vision_bidirectional = true; s.push_back(x); }
  {  // ids past 255 (a long row of short documents, video frames): ids sent around the ring in a narrow type wrap
    Scenario x{"300 documents and 290 vision groups"};
    x.seq_len = 600;
    x.docs.assign(300, 2);
    for (int64_t g = 0; g < 290; ++g) x.vision.push_back({2 * g, 2});
    x.window = 5;
    x.vision_bidirectional = true;
    x.block = 16;
    s.push_back(x);
  }
  { Scenario x{"vision and documents"}; x.docs = {10, 12}; x.padding = 2; x.vision = {{6, 8}}; x.window = 4; x.vision_bidirectional = true; s.push_back(x); }
  { Scenario x{"GQA 8 heads on 2"}; x.heads = 8; x.kv_heads = 2; x.window = 6; s.push_back(x); }
  { Scenario x{"length not divisible by cp"}; x.seq_len = 23; x.docs = {10, 10}; x.padding = 3; s.push_back(x); }
  { Scenario x{"default block size 128"}; x.block = 128; x.docs = {12, 12}; s.push_back(x); }
  return s;
}

}  // namespace cpharness::cp::testing
