#include "harness/cp/ring_attention.h"

#include <fmt/format.h>

#include <optional>

#include "harness/cp/shard_plan.h"
#include "harness/model/caller_thread_backward.h"

namespace cpharness::cp {
namespace {

using torch::Tensor;
using torch::autograd::variable_list;

// ---- What travels: one K/V chunk with its owner's metadata (bool padding goes as uint8) ----

struct Chunk {
  int owner = 0;
  Tensor k, v;
  kernels::TokenMetadata meta;
};

std::vector<Tensor> pack(const Chunk& c) {
  std::vector<Tensor> out = {c.k.contiguous(), c.v.contiguous()};
  for (auto& t : {c.meta.document_ids, c.meta.padding, c.meta.vision_group_ids})
    if (t.defined()) out.push_back(t.scalar_type() == torch::kBool ? t.to(torch::kUInt8).contiguous() : t.contiguous());
  return out;
}

Chunk unpack(const std::vector<Tensor>& in, const kernels::TokenMetadata& layout, int owner) {
  Chunk c{owner, in.at(0), in.at(1), {}};
  size_t i = 2;
  if (layout.document_ids.defined()) c.meta.document_ids = in.at(i++);
  if (layout.padding.defined()) c.meta.padding = in.at(i++).to(torch::kBool);
  if (layout.vision_group_ids.defined()) c.meta.vision_group_ids = in.at(i++);
  return c;
}

int64_t bytes_of(const std::vector<Tensor>& ts) {
  int64_t n = 0;
  for (auto& t : ts) n += int64_t(t.nbytes());
  return n;
}

// ---- The algorithm ----

// What a ring pass runs on.
struct RingContext {
  Comm& comm;
  kernels::BlockMaskCache& cache;
  ChunkCompute& compute;  // where each chunk's attention runs (CPU ops, CUDA kernel)
  uint64_t generation;
  int64_t local_len;  // S_loc
  Sharding sharding;  // which global ranges a rank's S_loc tokens are (shard_segments)
  const RingOptions& options;
  const RingHooks& hooks;
  RingObserver& observer;
  CommWorker* worker;  // the streaming ring's background exchanges (stream mode only)
};

// One layer's attention call.
struct LayerCall {
  kernels::LayerGeometry geometry;
  double scale = 1.0;
  int64_t layer = 0;
};

// One exchange, timed and reported to the observer.
template <typename Exchange>
std::vector<Tensor> observed_exchange(const RingContext& ctx, const std::vector<Tensor>& send, bool grad_return,
                                      Exchange&& exchange) {
  const auto wall0 = std::chrono::steady_clock::now();
  const double cpu0 = thread_cpu_seconds();
  auto received = exchange(send);
  const auto wall1 = std::chrono::steady_clock::now();
  ctx.observer.exchanged(bytes_of(send), grad_return, std::chrono::duration<double>(wall1 - wall0).count(),
                         thread_cpu_seconds() - cpu0);
  ctx.observer.exchange_times(wall0, wall1);
  return received;
}

// An exchange posted to the background thread: it runs while this rank computes; wait() blocks until it is done.
class PostedExchange {
 public:
  PostedExchange() = default;
  PostedExchange(const RingContext& ctx, const std::vector<Tensor>& send, bool grad_return, CommWorker::Exchange exchange)
      : ctx_(&ctx), bytes_(bytes_of(send)), grad_return_(grad_return), posted_(std::chrono::steady_clock::now()),
        received_(ctx.worker->post(std::move(exchange))) {}
  bool pending() const { return received_.valid(); }
  std::vector<Tensor> wait() {
    const auto wall0 = std::chrono::steady_clock::now();
    const double cpu0 = thread_cpu_seconds();
    auto received = received_.get();  // rethrows the exchange's CommError here, in the rank's thread
    const auto wall1 = std::chrono::steady_clock::now();
    // The time blocked is what the rank spent on communication: the rest overlapped with compute.
    ctx_->observer.exchanged(bytes_, grad_return_, std::chrono::duration<double>(wall1 - wall0).count(),
                             thread_cpu_seconds() - cpu0);
    ctx_->observer.exchange_times(posted_, wall1);
    return received;
  }

