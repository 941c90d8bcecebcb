#include "harness/model/caller_thread_backward.h"

namespace cpharness::model {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {
// The token between the two nodes, and its gradient: a 0-d CPU tensor, which is what places compute's backward.
Tensor cpu_token() { return torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCPU)); }

c10::intrusive_ptr<CallerThreadOp> op_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<CallerThreadOp>(ctx->saved_data["op"].toCapsule());
}
}  // namespace

// inputs -> token. Its only forward output is a CPU tensor, so the engine queues its backward on the CPU queue of
// the thread that called backward().
struct CallerThreadCompute : public torch::autograd::Function<CallerThreadCompute> {
  static Tensor forward(AutogradContext* ctx, at::TensorList inputs, c10::intrusive_ptr<CallerThreadOp> op) {
    op->outputs_ = op->forward(op->with_gaps(inputs.vec()));
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["op"] = c10::IValue::make_capsule(op);
    return cpu_token();
  }

  static variable_list backward(AutogradContext* ctx, variable_list /*token gradient*/) {
    const auto op = op_of(ctx);
    const auto grads = op->backward(op->with_gaps(ctx->get_saved_variables()), std::exchange(op->grad_outputs_, {}));
    TORCH_CHECK(grads.size() == op->defined_.size(), "a caller-thread operation's backward returned ", grads.size(),
                " gradients for ", op->defined_.size(), " inputs");
    variable_list out;
    for (size_t i = 0; i < grads.size(); ++i)
      if (op->defined_[i]) out.push_back(grads[i]);
    out.push_back(Tensor());  // the op
    return out;
  }
};

// token -> outputs. Its backward runs where the outputs live (a CUDA device's worker) and only passes the gradients on.
struct CallerThreadRelease : public torch::autograd::Function<CallerThreadRelease> {
  static variable_list forward(AutogradContext* ctx, Tensor token, c10::intrusive_ptr<CallerThreadOp> op) {
    ctx->saved_data["op"] = c10::IValue::make_capsule(op);
    return std::exchange(op->outputs_, {});  // the op must not keep them (they now own this node)
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    op_of(ctx)->grad_outputs_ = std::move(grad_outputs);
    return {cpu_token(), Tensor()};
  }
};

variable_list CallerThreadOp::with_gaps(const variable_list& defined_inputs) const {
  variable_list all;
  size_t next = 0;
  for (bool d : defined_) all.push_back(d ? defined_inputs.at(next++) : Tensor());
  return all;
}

variable_list apply_on_caller_thread(const c10::intrusive_ptr<CallerThreadOp>& op, const variable_list& inputs) {
  op->defined_.clear();
  variable_list defined;
  for (auto& t : inputs) {
    op->defined_.push_back(t.defined());
    if (t.defined()) defined.push_back(t);
  }
  auto token = CallerThreadCompute::apply(at::TensorList(defined), op);
  return CallerThreadRelease::apply(token, op);
}

bool runs_backward_on_caller_thread(const torch::autograd::Node& node) {
  return dynamic_cast<const torch::autograd::CppNode<CallerThreadCompute>*>(&node) != nullptr;
}

}  // namespace cpharness::model
