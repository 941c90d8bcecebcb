// Gemma4 RMSNorm (gemma4-spec §3.0): fp32 math, pow(ms + eps, -0.5), weight w (not 1 + w) multiplied in fp32,
// one cast back at the end. An undefined weight gives the weightless form (v_norm).
#pragma once
#include <torch/torch.h>

namespace cpharness::model {

inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  // fp32 for bf16/fp16/fp32 models as HF; an fp64 model (the exactness lane) stays fp64.
  const auto compute = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto xf = x.to(compute);
  auto ms = xf.pow(2).mean(-1, /*keepdim=*/true) + eps;
  auto y = xf * torch::pow(ms, -0.5);
  if (weight.defined()) y = y * weight.to(compute);
  return y.to(x.scalar_type());
}

// A norm with an optional learned weight [dim], named "weight" as in the checkpoints.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, bool with_weight) : eps_(eps) {
    if (with_weight) weight = register_parameter("weight", torch::ones({dim}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return rms_norm(x, weight, eps_); }
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

}  // namespace cpharness::model