 private:
  const RingContext* ctx_ = nullptr;
  int64_t bytes_ = 0;
  bool grad_return_ = false;
  std::chrono::steady_clock::time_point posted_;
  std::future<std::vector<Tensor>> received_;
};

// Posts `send` to the next rank around the ring; what arrives is the previous rank's.
PostedExchange post_ring_exchange(const RingContext& ctx, const std::vector<Tensor>& send) {
  Comm* comm = &ctx.comm;
  return PostedExchange(ctx, send, false, [comm, send] { return comm->ring_exchange(send); });
}

// Streaming, at ring step s of `steps`: posts the exchange that passes `chunk` on and brings the next one (none at the
// last step), and reports the chunks alive, the one held and the one in flight.
PostedExchange post_next_chunk(const RingContext& ctx, const Chunk& chunk, int s, int steps) {
  PostedExchange next;
  if (s < steps) next = post_ring_exchange(ctx, pack(chunk));
  ctx.observer.chunks_held(next.pending() ? 2 : 1);
  return next;
}

// Own chunk first, then `steps` rotations (cp - 1, or fewer under the hop limit): at step s this rank holds the
// chunk of rank (r - s) mod cp.
std::vector<Chunk> collect_chunks(const RingContext& ctx, int steps, const Tensor& k, const Tensor& v,
                                  const kernels::TokenMetadata& meta) {
  const int n = ctx.comm.size(), r = ctx.comm.rank();
  std::vector<Chunk> chunks = {{ctx.hooks.owner_at_step(r, 0, n), k, v, meta}};
  ctx.observer.chunks_held(1);
  auto travelling = pack(chunks.front());
  for (int s = 1; s <= steps; ++s) {
    travelling = observed_exchange(ctx, travelling, false, [&](const auto& send) { return ctx.comm.ring_exchange(send); });
    chunks.push_back(unpack(travelling, meta, ctx.hooks.owner_at_step(r, s, n)));
    ctx.observer.chunks_held(int(chunks.size()));
  }
  return chunks;
}

// One (query segment, key segment) pair of this rank's queries against a chunk, with its block mask from the cache:
// one pair under contiguous sharding, four under zigzag (each sub-chunk is a global range of its own).
struct SegmentPair {
  kernels::TokenRange q, kv;    // global ranges
  int64_t q_local, kv_local;    // where they start in the rank's queries and in the chunk
  std::shared_ptr<const kernels::BlockMask> mask;
  bool work;                    // some allowed (query, key) pair
};

std::vector<SegmentPair> masks_for(const RingContext& ctx, const LayerCall& call, const kernels::TokenMetadata& q_meta,
                                   const Chunk& chunk, const Tensor& q) {
  const int n = ctx.comm.size(), r = ctx.comm.rank();
  const auto geometry = ctx.hooks.chunk_geometry(r, chunk.owner, call.geometry);
  std::vector<SegmentPair> pairs;
  int64_t q_local = 0;
  for (auto& qs : shard_segments(ctx.sharding, r, n, ctx.local_len)) {
    int64_t kv_local = 0;
    for (auto& ks : shard_segments(ctx.sharding, chunk.owner, n, ctx.local_len)) {
      auto mask = ctx.cache.lookup(ctx.generation, q_meta.slice(q_local, qs.length), chunk.meta.slice(kv_local, ks.length),
                                   qs, ks, geometry, ctx.hooks.mask_rows(q.size(0)), ctx.options.q_block, ctx.options.kv_block, q.device());
      const bool work = kernels::computed_score_elements(*mask) > 0 || !ctx.hooks.skips_empty_chunks();
      pairs.push_back({qs, ks, q_local, kv_local, std::move(mask), work});
      kv_local += ks.length;
    }
    q_local += qs.length;
  }
  return pairs;
}

bool has_work(const std::vector<SegmentPair>& pairs) {
  for (auto& p : pairs)
    if (p.work) return true;
  return false;
}

// The masks of this rank's queries against the chunk held at a ring step, the chunk reported to the observer.
std::vector<SegmentPair> visit_chunk(const RingContext& ctx, const LayerCall& call, const kernels::TokenMetadata& q_meta,
                                     const Chunk& chunk, const Tensor& q) {
  auto pairs = masks_for(ctx, call, q_meta, chunk, q);
  ctx.observer.chunk(chunk.owner, has_work(pairs));
  return pairs;
}

// Zeros shaped like `like` in the accumulation dtype `acc`.
Tensor zeros_like_in(const Tensor& like, torch::ScalarType acc) { return torch::zeros(like.sizes(), like.options().dtype(acc)); }

Tensor rows(const Tensor& t, int64_t start, int64_t length) { return t.narrow(2, start, length).contiguous(); }

kernels::AttentionPartial empty_partial(const Tensor& q, int64_t rows_count) {
  const auto acc = q.options().dtype(kernels::accumulation_dtype(q.scalar_type()));
  return {torch::zeros({q.size(0), q.size(1), rows_count, q.size(3)}, acc),
          torch::full({q.size(0), q.size(1), rows_count}, -std::numeric_limits<double>::infinity(), acc)};
}

// This rank's queries against one chunk: out / LSE over all its keys. A single pair is the chunk attention itself;
// under zigzag each query segment merges its key segments' partials and the segments are laid end to end.
kernels::AttentionPartial chunk_forward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Chunk& chunk,
                                        const std::vector<SegmentPair>& pairs) {
  if (pairs.size() == 1) return ctx.compute.forward(q, chunk.k, chunk.v, pairs.front().mask, call.scale);
  std::vector<Tensor> outs, lses;
  for (size_t i = 0; i < pairs.size();) {
    const auto q_seg = pairs[i].q;
    const int64_t q_local = pairs[i].q_local;
    std::vector<kernels::AttentionPartial> parts;
    for (; i < pairs.size() && pairs[i].q_local == q_local; ++i) {
      const auto& p = pairs[i];
      if (p.work || !ctx.hooks.skips_empty_segment_pairs())
        parts.push_back(ctx.compute.forward(rows(q, q_local, q_seg.length), rows(chunk.k, p.kv_local, p.kv.length),
                                            rows(chunk.v, p.kv_local, p.kv.length), p.mask, call.scale));
    }
    auto merged = parts.empty() ? empty_partial(q, q_seg.length)
                  : parts.size() == 1 ? parts.front() : kernels::lse_merge(parts, ctx.options.merge);
    outs.push_back(merged.out);
    lses.push_back(merged.lse);
  }
  return {torch::cat(outs, 2), torch::cat(lses, 2)};
}

// One chunk's dq (this rank's queries) and dk / dv (the chunk's keys), summed over its segment pairs.
kernels::ChunkAttentionGrads chunk_backward(const RingContext& ctx, const LayerCall& call, const Tensor& q,
                                            const Chunk& chunk, const Tensor& out, const Tensor& lse, const Tensor& dout,
                                            const std::vector<SegmentPair>& pairs) {
  if (pairs.size() == 1)
    return ctx.compute.backward(q, chunk.k, chunk.v, out, lse, dout, pairs.front().mask, call.scale);
  const auto acc = kernels::accumulation_dtype(q.scalar_type());
  kernels::ChunkAttentionGrads g{zeros_like_in(q, acc), zeros_like_in(chunk.k, acc), zeros_like_in(chunk.v, acc)};
  for (auto& p : pairs) {
    if (!p.work && ctx.hooks.skips_empty_segment_pairs()) continue;
    const int64_t ql = p.q.length, kl = p.kv.length;
    auto pg = ctx.compute.backward(rows(q, p.q_local, ql), rows(chunk.k, p.kv_local, kl), rows(chunk.v, p.kv_local, kl),
                                   rows(out, p.q_local, ql), lse.narrow(2, p.q_local, ql).contiguous(),
                                   rows(dout, p.q_local, ql), p.mask, call.scale);
    g.dq.narrow(2, p.q_local, ql) += pg.dq;
    g.dk.narrow(2, p.kv_local, kl) += pg.dk;
    g.dv.narrow(2, p.kv_local, kl) += pg.dv;
  }
  return g;
}

int steps_of(const RingContext& ctx, const LayerCall& call) {
  const int n = ctx.comm.size();
  return ctx.hooks.ring_steps(ring_steps(ctx.options, call.geometry, n, ctx.local_len), n);
}

// Forward: every chunk's partial out/LSE, merged by log-sum-exp; rows with no allowed key anywhere are 0, -inf.
// Returns the merged result in the accumulation dtype.
kernels::AttentionPartial collect_forward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k,
                                          const Tensor& v, const kernels::TokenMetadata& meta) {
  ctx.observer.pass_begin(call.layer, "forward");
  std::vector<kernels::AttentionPartial> partials;
  for (auto& chunk : collect_chunks(ctx, steps_of(ctx, call), k, v, meta)) {
    const auto pairs = visit_chunk(ctx, call, meta, chunk, q);
    const bool work = has_work(pairs);
    if (work) partials.push_back(chunk_forward(ctx, call, q, chunk, pairs));
    ctx.observer.chunk_forward(call.layer, chunk.owner, work ? &partials.back() : nullptr);
  }
  kernels::AttentionPartial merged =
      partials.empty() ? empty_partial(q, q.size(2)) : kernels::lse_merge(partials, ctx.options.merge);
  ctx.hooks.finish_output(merged, v);
  ctx.observer.pass_end();
  return merged;
}

