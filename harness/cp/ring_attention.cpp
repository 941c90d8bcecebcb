#include "harness/cp/ring_attention.h"

#include <fmt/format.h>

#include "harness/cp/shard_plan.h"

namespace cpharness::cp {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
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
  int64_t local_len;  // S_loc: rank r's tokens are [r * S_loc, (r + 1) * S_loc)
  const RingOptions& options;
  const RingHooks& hooks;
  RingObserver& observer;
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
  ctx.observer.exchanged(bytes_of(send), grad_return,
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count(),
                         thread_cpu_seconds() - cpu0);
  return received;
}

// Own chunk first, then `steps` rotations (cp - 1, or fewer under the hop limit): at step s this rank holds the
// chunk of rank (r - s) mod cp.
std::vector<Chunk> collect_chunks(const RingContext& ctx, int steps, const Tensor& k, const Tensor& v,
                                  const kernels::TokenMetadata& meta) {
  const int n = ctx.comm.size(), r = ctx.comm.rank();
  std::vector<Chunk> chunks = {{ctx.hooks.owner_at_step(r, 0, n), k, v, meta}};
  auto travelling = pack(chunks.front());
  for (int s = 1; s <= steps; ++s) {
    travelling = observed_exchange(ctx, travelling, false, [&](const auto& send) { return ctx.comm.ring_exchange(send); });
    chunks.push_back(unpack(travelling, meta, ctx.hooks.owner_at_step(r, s, n)));
  }
  return chunks;
}

// The block mask of this rank's queries against `chunk`, from the cache.
std::shared_ptr<const kernels::BlockMask> mask_for(const RingContext& ctx, const LayerCall& call,
                                                   const kernels::TokenMetadata& q_meta, const Chunk& chunk,
                                                   const Tensor& q) {
  const int64_t S = ctx.local_len;
  const int r = ctx.comm.rank();
  const kernels::TokenRange q_range{r * S, S}, kv_range{chunk.owner * S, S};
  return ctx.cache.lookup(ctx.generation, q_meta, chunk.meta, q_range, kv_range,
                          ctx.hooks.chunk_geometry(r, chunk.owner, call.geometry), q.size(0), ctx.options.q_block,
                          ctx.options.kv_block, q.device());
}

bool has_work(const kernels::BlockMask& mask) { return kernels::computed_score_elements(mask) > 0; }

int steps_of(const RingContext& ctx, const LayerCall& call) {
  const int n = ctx.comm.size();
  return ctx.hooks.ring_steps(ring_steps(ctx.options, call.geometry, n, ctx.local_len), n);
}

