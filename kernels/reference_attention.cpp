#include "kernels/reference_attention.h"

#include <limits>

namespace cpharness::kernels {

DenseAttention dense_reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const torch::Tensor& allowed, double scale) {
  const int64_t groups = q.size(1) / k.size(1);
  auto kk = k.repeat_interleave(groups, 1), vv = v.repeat_interleave(groups, 1);
  auto s = torch::matmul(q, kk.transpose(2, 3));
  if (scale != 1.0) s = s * scale;
  auto a = allowed.unsqueeze(1);
  const double inf = std::numeric_limits<double>::infinity();
  auto lse = torch::logsumexp(torch::where(a, s, torch::full({}, -inf, s.options())), -1, true);
  // Rows without an allowed key: subtract 0 instead of -inf so that no NaN appears; their p is 0 anyway.
  auto safe = torch::where(a.any(-1, true), lse, torch::zeros_like(lse));
  auto p = torch::where(a, torch::exp(s - safe), torch::zeros_like(s));
  return {torch::matmul(p, vv), lse.squeeze(-1).detach()};
}

DenseAttentionGrads dense_reference_attention_grads(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v, const torch::Tensor& allowed,
                                                    double scale, const torch::Tensor& dout) {
  auto qd = q.to(torch::kFloat64).detach().requires_grad_(true);
  auto kd = k.to(torch::kFloat64).detach().requires_grad_(true);
  auto vd = v.to(torch::kFloat64).detach().requires_grad_(true);
  auto r = dense_reference_attention(qd, kd, vd, allowed, scale);
  (r.out * dout.to(torch::kFloat64)).sum().backward();
  return {r.out.detach(), r.lse, qd.grad(), kd.grad(), vd.grad()};
}

}  // namespace cpharness::kernels