struct RingGrads {
  Tensor dq, dk, dv;  // accumulation dtype; dk / dv of this rank's own chunk, every rank's share summed
};

// Backward from the merged out/LSE (cp-reference §1.6): the ring is replayed to get every chunk back (nothing
// was kept from the forward), each chunk gives dq, dk, dv; the dK/dV of the chunk held at step d go home to
// rank r - d, and ours come from rank r + d, which held it at its step d. Accumulated in fp32 (fp64 runs: fp64).
RingGrads collect_backward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& out, const Tensor& lse, const Tensor& dout, const kernels::TokenMetadata& meta) {
  ctx.observer.pass_begin(call.layer, "backward");
  const int n = ctx.comm.size(), r = ctx.comm.rank();
  const auto acc = kernels::accumulation_dtype(q.scalar_type());
  auto chunks = collect_chunks(ctx, steps_of(ctx, call), k, v, meta);
  const int held = int(chunks.size());
  auto dq = zeros_like_in(q, acc);
  std::vector<Tensor> dk(held), dv(held);  // by ring step
  for (int s = 0; s < held; ++s) {
    const auto& chunk = chunks[size_t(s)];
    const auto pairs = visit_chunk(ctx, call, meta, chunk, q);
    const bool work = has_work(pairs);
    if (!work) {
      dk[s] = zeros_like_in(chunk.k, acc);
      dv[s] = zeros_like_in(chunk.v, acc);
      continue;
    }
    auto g = chunk_backward(ctx, call, q, chunk, out, lse, dout, pairs);
    ctx.observer.chunk_backward(call.layer, chunk.owner, g);
    dq += g.dq;
    dk[s] = g.dk;
    dv[s] = g.dv;
  }
  auto dk_home = dk[0].clone(), dv_home = dv[0].clone();
  for (int d = 1; d < held && ctx.hooks.returns_grads(); ++d) {
    const int dst = ctx.hooks.return_destination(r, d, n), src = ctx.hooks.return_source(r, d, n);
    ctx.observer.grads_sent_home(chunks[size_t(d)].owner, dst);
    auto received = observed_exchange(ctx, {dk[d].contiguous(), dv[d].contiguous()}, true,
                                      [&](const auto& send) { return ctx.comm.exchange(send, dst, src); });
    ctx.hooks.add_returned(dk_home, received[0], k.scalar_type());
    ctx.hooks.add_returned(dv_home, received[1], v.scalar_type());
  }
  ctx.observer.pass_end();
  return {dq, dk_home, dv_home};
}

