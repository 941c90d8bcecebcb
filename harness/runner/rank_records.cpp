#include "harness/runner/rank_records.h"

#include <torch/serialize.h>

#include <nlohmann/json.hpp>

namespace cpharness::runner {
namespace {

using nlohmann::json;

json counters_json(const kernels::BlockMaskCacheCounters& k) {
  return {k.lookups, k.builds, k.hits, k.evictions, k.resets};
}

kernels::BlockMaskCacheCounters counters_of(const json& j) {
  return {j.at(0).get<int64_t>(), j.at(1).get<int64_t>(), j.at(2).get<int64_t>(), j.at(3).get<int64_t>(), j.at(4).get<int64_t>()};
}

// [owner, sent_to] per dK/dV return.
json grad_returns_json(const std::vector<cp::RingTraceEntry::GradReturn>& returned) {
  json j = json::array();
  for (auto& g : returned) j.push_back({g.owner, g.sent_to});
  return j;
}

json small_fields(const CpRankRecord& r) {
  json j;
  j["rank"] = r.rank;
  for (auto& s : r.steps)
    j["steps"].push_back({s.loss, s.grad_norm, s.param_norm, s.counted_tokens, s.seconds, s.peak_allocated, s.peak_reserved});
  for (auto& k : r.cache) j["cache"].push_back(counters_json(k));
  for (auto& e : r.trace)
    j["trace"].push_back({{"layer", e.layer}, {"pass", e.pass}, {"owners", e.owners}, {"computed", e.computed},
                          {"ring_exchanges", e.ring_exchanges}, {"grad_returns", e.grad_returns}, {"bytes_sent", e.bytes_sent},
                          {"peak_chunks", e.peak_chunks}, {"posted_s", e.posted_s}, {"waited_s", e.waited_s},
                          {"returned", grad_returns_json(e.returned)}, {"segments", e.segments}});
  j["comm"] = {r.comm_step0.calls, r.comm_step0.tensors_sent, r.comm_step0.bytes_sent};
  j["gradient_all_reduces"] = r.gradient_all_reduces;
  j["token_index"] = r.token_index;
  return j;
}

c10::Dict<std::string, torch::Tensor> dict_of(const std::map<std::string, torch::Tensor>& m) {
  c10::Dict<std::string, torch::Tensor> d;
  for (auto& [k, v] : m) d.insert(k, v);
  return d;
}

std::map<std::string, torch::Tensor> map_of(const c10::IValue& v) {
  std::map<std::string, torch::Tensor> m;
  for (auto& e : v.toGenericDict()) m[e.key().toStringRef()] = e.value().toTensor();
  return m;
}

}  // namespace

std::vector<char> encode_rank_record(const CpRankRecord& r) {
  c10::List<torch::Tensor> hidden;
  for (auto& h : r.hidden) hidden.push_back(h);
  std::vector<c10::IValue> items{c10::IValue(small_fields(r).dump()),
                                 r.logits.defined() ? c10::IValue(r.logits) : c10::IValue(),
                                 c10::IValue(hidden), c10::IValue(dict_of(r.grads)), c10::IValue(dict_of(r.final_params)),
                                 c10::IValue(dict_of(r.local_grads))};
  return torch::pickle_save(c10::ivalue::Tuple::create(std::move(items)));
}

CpRankRecord decode_rank_record(const std::vector<char>& bytes) {
  const auto value = torch::pickle_load(bytes);
  const auto& items = value.toTupleRef().elements();
  if (items.size() != 6) throw std::runtime_error("rank record: expected 6 fields");
  const auto j = json::parse(items[0].toStringRef());
  CpRankRecord r;
  r.rank = j.at("rank").get<int>();
  for (auto& s : j.value("steps", json::array()))
    r.steps.push_back({s.at(0).get<double>(), s.at(1).get<double>(), s.at(2).get<double>(), s.at(3).get<int64_t>(),
                       s.at(4).get<double>(), s.at(5).get<int64_t>(), s.at(6).get<int64_t>()});
  for (auto& k : j.value("cache", json::array())) r.cache.push_back(counters_of(k));
  for (auto& e : j.value("trace", json::array())) {
    cp::RingTraceEntry t;
    t.layer = e.at("layer").get<int64_t>();
    t.pass = e.at("pass").get<std::string>();
    t.owners = e.at("owners").get<std::vector<int>>();
    t.computed = e.at("computed").get<std::vector<bool>>();
    t.ring_exchanges = e.at("ring_exchanges").get<int64_t>();
    t.grad_returns = e.at("grad_returns").get<int64_t>();
    for (auto& g : e.at("returned")) t.returned.push_back({g.at(0).get<int>(), g.at(1).get<int>()});
    t.bytes_sent = e.at("bytes_sent").get<int64_t>();
    t.peak_chunks = e.at("peak_chunks").get<int64_t>();
    t.posted_s = e.at("posted_s").get<std::vector<double>>();
    t.waited_s = e.at("waited_s").get<std::vector<double>>();
    t.segments = e.at("segments").get<std::vector<std::array<int64_t, 4>>>();
    r.trace.push_back(std::move(t));
  }
  const auto& c = j.at("comm");
  r.comm_step0.calls = c.at(0).get<std::array<int64_t, cp::kNumCommOps>>();
  r.comm_step0.tensors_sent = c.at(1).get<std::array<int64_t, cp::kNumCommOps>>();
  r.comm_step0.bytes_sent = c.at(2).get<std::array<int64_t, cp::kNumCommOps>>();
  r.gradient_all_reduces = j.at("gradient_all_reduces").get<int64_t>();
  r.token_index = j.value("token_index", std::vector<int64_t>{});
  if (!items[1].isNone()) r.logits = items[1].toTensor();
  for (const auto& h : items[2].toTensorList()) r.hidden.push_back(h);
  r.grads = map_of(items[3]);
  r.final_params = map_of(items[4]);
  r.local_grads = map_of(items[5]);
  return r;
}

std::vector<CpRankRecord> gather_rank_records(cp::Comm& comm, const CpRankRecord& mine) {
  std::vector<CpRankRecord> all;
  const auto encoded = comm.rank() == 0 ? std::vector<char>{} : encode_rank_record(mine);
  for (int src = 0; src < comm.size(); ++src) {
    if (src == 0) {
      if (comm.rank() == 0) all.push_back(mine);
      continue;
    }
    // Length first, then the bytes; every rank takes part in each broadcast (only rank 0 keeps them).
    auto length = torch::tensor({int64_t(comm.rank() == src ? encoded.size() : 0)}, torch::kInt64);
    comm.broadcast(length, src);
    auto bytes = torch::empty({length.item<int64_t>()}, torch::kUInt8);
    if (comm.rank() == src) std::memcpy(bytes.data_ptr(), encoded.data(), encoded.size());
    comm.broadcast(bytes, src);
    if (comm.rank() == 0) {
      std::vector<char> buf(size_t(bytes.numel()));
      std::memcpy(buf.data(), bytes.data_ptr(), buf.size());
      all.push_back(decode_rank_record(buf));
    }
  }
  return all;
}

}  // namespace cpharness::runner
