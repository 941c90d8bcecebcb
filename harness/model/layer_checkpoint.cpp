#include "harness/model/layer_checkpoint.h"

#include "harness/model/caller_thread_backward.h"
#include "harness/model/gemma4.h"

namespace cpharness::model {
namespace {

using torch::Tensor;
using torch::autograd::variable_list;

Tensor leaf(const Tensor& t) { return t.defined() ? t.detach().requires_grad_(t.requires_grad()) : t; }

// One checkpointed layer as an autograd operation: forward keeps only the inputs (the caller saves them), backward
// recomputes the layer and backpropagates through the recompute. The recompute runs the attention backend's forward
// again, which may block on other threads (a ring between ranks), so the backward runs on the thread that called
// backward() (caller_thread_backward.h says why that matters on CUDA).
struct LayerCall : CallerThreadOp {
  Gemma4DecoderLayerImpl* layer = nullptr;
  int64_t index = 0, source = -1;
  bool shares = false;        // the forward had a K/V store
  bool kv_out = false;        // kKvHolder source: K and V are outputs
  KvPair constant_kv;         // kLayerOnly consumer: the K/V read in forward, without their graph
  Tensor cos, sin;
  kernels::TokenMetadata meta;
  AttentionBackend* backend = nullptr;

  // inputs: h, the per-layer input, the source's K and V (a kKvHolder consumer's; each undefined when absent).
  variable_list forward(const variable_list& in) override { return run_layer(in[0], in[1], in[2], in[3]); }

  variable_list backward(const variable_list& in, const variable_list& grads) override {
    auto h = leaf(in[0]), ple = leaf(in[1]), k = leaf(in[2]), v = leaf(in[3]);
    torch::AutoGradMode grad_mode(true);
    auto outputs = run_layer(h, ple, k, v);
    variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i)
      if (grads[i].defined() && outputs[i].requires_grad()) roots.push_back(outputs[i]), root_grads.push_back(grads[i]);
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);  // parameter gradients accumulate here
    auto grad_of = [](const Tensor& t) { return t.defined() && t.requires_grad() ? t.grad() : Tensor(); };
    return {grad_of(h), grad_of(ple), grad_of(k), grad_of(v)};
  }

  // The layer on `h` with a store of its own: the source's K/V when given (consumer), this layer's K/V when it stores.
  variable_list run_layer(const Tensor& h, const Tensor& ple, const Tensor& k_in, const Tensor& v_in) const {
    KvStore store;
    if (k_in.defined()) store[source] = {k_in, v_in};
    else if (constant_kv.first.defined()) store[source] = constant_kv;
    auto out = layer->forward(h, cos, sin, ple, meta, *backend, shares ? &store : nullptr);
    variable_list result{out};
    if (kv_out) result.push_back(store.at(index).first), result.push_back(store.at(index).second);
    return result;
  }
};

}  // namespace

const char* to_string(ActivationCheckpointing mode) {
  switch (mode) {
    case ActivationCheckpointing::kOff: return "off";
    case ActivationCheckpointing::kKvHolder: return "kv_holder";
    case ActivationCheckpointing::kLayerOnly: return "layer_only";
  }
  return "off";
}

std::optional<ActivationCheckpointing> activation_checkpointing_from_string(const std::string& name) {
  for (auto mode : {ActivationCheckpointing::kOff, ActivationCheckpointing::kKvHolder, ActivationCheckpointing::kLayerOnly})
    if (name == to_string(mode)) return mode;
  return std::nullopt;
}

Tensor checkpointed_layer(ActivationCheckpointing mode, Gemma4DecoderLayerImpl& layer, int64_t index, const Tensor& h,
                          const Tensor& cos, const Tensor& sin, const Tensor& per_layer_input,
                          const kernels::TokenMetadata& meta, AttentionBackend& backend, KvStore* store, int64_t source,
                          bool stores_kv) {
  auto call = c10::make_intrusive<LayerCall>();
  call->layer = &layer, call->index = index, call->shares = store != nullptr;
  call->cos = cos, call->sin = sin, call->meta = meta, call->backend = &backend;
  Tensor k_in, v_in;
  const bool consumer = store && source >= 0 && source != index && store->count(source);
  if (consumer) {
    call->source = source;
    if (mode == ActivationCheckpointing::kKvHolder) std::tie(k_in, v_in) = store->at(source);
    else call->constant_kv = {store->at(source).first.detach(), store->at(source).second.detach()};
  }
  call->kv_out = store && stores_kv;  // both modes compute them; only kKvHolder lets them out with a graph
  auto outputs = apply_on_caller_thread(call, {h, per_layer_input, k_in, v_in});
  if (call->kv_out) {
    if (mode == ActivationCheckpointing::kKvHolder) (*store)[index] = {outputs[1], outputs[2]};
    else (*store)[index] = {outputs[1].detach(), outputs[2].detach()};  // as the plain checkpoint leaves them
  }
  return outputs[0];
}

}  // namespace cpharness::model