// Streaming forward: the exchange that brings the next chunk is posted before the current one is computed, and each
// chunk's partial is merged as soon as it is computed (the same left fold as the collect mode's merge, so the same
// bits). At most two chunks are alive: the one computed and the one in flight.
kernels::AttentionPartial stream_forward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k,
                                         const Tensor& v, const kernels::TokenMetadata& meta) {
  ctx.observer.pass_begin(call.layer, "forward");
  const int n = ctx.comm.size(), r = ctx.comm.rank(), steps = steps_of(ctx, call);
  Chunk chunk{ctx.hooks.owner_at_step(r, 0, n), k, v, meta};
  std::optional<kernels::AttentionPartial> merged;
  for (int s = 0; s <= steps; ++s) {
    auto next = post_next_chunk(ctx, chunk, s, steps);
    const auto pairs = visit_chunk(ctx, call, meta, chunk, q);
    const bool work = has_work(pairs);
    std::optional<kernels::AttentionPartial> partial;
    if (work) partial = chunk_forward(ctx, call, q, chunk, pairs);
    ctx.observer.chunk_forward(call.layer, chunk.owner, partial ? &*partial : nullptr);
    if (partial && ctx.hooks.merges_arrived_chunk(s, steps))
      merged = merged ? kernels::lse_merge(*merged, *partial, ctx.options.merge) : *partial;
    if (next.pending()) chunk = unpack(next.wait(), meta, ctx.hooks.owner_at_step(r, s + 1, n));
  }
  auto result = merged ? *merged : empty_partial(q, q.size(2));
  ctx.hooks.finish_output(result, v);
  ctx.observer.pass_end();
  return result;
}

