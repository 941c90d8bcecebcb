// mask.dense_slice, mask.block_classification and attention.parity: exact computations on the case's own
// metadata and layer geometries, independent of training.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <mutex>

#include "harness/check/checks.h"
#include "harness/cp/comm.h"
#include "harness/cp/cp_step.h"
#include "harness/cp/shard_plan.h"
#include "harness/model/layer_geometry.h"
#include "kernels/block_mask_builder.h"
#include "kernels/dense_mask.h"
#include "kernels/reference_attention.h"
#include "kernels/relative_error.h"

namespace cpharness::check {

std::string layer_type_name(const kernels::LayerGeometry& g) {
  if (!g.window) return g.vision_bidirectional ? "full, vision bidirectional" : "full";
  const std::string sliding = fmt::format("sliding (window {})", *g.window);
  if (!g.vision_bidirectional) return sliding;
  return sliding + (g.vision_group_past_window ? ", vision bidirectional past the window" : ", vision bidirectional");
}

namespace {

using torch::Tensor;
using report::Policy;

struct LayerShape {
  kernels::LayerGeometry geometry;
  int64_t kv_heads = 1, head_dim = 8;
  std::string name;  // "sliding" / "full"
};

// One entry per distinct layer geometry of the model, with the head shape of its first layer.
std::vector<LayerShape> distinct_layers(const model::ModelConfig& m) {
  std::vector<LayerShape> out;
  for (int64_t l = 0; l < m.num_hidden_layers; ++l) {
    const auto g = model::layer_geometry(m, l);
    bool seen = false;
    for (auto& s : out) seen = seen || s.geometry == g;
    if (!seen) out.push_back({g, m.layer_kv_heads(l), m.layer_head_dim(l), m.is_full(l) ? "full" : "sliding"});
  }
  return out;
}

// The case's step-0 metadata padded for `cp` as the CP step pads it (prepare_cp_batch; cp-reference §4 pad values):
// the checks see the pad values the ring trains with. A tail pad given a real document's id, say, opens that
// document's keys to pad queries, which attention.parity's padded rows then show.
kernels::TokenMetadata padded_meta(const train::Case& c, const train::Batch& b, const cp::ShardPlan& plan) {
  const auto p = cp::prepare_cp_batch(cp::token_batch_of(b), plan, c.model.pad_fill_id());
  kernels::TokenMetadata m;
  m.document_ids = p.document_ids;
  m.padding = p.padding_mask;
  m.vision_group_ids = p.vision_group_ids;
  return m;
}

// Rank r's metadata as the ring sees it: its segments laid end to end.
kernels::TokenMetadata shard_meta(const kernels::TokenMetadata& m, const cp::ShardPlan& plan, int r) {
  auto cut = [&](const Tensor& t) { return t.defined() ? plan.shard(t, r, 1) : t; };
  return {cut(m.document_ids), cut(m.padding), cut(m.vision_group_ids)};
}

// Every (query segment of rank r, key segment of `owner`) pair the ring builds a mask for: one under contiguous
// sharding, four under zigzag.
std::vector<std::pair<kernels::TokenRange, kernels::TokenRange>> segment_pairs(const cp::ShardPlan& plan, int r, int owner) {
  std::vector<std::pair<kernels::TokenRange, kernels::TokenRange>> out;
  for (auto& q : plan.segments(r))
    for (auto& kv : plan.segments(owner)) out.push_back({q, kv});
  return out;
}

double rel(const Tensor& a, const Tensor& b) { return kernels::relative_error(a, b); }

}  // namespace

std::vector<CheckResult> check_masks(const train::Case& c, int cp, const cp::RingOptions& ring, BlockMaskMutation mutation) {
  const auto batch = train::batch_for_step(c, 0);
  const cp::ShardPlan plan(c.data.seq_len, cp, case_sharding(c));
  const auto meta = padded_meta(c, batch, plan);
  const int64_t B = c.data.batch;
  std::vector<CheckResult> out;
  for (int r = 0; r < cp; ++r) {
    int64_t dense_mismatch = 0, block_mismatch = 0, pairs = 0;
    nlohmann::json dense_first, block_first;
    for (auto& layer : distinct_layers(c.model)) {
      auto global = kernels::dense_mask(meta, layer.geometry, B, plan.padded_len());
      for (int owner = 0; owner < cp; ++owner)
        for (auto& [q_range, kv_range] : segment_pairs(plan, r, owner)) {
          ++pairs;
          const auto q_meta = meta.slice(q_range.start, q_range.length), kv_meta = meta.slice(kv_range.start, kv_range.length);
          const auto geometry = cp::ring_chunk_geometry(ring, r, owner, layer.geometry);
          auto local = kernels::dense_mask(q_meta, kv_meta, q_range, kv_range, geometry, B);
          auto expected = global.narrow(1, q_range.start, q_range.length).narrow(2, kv_range.start, kv_range.length);
          const int64_t wrong = (local != expected).sum().item<int64_t>();
          if (wrong && dense_first.is_null())
            dense_first = {{"layer_type", layer.name}, {"owner", owner}, {"q_start", q_range.start},
                           {"kv_start", kv_range.start}, {"wrong_elements", wrong}};
          dense_mismatch += wrong;

          auto analytic = kernels::build_block_mask(q_meta, kv_meta, q_range, kv_range, geometry, B, ring.q_block, ring.kv_block);
          if (mutation == BlockMaskMutation::kPartialAsFull) {
            auto classes = kernels::block_classes(analytic);
            classes.masked_fill_(classes == kernels::kPartialBlock, uint8_t(kernels::kFullBlock));
            kernels::fill_block_lists(analytic, classes);
          }
          auto brute = kernels::build_block_mask_brute_force(q_meta, kv_meta, q_range, kv_range, geometry, B, ring.q_block, ring.kv_block);
          if (auto diff = kernels::block_mask_mismatch(analytic, brute)) {
            ++block_mismatch;
            if (block_first.is_null())
              block_first = {{"layer_type", layer.name}, {"owner", owner}, {"q_start", q_range.start},
                             {"kv_start", kv_range.start}, {"difference", *diff}};
          }
        }
    }
    out.push_back(CheckResult::judge("mask.dense_slice", cp, r, "mismatched_elements", double(dense_mismatch), 0, Policy::Count,
                                     {{"first_mismatch", dense_first}, {"chunks_checked", pairs}}));
    out.push_back(CheckResult::judge("mask.block_classification", cp, r, "mismatched_chunks", double(block_mismatch), 0,
                                     Policy::Count, {{"first_mismatch", block_first}, {"chunks_checked", pairs}}));
  }
  return out;
}

nlohmann::json block_mask_grids(const train::Case& c, int cp, const cp::RingOptions& ring) {
  const cp::ShardPlan plan(c.data.seq_len, cp, case_sharding(c));
  const auto layers = distinct_layers(c.model);
  const int64_t side = std::max((plan.local_len() + ring.q_block - 1) / ring.q_block,
                                (plan.local_len() + ring.kv_block - 1) / ring.kv_block);
  const int64_t per_chunk = int64_t(segment_pairs(plan, 0, 0).size());
  if (int64_t(layers.size()) * cp * cp * per_chunk > kMaxBlockMaskGrids || side > kMaxBlockMaskGridSide) return nullptr;
  const auto meta = padded_meta(c, train::batch_for_step(c, 0), plan);
  const char kTile[3] = {'E', 'P', 'F'};  // kEmptyBlock, kPartialBlock, kFullBlock
  nlohmann::json grids = nlohmann::json::array();
  for (auto& layer : layers) {
    // The name says what the geometry is, so two sliding geometries (with and without vision groups) stay apart.
    const std::string type = layer_type_name(layer.geometry);
    for (int r = 0; r < cp; ++r)
      for (int owner = 0; owner < cp; ++owner)
        for (auto& [q_range, kv_range] : segment_pairs(plan, r, owner)) {
          const auto geometry = cp::ring_chunk_geometry(ring, r, owner, layer.geometry);
          const auto mask = kernels::build_block_mask(meta.slice(q_range.start, q_range.length),
                                                      meta.slice(kv_range.start, kv_range.length), q_range, kv_range,
                                                      geometry, c.data.batch, ring.q_block, ring.kv_block);
          const auto classes = kernels::block_classes(mask).select(0, 0).contiguous();  // batch row 0
          const auto* p = classes.data_ptr<uint8_t>();
          nlohmann::json tiles = nlohmann::json::array();
          for (int64_t i = 0; i < classes.size(0); ++i) {
            std::string row;
            for (int64_t j = 0; j < classes.size(1); ++j) row += kTile[std::min<int>(p[i * classes.size(1) + j], 2)];
            tiles.push_back(row);
          }
          nlohmann::json grid = {{"layer_type", type}, {"rank", r}, {"chunk_owner", owner}, {"q_blocks", classes.size(0)},
                                 {"kv_blocks", classes.size(1)}, {"tiles", tiles}};
          if (per_chunk > 1) grid["q_start"] = q_range.start, grid["kv_start"] = kv_range.start;  // zigzag sub-chunks
          grids.push_back(std::move(grid));
        }
  }
  return grids;
}

double padded_rows_max_abs(const Tensor& out, const Tensor& dq, const Tensor& padding) {
  if (!padding.defined()) return 0.0;  // no padding anywhere
  const auto pad_rows = padding.to(torch::kBool).unsqueeze(1).unsqueeze(-1);  // [B, 1, L, 1]
  auto worst = [&](const Tensor& t) { return torch::where(pad_rows, t, torch::zeros_like(t)).abs().max().item<double>(); };
  return std::max(worst(out), worst(dq));
}

std::vector<CheckResult> check_attention_parity(const train::Case& c, int cp, const cp::RingOptions& ring_options) {
  const auto batch = train::batch_for_step(c, 0);
  const cp::ShardPlan plan(c.data.seq_len, cp, case_sharding(c));
  const auto meta = padded_meta(c, batch, plan);
  const int64_t B = c.data.batch, L = plan.local_len(), S = plan.padded_len(), Hq = c.model.num_attention_heads;
  const double threshold = 1e-9;  // fp64: the same math in another order
  struct RankError {
    double worst = 0, padded = 0;
    nlohmann::json where;
    double bf16_ratio = 0;  // bf16 inputs: error / the error of rounding the exact result to bf16 once
    nlohmann::json bf16_where;
  };
  std::vector<RankError> errors(static_cast<size_t>(cp));
  uint64_t seed = 1000;
  for (auto& layer : distinct_layers(c.model)) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed++);
    auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    auto q = torch::randn({B, Hq, S, layer.head_dim}, gen, f64), k = torch::randn({B, layer.kv_heads, S, layer.head_dim}, gen, f64);
    auto v = torch::randn({B, layer.kv_heads, S, layer.head_dim}, gen, f64), dout = torch::randn({B, Hq, S, layer.head_dim}, gen, f64);
    auto allowed = kernels::dense_mask(meta, layer.geometry, B, S);
    auto qr = q.clone().requires_grad_(), kr = k.clone().requires_grad_(), vr = v.clone().requires_grad_();
    auto ref_out = kernels::dense_reference_attention(qr, kr, vr, allowed).out;
    (ref_out * dout).sum().backward();
    // The same in bf16: inputs rounded to bf16, the exact (fp64) result of those inputs as the reference.
    auto bf = [](const Tensor& t) { return t.to(torch::kBFloat16); };
    auto q16 = bf(q), k16 = bf(k), v16 = bf(v), dout16 = bf(dout);
    auto q16r = q16.to(torch::kFloat64).requires_grad_(), k16r = k16.to(torch::kFloat64).requires_grad_();
    auto v16r = v16.to(torch::kFloat64).requires_grad_();
    auto ref16_out = kernels::dense_reference_attention(q16r, k16r, v16r, allowed).out;
    (ref16_out * dout16.to(torch::kFloat64)).sum().backward();
    std::mutex mu;
    cp::run_local(cp, [&](cp::Comm& comm) {
      const int r = comm.rank();
      auto options = ring_options;
      options.record_chunks = true;
      cp::RingAttention ring(comm, options);
      ring.begin_batch(1, L, plan.sharding());
      const auto mine = plan.global_indices(r);
      auto rows = [&](const Tensor& t) { return t.index_select(2, mine); };
      auto lq = rows(q).clone().requires_grad_(), lk = rows(k).clone().requires_grad_(), lv = rows(v).clone().requires_grad_();
      auto out = ring.attend({lq, lk, lv, layer.geometry, 1.0, 0}, shard_meta(meta, plan, r));
      (out * rows(dout)).sum().backward();
      std::vector<std::pair<std::string, double>> errs = {{"out", rel(out.detach(), rows(ref_out.detach()))},
                                                          {"dq", rel(lq.grad(), rows(qr.grad()))},
                                                          {"dk", rel(lk.grad(), rows(kr.grad()))},
                                                          {"dv", rel(lv.grad(), rows(vr.grad()))}};
      for (auto& rec : ring.records()) {
        if (!rec.computed) continue;
        const auto theirs = plan.global_indices(rec.owner);
        auto chunk_allowed = allowed.index_select(1, mine).index_select(2, theirs);
        auto [chunk_out, lse] = kernels::dense_reference_attention(rows(q), k.index_select(2, theirs),
                                                                   v.index_select(2, theirs), chunk_allowed);
        auto finite = torch::isfinite(lse);
        errs.push_back({fmt::format("chunk {} out", rec.owner), rel(rec.out, chunk_out)});
        const bool same_pattern = torch::equal(torch::isfinite(rec.lse), finite);
        errs.push_back({fmt::format("chunk {} lse", rec.owner),
                        same_pattern ? rel(torch::where(finite, rec.lse, torch::zeros_like(rec.lse)), torch::where(finite, lse, torch::zeros_like(lse))) : INFINITY});
      }
      // Padded query rows: exactly zero output and gradient.
      const double padded = padded_rows_max_abs(out.detach(), lq.grad(), shard_meta(meta, plan, r).padding);
      // bf16 inputs (as the bf16 lane runs): every returned tensor is rounded to bf16 once, as it must be, so its
      // error against the exact result is that of one rounding; a ring that sums dK/dV, outputs or LSE merges in
      // the input dtype rounds once per ring step, and its error grows with cp (sqrt(cp) x at cp 3 and up). The
      // ratio to one rounding is a property of the whole tensor, not a draw: no lane slack hides it.
      cp::RingAttention ring16(comm, ring_options);
      ring16.begin_batch(1, L, plan.sharding());
      auto lq16 = rows(q16).clone().requires_grad_(), lk16 = rows(k16).clone().requires_grad_();
      auto lv16 = rows(v16).clone().requires_grad_();
      auto out16 = ring16.attend({lq16, lk16, lv16, layer.geometry, 1.0, 0}, shard_meta(meta, plan, r));
      (out16 * rows(dout16)).sum().backward();
      auto once = [&](const Tensor& exact) { return rel(exact.to(torch::kBFloat16).to(torch::kFloat64), exact); };
      std::vector<std::pair<std::string, double>> ratios;
      for (auto& [what, got, exact] : std::vector<std::tuple<std::string, Tensor, Tensor>>{
               {"out", out16.detach(), rows(ref16_out.detach())}, {"dq", lq16.grad(), rows(q16r.grad())},
               {"dk", lk16.grad(), rows(k16r.grad())}, {"dv", lv16.grad(), rows(v16r.grad())}}) {
        const double one = once(exact);
        ratios.push_back({what, one > 0 ? rel(got.to(torch::kFloat64), exact) / one : 0.0});
      }
      std::lock_guard<std::mutex> lock(mu);
      auto& e = errors[size_t(r)];
      for (auto& [what, ratio] : ratios)
        if (!(ratio <= e.bf16_ratio)) e.bf16_ratio = ratio, e.bf16_where = {{"layer_type", layer.name}, {"tensor", what}};
      for (auto& [what, err] : errs)
        if (!(err <= e.worst)) e.worst = err, e.where = {{"layer_type", layer.name}, {"tensor", what}};
      e.padded = std::max(e.padded, padded);
    });
  }
  std::vector<CheckResult> out;
  for (int r = 0; r < cp; ++r) {
    auto& e = errors[size_t(r)];
    out.push_back(CheckResult::judge("attention.parity", cp, r, "rel_l2_fp64", e.worst, threshold, Policy::Fp32Relative,
                                     {{"worst", e.where}}));
    out.push_back(CheckResult::judge("attention.parity", cp, r, "padded_rows_max_abs", e.padded, 0, Policy::Exact,
                                     {{"what", "output and dQ of padded query rows"}}));
    out.push_back(CheckResult::judge(
        "attention.parity", cp, r, "bf16_error_over_one_rounding", e.bf16_ratio, kBf16RoundingsAllowed, Policy::Fp32Relative,
        {{"worst", e.bf16_where},
         {"what", "bf16 Q/K/V/dO: relative error of out, dQ, dK, dV against the exact result of the same inputs, over "
                  "the error of rounding that exact result to bf16 once (a sum in bf16 over the ring grows it with cp)"}}));
  }
  return out;
}

}  // namespace cpharness::check
