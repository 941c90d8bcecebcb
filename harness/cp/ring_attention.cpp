#include "harness/cp/ring_attention.h"

#include <fmt/format.h>

#include "harness/cp/shard_plan.h"
#include "kernels/chunk_attention.h"

namespace cpharness::cp {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One K/V chunk as it travels: K, V and the owner's metadata (bool padding goes as uint8).
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

// Own chunk first, then cp - 1 rotations: at step s this rank holds the chunk of rank (r - s) mod cp.
std::vector<Chunk> collect_chunks(RingAttention& ring, const Tensor& k, const Tensor& v,
                                  const kernels::TokenMetadata& meta, RingTraceEntry& entry) {
  Comm& comm = ring.comm();
  std::vector<Chunk> chunks = {{ring.owner_at_step(0), k, v, meta}};
  auto travelling = pack(chunks.front());
  for (int s = 1; s < comm.size(); ++s) {
    entry.bytes_sent += bytes_of(travelling);
    {
      CommTimer timer(ring);
      travelling = comm.ring_exchange(travelling);
    }
    ++entry.ring_exchanges;
    chunks.push_back(unpack(travelling, meta, ring.owner_at_step(s)));
  }
  return chunks;
}

std::shared_ptr<const kernels::BlockMask> mask_for(RingAttention& ring, const kernels::TokenMetadata& q_meta,
                                                   const Chunk& chunk, const kernels::LayerGeometry& geometry,
                                                   int64_t batch, const torch::Device& device) {
  const int64_t S = ring.local_len();
  const kernels::TokenRange q_range{ring.comm().rank() * S, S}, kv_range{chunk.owner * S, S};
  const auto& o = ring.options();
  return ring.cache().lookup(ring.generation(), q_meta, chunk.meta, q_range, kv_range,
                             ring.chunk_geometry(chunk.owner, geometry), batch, o.q_block, o.kv_block, device);
}

bool has_work(const kernels::BlockMask& mask) { return kernels::computed_score_elements(mask) > 0; }

kernels::TokenMetadata meta_from(const variable_list& saved, size_t first) {
  kernels::TokenMetadata m;
  auto pick = [&](size_t i) { return saved.at(i).numel() > 0 ? saved.at(i) : Tensor(); };
  m.document_ids = pick(first);
  m.padding = pick(first + 1);
  m.vision_group_ids = pick(first + 2);
  return m;
}

Tensor or_empty(const Tensor& t) { return t.defined() ? t : torch::empty({0}); }

struct RingFunction : public torch::autograd::Function<RingFunction> {
  static Tensor forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, RingAttention* ring,
                        kernels::LayerGeometry geometry, double scale, int64_t layer, kernels::TokenMetadata meta) {
    RingTraceEntry entry;
    entry.layer = layer;
    entry.pass = "forward";
    auto chunks = collect_chunks(*ring, k, v, meta, entry);
    std::vector<kernels::AttentionPartial> partials;
    for (auto& chunk : chunks) {
      auto mask = mask_for(*ring, meta, chunk, geometry, q.size(0), q.device());
      const bool work = has_work(*mask);
      entry.owners.push_back(chunk.owner);
      entry.computed.push_back(work);
      if (work) partials.push_back(kernels::chunk_attention_forward(q, chunk.k, chunk.v, *mask, scale));
      if (ring->options().record_chunks) {
        ChunkRecord rec;
        rec.layer = layer, rec.owner = chunk.owner, rec.computed = work;
        if (work) rec.out = partials.back().out, rec.lse = partials.back().lse;
        ring->records().push_back(rec);
      }
    }
    const auto acc = kernels::accumulation_dtype(q.scalar_type());
    kernels::AttentionPartial merged;
    if (partials.empty()) {
      merged = {torch::zeros(q.sizes(), q.options().dtype(acc)),
                torch::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc))};
    } else {
      merged = kernels::lse_merge(partials, ring->options().merge);
    }
    if (ring->options().mutation == RingMutation::kPaddedRowsNotZeroed) {
      auto fill = v.select(2, 0).repeat_interleave(q.size(1) / v.size(1), 1).unsqueeze(2).to(merged.out.scalar_type());
      merged.out = torch::where(torch::isinf(merged.lse).unsqueeze(-1), fill.expand_as(merged.out), merged.out);
    }
    ring->trace().push_back(std::move(entry));
    ctx->save_for_backward({q, k, v, merged.out, merged.lse, or_empty(meta.document_ids), or_empty(meta.padding),
                            or_empty(meta.vision_group_ids)});
    ctx->saved_data["ring"] = reinterpret_cast<int64_t>(ring);
    ctx->saved_data["window"] = geometry.window ? *geometry.window : int64_t(-1);
    ctx->saved_data["causal"] = geometry.causal;
    ctx->saved_data["vision"] = geometry.vision_bidirectional;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["layer"] = layer;
    return merged.out.to(q.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto q = saved[0], k = saved[1], v = saved[2], out = saved[3], lse = saved[4];
    auto meta = meta_from(saved, 5);
    auto* ring = reinterpret_cast<RingAttention*>(ctx->saved_data["ring"].toInt());
    const int64_t window = ctx->saved_data["window"].toInt();
    kernels::LayerGeometry geometry{ctx->saved_data["causal"].toBool(),
                                    window >= 0 ? std::optional<int64_t>(window) : std::nullopt,
                                    ctx->saved_data["vision"].toBool()};
    const double scale = ctx->saved_data["scale"].toDouble();
    Comm& comm = ring->comm();
    const int n = comm.size(), r = comm.rank();
    RingTraceEntry entry;
    entry.layer = ctx->saved_data["layer"].toInt();
    entry.pass = "backward";
    // Recompute: replay the ring to get every chunk back (nothing was kept from the forward).
    auto chunks = collect_chunks(*ring, k, v, meta, entry);
    auto dout = grad_outputs[0].contiguous();
    const auto acc = kernels::accumulation_dtype(q.scalar_type());
    auto dq = torch::zeros(q.sizes(), q.options().dtype(acc));
    std::vector<Tensor> dk(n), dv(n);  // by ring step
    for (int s = 0; s < n; ++s) {
      auto& chunk = chunks[s];
      auto mask = mask_for(*ring, meta, chunk, geometry, q.size(0), q.device());
      const bool work = has_work(*mask);
      entry.owners.push_back(chunk.owner);
      entry.computed.push_back(work);
      if (work) {
        auto g = kernels::chunk_attention_backward(q, chunk.k, chunk.v, out, lse, dout, *mask, scale);
        dq += g.dq;
        dk[s] = g.dk;
        dv[s] = g.dv;
        if (ring->options().record_chunks) {
          // Attach to the forward record of the same layer and owner (the latest one).
          for (auto it = ring->records().rbegin(); it != ring->records().rend(); ++it)
            if (it->layer == entry.layer && it->owner == chunk.owner) {
              it->dq = g.dq, it->dk = g.dk, it->dv = g.dv;
              break;
            }
        }
      } else {
        dk[s] = torch::zeros(chunk.k.sizes(), chunk.k.options().dtype(acc));
        dv[s] = torch::zeros(chunk.v.sizes(), chunk.v.options().dtype(acc));
      }
    }
    // Own chunk's dK/dV stay here; the chunk held at step d belongs to rank r - d: send it home, and receive
    // ours from rank r + d, which held it at its step d. Accumulated in fp32 (fp64 for fp64 runs).
    auto dk_home = dk[0].clone(), dv_home = dv[0].clone();
    for (int d = 1; d < n; ++d) {
      if (ring->options().mutation == RingMutation::kDropGradReturn) break;
      const int dst = ring_owner(r, d, n), src = ring_owner(r, -d, n);
      std::vector<Tensor> send = {dk[d].contiguous(), dv[d].contiguous()};
      entry.bytes_sent += bytes_of(send);
      std::vector<Tensor> received;
      {
        CommTimer timer(*ring);
        received = comm.exchange(send, dst, src);
      }
      ++entry.grad_returns;
      dk_home += received[0];
      dv_home += received[1];
    }
    ring->trace().push_back(std::move(entry));
    return {dq.to(q.scalar_type()), dk_home.to(k.scalar_type()), dv_home.to(v.scalar_type()),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

RingAttention::RingAttention(Comm& comm, RingOptions options)
    : comm_(comm), options_(options), cache_(kernels::BlockMaskCache::kDefaultCapacity, options.cache_enabled) {}

void RingAttention::begin_batch(uint64_t generation, int64_t local_len) {
  local_len_ = local_len;
  if (options_.mutation == RingMutation::kStaleGeneration && generation_frozen_) return;
  generation_ = generation;
  generation_frozen_ = true;
}

kernels::LayerGeometry ring_chunk_geometry(const RingOptions& options, int rank, int owner,
                                           const kernels::LayerGeometry& geometry) {
  auto g = geometry;
  if (options.mutation == RingMutation::kWindowOffByOneAtEdge && owner != rank && g.window) *g.window += 1;
  return g;
}

kernels::LayerGeometry RingAttention::chunk_geometry(int owner, const kernels::LayerGeometry& geometry) const {
  return ring_chunk_geometry(options_, comm_.rank(), owner, geometry);
}

int RingAttention::owner_at_step(int step) const {
  const int n = comm_.size(), r = comm_.rank();
  const int s = options_.mutation == RingMutation::kReverseRotation ? -step : step;
  return ring_owner(r, s, n);
}

torch::Tensor RingAttention::attend(const model::AttentionInputs& in, const kernels::TokenMetadata& local_meta) {
  TORCH_CHECK(local_len_ == in.q.size(2), fmt::format("ring attention: begin_batch said S_loc = {}, q has {}", local_len_, in.q.size(2)));
  return RingFunction::apply(in.q, in.k, in.v, this, in.geometry, in.scale, in.layer_index, local_meta);
}

}  // namespace cpharness::cp