// Streaming backward: the K/V ring is replayed with the next chunk posted before the current one is computed, and the
// dK/dV accumulators travel with their chunks (ring-flash-attention): each holder adds its share to what arrived with
// the chunk and passes it on, and after the last step one exchange takes each accumulator home. The shares of a
// chunk are summed in the order of the collect mode's returns (own first, then rank + 1, + 2, ...), so the same bits.
RingGrads stream_backward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, const Tensor& dout, const kernels::TokenMetadata& meta) {
  ctx.observer.pass_begin(call.layer, "backward");
  const int n = ctx.comm.size(), r = ctx.comm.rank(), steps = steps_of(ctx, call);
  const auto acc = kernels::accumulation_dtype(q.scalar_type());
  auto dq = zeros_like_in(q, acc);
  Chunk chunk{ctx.hooks.owner_at_step(r, 0, n), k, v, meta};
  Tensor dk_acc, dv_acc, dk_own, dv_own;  // the held chunk's accumulators; this rank's share of its own chunk
  PostedExchange arriving_acc;            // the accumulators of the next chunk, from the rank that held it last
  for (int s = 0; s <= steps; ++s) {
    auto next = post_next_chunk(ctx, chunk, s, steps);
    const auto pairs = visit_chunk(ctx, call, meta, chunk, q);
    const bool work = has_work(pairs);
    Tensor dk_share, dv_share;
    if (work) {
      auto g = chunk_backward(ctx, call, q, chunk, out, lse, dout, pairs);
      ctx.observer.chunk_backward(call.layer, chunk.owner, g);
      dq += g.dq;
      dk_share = g.dk.clone(), dv_share = g.dv.clone();  // summed into below; the record keeps the share alone
    } else {
      dk_share = zeros_like_in(chunk.k, acc);
      dv_share = zeros_like_in(chunk.v, acc);
    }
    if (s == 0) dk_own = dk_share, dv_own = dv_share;
    dk_acc = dk_share, dv_acc = dv_share;
    if (arriving_acc.pending()) {
      auto earlier = arriving_acc.wait();
      ctx.hooks.add_returned(dk_acc, earlier[0], k.scalar_type());
      ctx.hooks.add_returned(dv_acc, earlier[1], v.scalar_type());
    }
    if (next.pending()) {
      chunk = unpack(next.wait(), meta, ctx.hooks.owner_at_step(r, s + 1, n));
      if (ctx.hooks.returns_grads()) arriving_acc = post_ring_exchange(ctx, {dk_acc.contiguous(), dv_acc.contiguous()});
    }
  }
  Tensor dk_home = dk_own, dv_home = dv_own;
  if (steps > 0 && ctx.hooks.returns_grads()) {  // the last holder's accumulators go home in one exchange
    const int dst = ctx.hooks.return_destination(r, steps, n), src = ctx.hooks.return_source(r, steps, n);
    ctx.observer.grads_sent_home(chunk.owner, dst);
    auto home = observed_exchange(ctx, {dk_acc.contiguous(), dv_acc.contiguous()}, true,
                                  [&](const auto& send) { return ctx.comm.exchange(send, dst, src); });
    dk_home = home[0], dv_home = home[1];
  } else if (steps == 0) {
    dk_home = dk_acc, dv_home = dv_acc;
  }
  ctx.observer.pass_end();
  return {dq, dk_home, dv_home};
}

