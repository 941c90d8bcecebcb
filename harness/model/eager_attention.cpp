#include <limits>

#include "harness/model/attention_backend.h"
#include "kernels/dense_mask.h"

namespace cpharness::model {
namespace {

torch::Tensor repeat_kv(const torch::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const auto B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  return x.unsqueeze(2).expand({B, H, groups, S, D}).reshape({B, H * groups, S, D});
}

double lowest(torch::ScalarType t) {
  switch (t) {
    case torch::kBFloat16: return double(std::numeric_limits<c10::BFloat16>::lowest());
    case torch::kFloat16: return double(std::numeric_limits<c10::Half>::lowest());
    case torch::kFloat64: return std::numeric_limits<double>::lowest();
    default: return double(std::numeric_limits<float>::lowest());
  }
}

}  // namespace

torch::Tensor EagerAttention::attend(const AttentionInputs& in, const kernels::TokenMetadata& meta) {
  const auto B = in.q.size(0), S = in.q.size(2), S_kv = in.k.size(2);
  TORCH_CHECK(S == S_kv, "eager attention sees the whole sequence: q and k lengths must match");
  const int64_t groups = in.q.size(1) / in.k.size(1);
  auto kk = repeat_kv(in.k, groups), vv = repeat_kv(in.v, groups);
  auto scores = torch::matmul(in.q, kk.transpose(2, 3)) * in.scale;
  auto allowed = kernels::dense_mask(meta, in.geometry, B, S).to(in.q.device()).unsqueeze(1);  // [B, 1, S, S]
  auto zero = torch::zeros({}, in.q.options());
  auto additive = torch::where(allowed, zero, torch::full({}, lowest(in.q.scalar_type()), in.q.options()));
  scores = scores + additive;
  // HF: softmax in fp32, cast back. An fp64 model keeps fp64 (fp32 would turn the fp64 mask value into -inf).
  const auto softmax_dtype = in.q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto probs = torch::softmax(scores, -1, softmax_dtype).to(in.q.scalar_type());
  return torch::matmul(probs, vv);
}

}  // namespace cpharness::model
