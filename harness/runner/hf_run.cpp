#include "harness/runner/hf_run.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>

#include "harness/cp/comm.h"
#include "harness/cp/cp_step.h"
#include "harness/io/input_error.h"
#include "harness/model/attention_backend.h"
#include "harness/model/gemma4.h"
#include "harness/model/weights.h"

namespace cpharness::runner {
namespace {

model::Gemma4Model load_model(const HfGolden& g, model::KvShareSemantics semantics, torch::ScalarType dtype) {
  auto config = g.config;
  config.kv_share_semantics = semantics;
  model::Gemma4Model m(config);
  model::load_weights(m, g.dump.weights, g.path);
  m->to(dtype);
  return m;
}

}  // namespace

HfRun run_on_hf_golden(const HfGolden& g, int cp, bool holder) {
  return run_on_hf_golden(g, cp, holder, g.config.kv_share_semantics);
}

HfRun run_on_hf_golden(const HfGolden& g, int cp, bool holder, model::KvShareSemantics semantics,
                       bool drop_boundary_label, torch::ScalarType dtype) {
  const auto start = std::chrono::steady_clock::now();
  HfRun out;
  out.cp = cp;
  out.holder = holder;
  if (cp == 1) {
    auto m = load_model(g, semantics, dtype);
    model::EagerAttention eager;
    model::KvShareHolder h;
    model::ForwardOptions o;
    if (holder) o.holder = &h;
    auto logits = m->forward({g.batch.input_ids, g.batch.position_ids, g.batch.meta, {}}, eager, o);
    auto loss = model::token_loss(logits, model::shift_labels(g.batch.labels));
    auto mean = loss.sum / double(loss.count);
    mean.backward();
    out.loss = mean.item<double>();
    out.logits = logits.detach().to(dtype);
    out.grads = model::gradient_copies(m, dtype);
  } else {
    std::vector<torch::Tensor> logits(cp);
    cp::ShardPlan plan;
    cp::run_local(cp, [&](cp::Comm& comm) {
      auto m = load_model(g, semantics, dtype);
      cp::RingAttention ring(comm, cp::RingOptions{});
      cp::CpStepOptions options;
      options.use_share_holder = holder;
      options.drop_boundary_label = drop_boundary_label;
      auto r = cp::cp_forward_backward(comm, m, ring, g.batch, 1, options);
      logits[comm.rank()] = r.local_logits;
      if (comm.rank() == 0) {
        out.loss = r.loss;
        out.grads = model::gradient_copies(m, dtype);
        plan = r.plan;
      }
    });
    out.logits = plan.unshard(logits).to(dtype);
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace cpharness::runner