kernels::AttentionPartial ring_forward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const kernels::TokenMetadata& meta) {
  const bool stream = ctx.options.mode == RingMode::kStream && ctx.hooks.streams();
  return stream ? stream_forward(ctx, call, q, k, v, meta) : collect_forward(ctx, call, q, k, v, meta);
}

RingGrads ring_backward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& dout, const kernels::TokenMetadata& meta) {
  const bool stream = ctx.options.mode == RingMode::kStream && ctx.hooks.streams();
  return stream ? stream_backward(ctx, call, q, k, v, out, lse, dout, meta)
                : collect_backward(ctx, call, q, k, v, out, lse, dout, meta);
}

// ---- The autograd shell ----

RingContext context_of(RingAttention& ring) {
  return {ring.comm(),       ring.cache(),   ring.compute(), ring.generation(), ring.local_len(),
          ring.sharding(), ring.options(), ring.hooks(),   ring,
          ring.options().mode == RingMode::kStream ? &ring.worker() : nullptr};
}

// One layer's ring attention as an autograd operation. Its backward exchanges with the other ranks, so it runs on
// the thread that called backward() (a rank's own thread), never on a CUDA device's shared autograd worker: ranks
// as threads on one GPU would deadlock there (harness/model/caller_thread_backward.h).
struct RingOp : model::CallerThreadOp {
  RingAttention* ring = nullptr;
  LayerCall call;
  kernels::TokenMetadata meta;  // the query shard's metadata (integer tensors, never differentiated)
  Tensor out, lse;              // the merged result in the accumulation dtype (detached: never the returned tensor)

  variable_list forward(const variable_list& in) override {
    auto merged = ring_forward(context_of(*ring), call, in[0], in[1], in[2], meta);
    out = merged.out.detach(), lse = merged.lse.detach();
    return {merged.out.to(in[0].scalar_type())};
  }

  variable_list backward(const variable_list& in, const variable_list& grad_outputs) override {
    const auto& q = in[0];
    const auto& k = in[1];
    const auto& v = in[2];
    TORCH_CHECK(out.defined(), "ring attention: a second backward through the same forward (retain_graph is not supported)");
    auto g = ring_backward(context_of(*ring), call, q, k, v, out, lse, grad_outputs[0].contiguous(), meta);
    out = lse = Tensor();
    return {g.dq.to(q.scalar_type()), g.dk.to(k.scalar_type()), g.dv.to(v.scalar_type())};
  }
};

}  // namespace

// ---- RingAttention: the backend, its cache, and the observer that records ----

RingAttention::RingAttention(Comm& comm, RingOptions options)
    : comm_(comm), options_(options), hooks_(make_ring_hooks(options.mutation)),
      cache_(kernels::BlockMaskCache::kDefaultCapacity, options.cache_enabled), compute_(options.cuda_attention) {
  compute_.report_to([this](const kernels::BlockMask& mask) { segment_computed(mask.q_range, mask.kv_range); });
}

void RingAttention::begin_batch(uint64_t generation, int64_t local_len, Sharding sharding) {
  if (options_.hop_limit && sharding == Sharding::kZigzag)  // a late sub-chunk's window reaches rank r + 1: cp - 1 steps away
    throw std::invalid_argument("ring attention: the hop limit needs contiguous sharding");
  local_len_ = local_len;
  sharding_ = sharding;
  compute_.new_batch();
  if (generation_set_ && !hooks_->advances_generation()) return;
  generation_ = generation;
  generation_set_ = true;
}

