#include "harness/model/chunked_loss.h"

namespace cpharness::model {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One chunk's summed cross entropy, op for op as the plain path: logits in the model dtype, softcap in that dtype,
// then upcast (fp64 stays fp64) and cross entropy with ignore_index, reduction sum.
Tensor chunk_loss(const Tensor& h, const Tensor& w, std::optional<double> cap, const Tensor& labels) {
  auto logits = torch::linear(h, w);
  if (cap) logits = softcap(logits, *cap);
  const auto compute = logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return torch::nn::functional::cross_entropy(
      logits.to(compute), labels,
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex).reduction(torch::kSum));
}

struct ChunkedLoss : public torch::autograd::Function<ChunkedLoss> {
  // hidden [N, H], weight [V, H]; labels [N] and the chunking travel in saved_data.
  static Tensor forward(AutogradContext* ctx, Tensor hidden, Tensor weight, Tensor labels, int64_t chunk,
                        std::optional<double> cap) {
    ctx->save_for_backward({hidden, weight, labels});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["cap"] = cap ? c10::IValue(*cap) : c10::IValue();
    torch::NoGradGuard no_grad;
    Tensor total;
    for (int64_t s = 0; s < hidden.size(0); s += chunk) {
      const int64_t n = std::min(chunk, hidden.size(0) - s);
      auto part = chunk_loss(hidden.narrow(0, s, n), weight, cap, labels.narrow(0, s, n));
      total = total.defined() ? total + part : part;
    }
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& hidden = saved[0];
    const auto& labels = saved[2];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const auto cap_value = ctx->saved_data["cap"];
    const std::optional<double> cap = cap_value.isNone() ? std::nullopt : std::optional<double>(cap_value.toDouble());
    auto weight = saved[1].detach().requires_grad_(true);
    std::vector<Tensor> dh;
    Tensor dw;
    for (int64_t s = 0; s < hidden.size(0); s += chunk) {
      const int64_t n = std::min(chunk, hidden.size(0) - s);
      auto h = hidden.narrow(0, s, n).detach().requires_grad_(true);
      torch::AutoGradMode enable(true);
      auto part = chunk_loss(h, weight, cap, labels.narrow(0, s, n));
      auto g = torch::autograd::grad({part}, {h, weight}, {grad_outputs[0]});
      dh.push_back(g[0]);
      dw = dw.defined() ? dw + g[1] : g[1];
    }
    return {torch::cat(dh), dw, Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

TokenLoss chunked_token_loss(const torch::Tensor& hidden, const torch::Tensor& lm_head, std::optional<double> cap,
                             const torch::Tensor& shifted_labels, int64_t chunk_tokens) {
  TORCH_CHECK(chunk_tokens >= 1, "chunked_token_loss: chunk_tokens must be >= 1");
  TORCH_CHECK(hidden.dim() == 3 && shifted_labels.dim() == 2, "chunked_token_loss: hidden [B, S, H], labels [B, S]");
  auto flat_labels = shifted_labels.reshape({-1}).to(hidden.device());
  auto flat = hidden.reshape({-1, hidden.size(-1)});
  auto sum = ChunkedLoss::apply(flat, lm_head, flat_labels, chunk_tokens, cap);
  return {sum, (flat_labels != kIgnoreIndex).sum().item<int64_t>()};
}

TokenLoss forward_loss(Gemma4Model& model, const ModelInputs& inputs, AttentionBackend& backend, ForwardOptions options,
                       const torch::Tensor& shifted_labels, int64_t chunk_tokens, torch::Tensor* logits) {
  options.final_hidden = chunk_tokens > 0;
  auto out = model->forward(inputs, backend, options);
  if (chunk_tokens > 0)
    return chunked_token_loss(out, model->embed_tokens->weight, model->config().final_logit_softcapping, shifted_labels,
                              chunk_tokens);
  if (logits) *logits = out.detach();
  return token_loss(out, shifted_labels);
}

}  // namespace cpharness::model