// Forward: every chunk's partial out/LSE, merged by log-sum-exp; rows with no allowed key anywhere are 0, -inf.
// Returns the merged result in the accumulation dtype.
kernels::AttentionPartial ring_forward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const kernels::TokenMetadata& meta) {
  ctx.observer.pass_begin(call.layer, "forward");
  std::vector<kernels::AttentionPartial> partials;
  for (auto& chunk : collect_chunks(ctx, steps_of(ctx, call), k, v, meta)) {
    const auto mask = mask_for(ctx, call, meta, chunk, q);
    const bool work = has_work(*mask);
    ctx.observer.chunk(chunk.owner, work);
    if (work) partials.push_back(ctx.compute.forward(q, chunk.k, chunk.v, mask, call.scale));
    ctx.observer.chunk_forward(call.layer, chunk.owner, work ? &partials.back() : nullptr);
  }
  const auto acc = q.options().dtype(kernels::accumulation_dtype(q.scalar_type()));
  kernels::AttentionPartial merged =
      partials.empty() ? kernels::AttentionPartial{torch::zeros(q.sizes(), acc),
                                                   torch::full({q.size(0), q.size(1), q.size(2)},
                                                               -std::numeric_limits<double>::infinity(), acc)}
                       : kernels::lse_merge(partials, ctx.options.merge);
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
RingGrads ring_backward(const RingContext& ctx, const LayerCall& call, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& dout, const kernels::TokenMetadata& meta) {
  ctx.observer.pass_begin(call.layer, "backward");
  const int n = ctx.comm.size(), r = ctx.comm.rank();
  const auto acc = kernels::accumulation_dtype(q.scalar_type());
  auto chunks = collect_chunks(ctx, steps_of(ctx, call), k, v, meta);
  const int held = int(chunks.size());
  auto dq = torch::zeros(q.sizes(), q.options().dtype(acc));
  std::vector<Tensor> dk(held), dv(held);  // by ring step
  for (int s = 0; s < held; ++s) {
    const auto& chunk = chunks[size_t(s)];
    const auto mask = mask_for(ctx, call, meta, chunk, q);
    const bool work = has_work(*mask);
    ctx.observer.chunk(chunk.owner, work);
    if (!work) {
      dk[s] = torch::zeros(chunk.k.sizes(), chunk.k.options().dtype(acc));
      dv[s] = torch::zeros(chunk.v.sizes(), chunk.v.options().dtype(acc));
      continue;
    }
    auto g = ctx.compute.backward(q, chunk.k, chunk.v, out, lse, dout, mask, call.scale);
    ctx.observer.chunk_backward(call.layer, chunk.owner, g);
    dq += g.dq;
    dk[s] = g.dk;
    dv[s] = g.dv;
  }
  auto dk_home = dk[0].clone(), dv_home = dv[0].clone();
  for (int d = 1; d < held && ctx.hooks.returns_grads(); ++d) {
    const int dst = ring_owner(r, d, n), src = ring_owner(r, -d, n);
    auto received = observed_exchange(ctx, {dk[d].contiguous(), dv[d].contiguous()}, true,
                                      [&](const auto& send) { return ctx.comm.exchange(send, dst, src); });
    ctx.hooks.add_returned(dk_home, received[0], k.scalar_type());
    ctx.hooks.add_returned(dv_home, received[1], v.scalar_type());
  }
  ctx.observer.pass_end();
  return {dq, dk_home, dv_home};
}

// ---- The autograd shell ----

// What the backward needs besides saved tensors: the ring it ran on, the layer's call and the query metadata
// (integer tensors, never differentiated).
struct SavedCall : torch::CustomClassHolder {
  RingAttention* ring = nullptr;
  LayerCall call;
  kernels::TokenMetadata meta;
};

RingContext context_of(RingAttention& ring) {
  return {ring.comm(), ring.cache(), ring.compute(), ring.generation(), ring.local_len(), ring.options(), ring.hooks(), ring};
}

struct RingFunction : public torch::autograd::Function<RingFunction> {
  static Tensor forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, c10::intrusive_ptr<SavedCall> call) {
    auto merged = ring_forward(context_of(*call->ring), call->call, q, k, v, call->meta);
    ctx->save_for_backward({q, k, v, merged.out, merged.lse});
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    return merged.out.to(q.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto call = c10::static_intrusive_pointer_cast<SavedCall>(ctx->saved_data["call"].toCapsule());
    const auto& q = saved[0];
    const auto& k = saved[1];
    const auto& v = saved[2];
    auto g = ring_backward(context_of(*call->ring), call->call, q, k, v, saved[3], saved[4], grad_outputs[0].contiguous(),
                           call->meta);
    return {g.dq.to(q.scalar_type()), g.dk.to(k.scalar_type()), g.dv.to(v.scalar_type()), Tensor()};
  }
};

}  // namespace

// ---- RingAttention: the backend, its cache, and the observer that records ----

RingAttention::RingAttention(Comm& comm, RingOptions options)
    : comm_(comm), options_(options), hooks_(make_ring_hooks(options.mutation)),
      cache_(kernels::BlockMaskCache::kDefaultCapacity, options.cache_enabled), compute_(options.cuda_attention) {}

void RingAttention::begin_batch(uint64_t generation, int64_t local_len) {
  local_len_ = local_len;
  compute_.new_batch();
  if (generation_set_ && !hooks_->advances_generation()) return;
  generation_ = generation;
  generation_set_ = true;
}

torch::Tensor RingAttention::attend(const model::AttentionInputs& in, const kernels::TokenMetadata& local_meta) {
  TORCH_CHECK(local_len_ == in.q.size(2), fmt::format("ring attention: begin_batch said S_loc = {}, q has {}", local_len_, in.q.size(2)));
  auto call = c10::make_intrusive<SavedCall>();
  call->ring = this;
  call->call = {in.geometry, in.scale, in.layer_index};
  call->meta = local_meta;
  return RingFunction::apply(in.q, in.k, in.v, call);
}

void RingAttention::pass_begin(int64_t layer, const char* pass) {
  current_ = RingTraceEntry{};
  current_.layer = layer;
  current_.pass = pass;
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
