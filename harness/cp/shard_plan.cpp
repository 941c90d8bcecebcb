#include "harness/cp/shard_plan.h"

#include <numeric>
#include <sstream>
#include <stdexcept>

namespace cpharness::cp {

const char* to_string(Sharding sharding) { return sharding == Sharding::kZigzag ? "zigzag" : "contiguous"; }

std::optional<Sharding> sharding_from_string(const std::string& name) {
  if (name == "contiguous") return Sharding::kContiguous;
  if (name == "zigzag") return Sharding::kZigzag;
  return std::nullopt;
}

std::vector<kernels::TokenRange> shard_segments(Sharding sharding, int rank, int cp, int64_t local_len) {
  if (rank < 0 || rank >= cp) throw std::out_of_range("shard_segments: rank " + std::to_string(rank) + " out of range");
  if (sharding == Sharding::kContiguous) return {{rank * local_len, local_len}};
  if (local_len % 2) throw std::invalid_argument("shard_segments: zigzag needs an even S_loc, got " + std::to_string(local_len));
  const int64_t half = local_len / 2;
  return {{rank * half, half}, {(2 * cp - 1 - rank) * half, half}};
}

ShardPlan::ShardPlan(int64_t seq_len, int cp, Sharding sharding, int64_t pad_multiple)
    : seq_len_(seq_len), cp_(cp), sharding_(sharding) {
  if (seq_len < 1) throw std::invalid_argument("ShardPlan: seq_len must be >= 1, got " + std::to_string(seq_len));
  if (cp < 1) throw std::invalid_argument("ShardPlan: cp must be >= 1, got " + std::to_string(cp));
  if (pad_multiple < 1) throw std::invalid_argument("ShardPlan: pad_multiple must be >= 1");
  const int64_t m = std::lcm(static_cast<int64_t>(2 * cp), pad_multiple);
  padded_len_ = (seq_len + m - 1) / m * m;
  local_len_ = padded_len_ / cp;
}

std::vector<kernels::TokenRange> ShardPlan::segments(int rank) const {
  return shard_segments(sharding_, rank, cp_, local_len_);
}

int ShardPlan::owner(int64_t global) const {
  if (global < 0 || global >= padded_len_) throw std::out_of_range("ShardPlan: global index out of range");
  for (int r = 0; r < cp_; ++r)
    for (auto& s : segments(r))
      if (global >= s.start && global < s.end()) return r;
  throw std::logic_error("ShardPlan: no rank owns a global index");  // unreachable: the segments tile [0, S_pad)
}

int64_t ShardPlan::global_index(int rank, int64_t local) const {
  if (local < 0 || local >= local_len_) throw std::out_of_range("ShardPlan: local index out of range");
  for (auto& s : segments(rank)) {
    if (local < s.length) return s.start + local;
    local -= s.length;
  }
  throw std::logic_error("ShardPlan: segments shorter than S_loc");  // unreachable
}

int64_t ShardPlan::valid_tokens(int rank) const {
  int64_t n = 0;
  for (auto& s : segments(rank)) n += std::max<int64_t>(0, std::min(s.end(), seq_len_) - s.start);
  return n;
}

at::Tensor ShardPlan::global_indices(int rank) const {
  std::vector<at::Tensor> parts;
  for (auto& s : segments(rank)) parts.push_back(at::arange(s.start, s.end(), at::kLong));
  return at::cat(parts);
}

void ShardPlan::check_dim(const at::Tensor& t, int64_t dim, int64_t expect, const char* what) const {
  if (!t.defined()) throw std::invalid_argument(std::string("ShardPlan::") + what + ": undefined tensor");
  if (dim < 0 || dim >= t.dim() || t.size(dim) != expect) {
    std::ostringstream os;
    os << "ShardPlan::" << what << ": tensor " << t.sizes() << " must have length " << expect << " on dim " << dim;
    throw std::invalid_argument(os.str());
  }
}

at::Tensor ShardPlan::pad(const at::Tensor& t, const at::Scalar& value, int64_t dim) const {
  check_dim(t, dim, seq_len_, "pad");
  if (pad_len() == 0) return t.contiguous();
  auto sizes = t.sizes().vec();
  sizes[static_cast<size_t>(dim)] = pad_len();
  return at::cat({t, at::full(sizes, value, t.options())}, dim);
}

at::Tensor ShardPlan::pad_positions(const at::Tensor& pos, int64_t dim) const {
  check_dim(pos, dim, seq_len_, "pad_positions");
  if (pad_len() == 0) return pos.contiguous();
  auto last = pos.narrow(dim, seq_len_ - 1, 1);  // [..., 1, ...]
  std::vector<int64_t> shape(static_cast<size_t>(pos.dim()), 1);
  shape[static_cast<size_t>(dim)] = pad_len();
  auto steps = at::arange(1, pad_len() + 1, pos.options()).view(shape);
  return at::cat({pos, last + steps}, dim);
}

at::Tensor ShardPlan::shard(const at::Tensor& padded, int rank, int64_t dim) const {
  check_dim(padded, dim, padded_len_, "shard");
  std::vector<at::Tensor> parts;
  for (auto& s : segments(rank)) parts.push_back(padded.narrow(dim, s.start, s.length));
  return parts.size() == 1 ? parts.front().contiguous() : at::cat(parts, dim);
}

std::vector<at::Tensor> ShardPlan::shard_all(const at::Tensor& padded, int64_t dim) const {
  std::vector<at::Tensor> out;
  for (int r = 0; r < cp_; ++r) out.push_back(shard(padded, r, dim));
  return out;
}

at::Tensor ShardPlan::unshard(const std::vector<at::Tensor>& per_rank, int64_t dim, bool crop_pad) const {
  if (static_cast<int>(per_rank.size()) != cp_)
    throw std::invalid_argument("ShardPlan::unshard: " + std::to_string(per_rank.size()) + " shards for cp " +
                                std::to_string(cp_));
  check_dim(per_rank[0], dim, local_len_, "unshard");
  auto sizes = per_rank[0].sizes().vec();
  sizes[static_cast<size_t>(dim)] = padded_len_;
  auto out = at::empty(sizes, per_rank[0].options());
  for (int r = 0; r < cp_; ++r) {
    const auto& t = per_rank[static_cast<size_t>(r)];
    check_dim(t, dim, local_len_, "unshard");
    if (t.sizes() != per_rank[0].sizes() || t.scalar_type() != per_rank[0].scalar_type())
      throw std::invalid_argument("ShardPlan::unshard: shards differ in shape or dtype");
    out.index_copy_(dim, global_indices(r).to(t.device()), t);
  }
  return crop_pad ? crop(out, dim) : out;
}

at::Tensor ShardPlan::crop(const at::Tensor& padded, int64_t dim) const {
  check_dim(padded, dim, padded_len_, "crop");
  return padded.narrow(dim, 0, seq_len_).contiguous();
}

TokenBatch prepare_cp_batch(const TokenBatch& b, const ShardPlan& plan, int64_t pad_id) {
  if (!b.input_ids.defined() && !b.inputs_embeds.defined())
    throw std::invalid_argument("prepare_cp_batch: need input_ids or inputs_embeds");
  const auto& ref = b.input_ids.defined() ? b.input_ids : b.inputs_embeds;
  const int64_t bsz = ref.size(0), s = ref.size(1);
  if (s != plan.seq_len())
    throw std::invalid_argument("prepare_cp_batch: sequence length " + std::to_string(s) + " != plan " +
                                std::to_string(plan.seq_len()));
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(ref.device());
  TokenBatch out;
  auto padc = [&](const at::Tensor& t, const at::Scalar& v) { return t.defined() ? plan.pad(t, v, 1) : at::Tensor(); };

  out.input_ids = padc(b.input_ids, pad_id);
  if (b.labels.defined()) out.labels = plan.pad(b.labels_shifted ? b.labels : shift_labels(b.labels), kIgnoreIndex, 1);
  out.labels_shifted = true;
  const auto pmask = b.padding_mask.defined() ? b.padding_mask.to(at::kBool)
                                              : at::zeros({bsz, s}, long_opts.dtype(at::kBool));
  out.padding_mask = plan.pad(pmask, true, 1);
  const auto docs = b.document_ids.defined() ? b.document_ids : pmask.logical_not().to(at::kLong);
  out.document_ids = plan.pad(docs, 0, 1);
  out.vision_group_ids = padc(b.vision_group_ids, -1);
  out.token_type_ids = padc(b.token_type_ids, 0);
  const auto pos = b.position_ids.defined() ? b.position_ids : at::arange(s, long_opts).unsqueeze(0).expand({bsz, s});
  out.position_ids = plan.pad_positions(pos.dim() == 2 && pos.size(0) == 1 ? pos.expand({bsz, s}) : pos, 1);
  out.loss_mask = padc(b.loss_mask, 0);
  out.per_layer_inputs = padc(b.per_layer_inputs, 0);
  out.inputs_embeds = padc(b.inputs_embeds, 0);
  return out;
}

TokenBatch shard_batch(const TokenBatch& p, const ShardPlan& plan, int rank) {
  auto sh = [&](const at::Tensor& t) { return t.defined() ? plan.shard(t, rank, 1) : at::Tensor(); };
  TokenBatch out;
  out.input_ids = sh(p.input_ids);
  out.labels = sh(p.labels);
  out.padding_mask = sh(p.padding_mask);
  out.document_ids = sh(p.document_ids);
  out.vision_group_ids = sh(p.vision_group_ids);
  out.token_type_ids = sh(p.token_type_ids);
  out.position_ids = sh(p.position_ids);
  out.loss_mask = sh(p.loss_mask);
  out.per_layer_inputs = sh(p.per_layer_inputs);
  out.inputs_embeds = sh(p.inputs_embeds);
  out.labels_shifted = p.labels_shifted;
  return out;
}

}  // namespace cpharness::cp