torch::Tensor RingAttention::attend(const model::AttentionInputs& in, const kernels::TokenMetadata& local_meta) {
  TORCH_CHECK(local_len_ == in.q.size(2), fmt::format("ring attention: begin_batch said S_loc = {}, q has {}", local_len_, in.q.size(2)));
  auto op = c10::make_intrusive<RingOp>();
  op->ring = this;
  op->call = {in.geometry, in.scale, in.layer_index};
  op->meta = local_meta;
  return model::apply_on_caller_thread(op, {in.q, in.k, in.v})[0];
}

void RingAttention::pass_begin(int64_t layer, const char* pass) {
  current_ = RingTraceEntry{};
  current_.layer = layer;
  current_.pass = pass;
  pass_start_ = std::chrono::steady_clock::now();
}

void RingAttention::exchange_times(std::chrono::steady_clock::time_point posted, std::chrono::steady_clock::time_point waited) {
  current_.posted_s.push_back(std::chrono::duration<double>(posted - pass_start_).count());
  current_.waited_s.push_back(std::chrono::duration<double>(waited - pass_start_).count());
}

void RingAttention::chunks_held(int chunks) { current_.peak_chunks = std::max<int64_t>(current_.peak_chunks, chunks); }

CommWorker& RingAttention::worker() {
  if (auto why = comm_.other_thread_problem())
    throw CommError("the streaming ring runs exchanges on a background thread, which this " +
                    std::string(backend_name(comm_.backend())) + " Comm cannot allow: " + *why + "; use ring.mode collect",
                    "ring_exchange", comm_.rank());
  if (!worker_) worker_ = std::make_unique<CommWorker>();
  return *worker_;
}

const char* to_string(RingMode mode) { return mode == RingMode::kStream ? "stream" : "collect"; }

void RingAttention::segment_computed(const kernels::TokenRange& q, const kernels::TokenRange& kv) {
  current_.segments.push_back({q.start, q.length, kv.start, kv.length});
}

void RingAttention::chunk(int owner, bool computed) {
  current_.owners.push_back(owner);
  current_.computed.push_back(computed);
}

void RingAttention::chunk_forward(int64_t layer, int owner, const kernels::AttentionPartial* partial) {
  if (!options_.record_chunks) return;
  ChunkRecord rec;
  rec.layer = layer, rec.owner = owner, rec.computed = partial != nullptr;
  if (partial) rec.out = partial->out, rec.lse = partial->lse;
  records_.push_back(rec);
}

void RingAttention::chunk_backward(int64_t layer, int owner, const kernels::ChunkAttentionGrads& g) {
  if (!options_.record_chunks) return;
  // Attach to the forward record of the same layer and owner (the latest one).
  for (auto it = records_.rbegin(); it != records_.rend(); ++it)
    if (it->layer == layer && it->owner == owner) {
      it->dq = g.dq, it->dk = g.dk, it->dv = g.dv;
      return;
    }
}

void RingAttention::grads_sent_home(int owner, int destination) {
  current_.returned.push_back({owner, destination});
}

void RingAttention::exchanged(int64_t bytes, bool grad_return, double wall_s, double cpu_s) {
  current_.bytes_sent += bytes;
  ++(grad_return ? current_.grad_returns : current_.ring_exchanges);
  add_comm_seconds(wall_s, cpu_s);
}

void RingAttention::pass_end() { trace_.push_back(std::move(current_)); }

kernels::LayerGeometry ring_chunk_geometry(const RingOptions& options, int rank, int owner,
                                           const kernels::LayerGeometry& geometry) {
  return make_ring_hooks(options.mutation)->chunk_geometry(rank, owner, geometry);
}

int ring_steps(const RingOptions& options, const kernels::LayerGeometry& geometry, int n, int64_t local_len) {
  if (!options.hop_limit || !geometry.window || geometry.vision_bidirectional || local_len <= 0) return n - 1;
  const int64_t reach = (*geometry.window + local_len - 1) / local_len;  // ceil(W / S_loc), as upstream
  return int(std::min<int64_t>(n - 1, reach));
}

}  // namespace cpharness::cp
