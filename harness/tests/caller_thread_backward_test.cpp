// Backward functions that block on other threads run on the thread that called backward()
// (harness/model/caller_thread_backward.h), so that ranks as threads on one CUDA device cannot deadlock on its single
// autograd worker. A CPU machine has no such worker, so these tests emulate one: every node of the graph except
// those that run on the caller's thread takes one lock while it runs, which serialises the ranks' backward
// functions exactly as one GPU's worker does. The emulation is shown to catch the deadlock (a plain custom function
// that exchanges in its backward), and the real ring and checkpointed layers to pass through it, bitwise as without.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/function_hook.h>

#include <atomic>
#include <condition_variable>
#include <unordered_set>

#include "harness/cp/comm.h"
#include "harness/cp/cp_step.h"
#include "harness/model/caller_thread_backward.h"
#include "harness/runner/selftest.h"
#include "harness/tests/model_fixtures.h"

namespace cpharness {
namespace {

using torch::Tensor;
using torch::autograd::variable_list;
using namespace std::chrono_literals;

// One CUDA device's autograd worker, emulated: one node at a time, whichever rank it belongs to.
class SharedDeviceWorker {
 public:
  explicit SharedDeviceWorker(std::chrono::milliseconds patience) : patience_(patience) {}

  // Every node reachable from `root` takes the worker while it runs, except the ones that run on the caller's thread.
  void serialise(const Tensor& root) {
    std::vector<torch::autograd::Node*> todo{root.grad_fn().get()};
    std::unordered_set<torch::autograd::Node*> seen;
    while (!todo.empty()) {
      auto* node = todo.back();
      todo.pop_back();
      if (!node || !seen.insert(node).second) continue;
      if (model::runs_backward_on_caller_thread(*node)) {
        node->add_pre_hook(std::make_unique<Count>(caller_thread_nodes_));
      } else {
        node->add_pre_hook(std::make_unique<Enter>(*this));
        node->add_post_hook(std::make_unique<Leave>(*this));
      }
      for (auto& edge : node->next_edges()) todo.push_back(edge.function.get());
    }
  }

  int serialised_nodes() const { return serialised_nodes_; }
  int caller_thread_nodes() const { return caller_thread_nodes_; }

 private:
  struct Enter : torch::autograd::FunctionPreHook {
    explicit Enter(SharedDeviceWorker& w) : worker(w) {}
    variable_list operator()(const variable_list& grads) override {
      worker.enter();
      return grads;
    }
    SharedDeviceWorker& worker;
  };
  struct Leave : torch::autograd::FunctionPostHook {
    explicit Leave(SharedDeviceWorker& w) : worker(w) {}
    variable_list operator()(const variable_list& outputs, const variable_list&) override {
      worker.leave();
      return outputs;
    }
    SharedDeviceWorker& worker;
  };
  struct Count : torch::autograd::FunctionPreHook {
    explicit Count(std::atomic<int>& c) : count(c) {}
    variable_list operator()(const variable_list& grads) override {
      ++count;
      return grads;
    }
    std::atomic<int>& count;
  };

  void enter() {
    std::unique_lock<std::mutex> lock(mu_);
    if (!free_.wait_for(lock, patience_, [&] { return !busy_; }))
      throw std::runtime_error("the shared device worker stayed busy (a backward function blocked on another rank)");
    busy_ = true;
    ++serialised_nodes_;
  }
  void leave() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = false;
    }
    free_.notify_one();
  }

  std::chrono::milliseconds patience_;
  std::mutex mu_;
  std::condition_variable free_;
  bool busy_ = false;
  std::atomic<int> serialised_nodes_{0}, caller_thread_nodes_{0};
};

// ---- The emulation catches a backward that blocks on a peer --------------------------------------------------

thread_local cp::Comm* rank_comm = nullptr;

// y = x; dx = the peer's dy: a backward that cannot finish before the other rank's has started.
Tensor swap_with_peer(const Tensor& g) {
  return rank_comm->exchange({g.contiguous()}, 1 - rank_comm->rank(), 1 - rank_comm->rank())[0];
}

struct SwapGradientsPlain : torch::autograd::Function<SwapGradientsPlain> {
  static Tensor forward(torch::autograd::AutogradContext*, Tensor x) { return x.clone(); }
  static variable_list backward(torch::autograd::AutogradContext*, variable_list g) { return {swap_with_peer(g[0])}; }
};

