// How well conditioned are the tiny models in fp32? Prints, per preset, the largest per-tensor gradient error
// ‖Δ‖/‖ref‖ of several fp32 computations against an fp64 oracle, and how far a 1e-7 relative perturbation of
// layer 0's attention output (the size of one fp32 rounding) moves the gradients. When the perturbation moves
// a gradient by more than the parity tolerance (1e-5), no fp32 implementation, cp 1 included, can be judged at
// that tolerance: the model, not CP, sets the floor.
//
//   bench_fp32_conditioning [preset ...] [--cp N]     (default: tiny-e2b tiny-e4b tiny-31b, cp 4)
#include <fmt/format.h>
#include <torch/torch.h>

#include <functional>

#include "harness/cp/cp_step.h"
#include "harness/model/attention_backend.h"
#include "harness/model/init.h"

using namespace cpharness;

namespace {

using Grads = std::map<std::string, torch::Tensor>;

// Eager attention with its layer-0 output multiplied by (1 + eps·N(0,1)).
class PerturbedEager : public model::AttentionBackend {
 public:
  explicit PerturbedEager(double eps) : eps_(eps) {}
  torch::Tensor attend(const model::AttentionInputs& in, const kernels::TokenMetadata& meta) override {
    auto out = eager_.attend(in, meta);
    return in.layer_index == 0 && eps_ > 0 ? out * (1 + eps_ * torch::randn_like(out)) : out;
  }

 private:
  model::EagerAttention eager_;
  double eps_;
};

model::Gemma4Model make(const model::ModelConfig& c, torch::ScalarType dtype) {
  model::Gemma4Model m(c);
  model::init_weights(m, 7);
  m->to(dtype);
  return m;
}

Grads grads_of(model::Gemma4Model& m) {
  Grads g;
  for (auto& p : m->named_parameters())
    g[p.key()] = p.value().grad().defined() ? p.value().grad().to(torch::kFloat64) : torch::zeros_like(p.value(), torch::kFloat64);
  return g;
}

Grads cp1(const model::ModelConfig& c, const train::Batch& b, torch::ScalarType dtype, double eps = 0) {
  auto m = make(c, dtype);
  PerturbedEager backend(eps);
  model::KvShareHolder holder;
  model::ForwardOptions o;
  o.holder = &holder;
  auto loss = model::token_loss(m->forward({b.input_ids, b.position_ids, b.meta, {}}, backend, o), model::shift_labels(b.labels));
  (loss.sum / double(loss.count)).backward();
  return grads_of(m);
}

Grads ring(const model::ModelConfig& c, const train::Batch& b, int cp) {
  Grads out;
  cp::run_local(cp, [&](cp::Comm& comm) {
    auto m = make(c, torch::kFloat32);
    cp::RingAttention ring(comm);
    cp::cp_forward_backward(comm, m, ring, b, 1);
    if (comm.rank() == 0) out = grads_of(m);
  });
  return out;
}

// The largest per-tensor ‖a − b‖/‖b‖ and the tensor where it occurs.
std::pair<double, std::string> worst(const Grads& a, const Grads& b) {
  std::pair<double, std::string> w{0, ""};
  for (auto& [name, ref] : b) {
    const double denom = ref.norm().item<double>();
    const double err = denom == 0 ? a.at(name).norm().item<double>() : (a.at(name) - ref).norm().item<double>() / denom;
    if (err > w.first) w = {err, name};
  }
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  std::vector<std::string> presets;
  int cp = 4;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--cp" && i + 1 < argc) cp = std::atoi(argv[++i]);
    else presets.push_back(argv[i]);
  }
  if (presets.empty()) presets = {"tiny-e2b", "tiny-e4b", "tiny-31b"};
  fmt::print("max per-tensor gradient error ||d||/||ref|| (worst tensor), batch 2 x 45 tokens, packed, padded\n");
  for (const auto& preset : presets) {
    auto c = model::preset_config(preset);
    train::BatchSpec spec;
    spec.batch = 2;
    spec.seq_len = 45;
    spec.layout.padding = 4;
    spec.layout.document_lengths = {18, 23};
    if (c.use_bidirectional_attention == "vision") spec.layout.vision_runs = {{9, 15}, {30, 4}};
    spec.vocab_size = c.vocab_size;
    spec.seed = 21;
    auto b = train::make_batch(spec);
    auto oracle = cp1(c, b, torch::kFloat64);
    auto eager = cp1(c, b, torch::kFloat32);
    auto perturbed = cp1(c, b, torch::kFloat32, 1e-7);
    auto ring1 = ring(c, b, 1), ringn = ring(c, b, cp);
    auto line = [](const char* what, std::pair<double, std::string> w) { fmt::print("  {:34s} {:9.2e}  ({})\n", what, w.first, w.second); };
    fmt::print("{} ({} layers)\n", preset, c.num_hidden_layers);
    line("cp1 eager fp32 vs fp64 oracle", worst(eager, oracle));
    line("cp1 ring fp32 vs fp64 oracle", worst(ring1, oracle));
    line(fmt::format("cp{} ring fp32 vs fp64 oracle", cp).c_str(), worst(ringn, oracle));
    line(fmt::format("cp{} ring vs cp1 eager (fp32)", cp).c_str(), worst(ringn, eager));
    line("layer-0 1e-7 perturbation (fp32)", worst(perturbed, eager));
  }
}