struct SwapGradientsOp : model::CallerThreadOp {
  variable_list forward(const variable_list& in) override { return {in[0].clone()}; }
  variable_list backward(const variable_list&, const variable_list& g) override { return {swap_with_peer(g[0])}; }
};

// Two ranks: x_r = r + 1, loss_r = sum((r + 1) * f(x_r)); returns each rank's x.grad.
std::vector<Tensor> swap_gradients(bool on_caller_thread, SharedDeviceWorker& worker) {
  std::vector<Tensor> grads(2);
  cp::run_local(2, [&](cp::Comm& comm) {
    rank_comm = &comm;
    const double r = comm.rank();
    auto x = torch::full({3}, r + 1, torch::kFloat64).requires_grad_();
    auto y = on_caller_thread ? model::apply_on_caller_thread(c10::make_intrusive<SwapGradientsOp>(), {x})[0]
                              : SwapGradientsPlain::apply(x);
    auto loss = (y * (r + 1)).sum();
    worker.serialise(loss);
    loss.backward();
    grads[size_t(comm.rank())] = x.grad();
  }, 1500ms);
  return grads;
}

TEST(CallerThreadBackward, TheEmulatedDeviceWorkerDeadlocksABackwardThatWaitsForAPeer) {
  SharedDeviceWorker worker(1500ms);
  EXPECT_THROW(swap_gradients(false, worker), cp::CommError);
}

TEST(CallerThreadBackward, OnTheCallerThreadTheSameBackwardFinishes) {
  SharedDeviceWorker worker(10s);
  const auto grads = swap_gradients(true, worker);
  EXPECT_TRUE(torch::equal(grads[0], torch::full({3}, 2.0, torch::kFloat64)));  // rank 1's dy
  EXPECT_TRUE(torch::equal(grads[1], torch::full({3}, 1.0, torch::kFloat64)));
  EXPECT_EQ(worker.caller_thread_nodes(), 2);
  EXPECT_GT(worker.serialised_nodes(), 0);
}

// ---- The operation is an ordinary differentiable function ------------------------------------------------------

// out0 = tanh(a) * b, out1 = a * c (c may be absent), with its backward written out.
struct TwoOutputs : model::CallerThreadOp {
  variable_list forward(const variable_list& in) override {
    return {torch::tanh(in[0]) * in[1], in[2].defined() ? in[0] * in[2] : in[0] * 2};
  }
  variable_list backward(const variable_list& in, const variable_list& g) override {
    const auto& a = in[0];
    const auto& b = in[1];
    const auto& c = in[2];
    auto da = g[0] * b * (1 - torch::tanh(a).pow(2)) + g[1] * (c.defined() ? c : torch::full_like(a, 2));
    return {da, g[0] * torch::tanh(a), c.defined() ? g[1] * a : Tensor()};
  }
};

TEST(CallerThreadBackward, GradientsEqualAutogradOnTheSameFunctionForRandomInputs) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  for (int trial = 0; trial < 20; ++trial) {
    SCOPED_TRACE(trial);
    const int64_t n = 1 + trial % 7;
    const bool with_c = trial % 3 != 0, use_second = trial % 4 != 1;
    auto opts = torch::TensorOptions().dtype(torch::kFloat64);
    auto a = torch::randn({n}, gen, opts), b = torch::randn({n}, gen, opts), c = torch::randn({n}, gen, opts);
    auto w0 = torch::randn({n}, gen, opts), w1 = torch::randn({n}, gen, opts);
    auto loss_of = [&](const Tensor& o0, const Tensor& o1) { return (o0 * w0).sum() + (use_second ? (o1 * w1).sum() : o1.sum() * 0); };

    auto a1 = a.clone().requires_grad_(), b1 = b.clone().requires_grad_(), c1 = c.clone().requires_grad_();
    auto out = model::apply_on_caller_thread(c10::make_intrusive<TwoOutputs>(), {a1, b1, with_c ? c1 : Tensor()});
    loss_of(out[0], out[1]).backward();

    auto a2 = a.clone().requires_grad_(), b2 = b.clone().requires_grad_(), c2 = c.clone().requires_grad_();
    loss_of(torch::tanh(a2) * b2, with_c ? a2 * c2 : a2 * 2).backward();
    EXPECT_TRUE(torch::allclose(a1.grad(), a2.grad(), 1e-14, 1e-14));
    EXPECT_TRUE(torch::allclose(b1.grad(), b2.grad(), 1e-14, 1e-14));
    if (with_c) EXPECT_TRUE(torch::allclose(c1.grad(), c2.grad(), 1e-14, 1e-14));
    else EXPECT_FALSE(c1.grad().defined());
  }
}

TEST(CallerThreadBackward, WithoutGradientsItBuildsNoGraph) {
  auto a = torch::randn({4}, torch::kFloat64).requires_grad_();
  torch::NoGradGuard no_grad;
  auto out = model::apply_on_caller_thread(c10::make_intrusive<TwoOutputs>(), {a, a, Tensor()});
  EXPECT_FALSE(out[0].requires_grad());
  EXPECT_FALSE(out[0].grad_fn());
}

TEST(CallerThreadBackward, TheOperationDoesNotOutliveItsGraph) {
  auto op = c10::make_intrusive<TwoOutputs>();
  {
    auto a = torch::randn({4}, torch::kFloat64).requires_grad_();
    auto out = model::apply_on_caller_thread(op, {a, a, Tensor()});
    EXPECT_GT(op.use_count(), 1u);  // held by the graph's two nodes
  }
  EXPECT_EQ(op.use_count(), 1u);  // no reference cycle through its outputs
}

// ---- Ranks as threads train through the emulated device worker ---------------------------------------------

struct RankGrads {
  double loss = 0;
  std::map<std::string, Tensor> grads;
};

RankGrads train_step(int cp, cp::RingMode mode, model::ActivationCheckpointing checkpointing, SharedDeviceWorker* worker) {
  const auto config = runner::selftest_case("default").model;  // KV sharing, sliding and global layers
  const auto batch = testing::structured_batch(config, 48);
  RankGrads out;
  cp::run_local(cp, [&](cp::Comm& comm) {
    auto m = testing::make_model(config, torch::kFloat32);
    cp::RingOptions ring_options;
    ring_options.mode = mode;
    ring_options.q_block = ring_options.kv_block = 8;
    cp::RingAttention ring(comm, ring_options);
    cp::CpStepOptions options;
    options.activation_checkpointing = checkpointing;
    if (worker) options.before_backward = [&](const Tensor& loss) { worker->serialise(loss); };
    auto r = cp::cp_forward_backward(comm, m, ring, batch, 1, options);
    if (comm.rank() != 0) return;
    out.loss = r.loss;
    for (auto& p : m->named_parameters()) out.grads[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : Tensor();
  }, 20s);
  return out;
}

TEST(CallerThreadBackward, RanksAsThreadsTrainThroughOneSharedDeviceWorkerBitwiseAsWithout) {
  using model::ActivationCheckpointing;
  for (int cp : {2, 3})
    for (auto mode : {cp::RingMode::kCollect, cp::RingMode::kStream})
      for (auto checkpointing : {ActivationCheckpointing::kOff, ActivationCheckpointing::kKvHolder}) {
        SCOPED_TRACE(fmt::format("cp {} {} checkpointing {}", cp, cp::to_string(mode), model::to_string(checkpointing)));
        SharedDeviceWorker worker(20s);
        RankGrads shared;
        ASSERT_NO_THROW(shared = train_step(cp, mode, checkpointing, &worker));
        const auto free = train_step(cp, mode, checkpointing, nullptr);
        EXPECT_EQ(shared.loss, free.loss);
        ASSERT_EQ(shared.grads.size(), free.grads.size());
        for (auto& [name, g] : free.grads) {
          ASSERT_EQ(g.defined(), shared.grads.at(name).defined()) << name;
          if (g.defined()) EXPECT_TRUE(torch::equal(g, shared.grads.at(name))) << name;
        }
        // Every rank's ring (or checkpointed layer) backward ran on its own thread, the rest one at a time.
        EXPECT_GT(worker.caller_thread_nodes(), 0);
        EXPECT_GT(worker.serialised_nodes(), worker.caller_thread_nodes());
      }
}

}  // namespace
}  // namespace cpharness
