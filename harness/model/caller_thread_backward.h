// A differentiable operation whose backward runs on the thread that called backward(), whatever device its tensors
// are on.
//
// libtorch's autograd engine runs a backward function on the worker of the device its forward outputs live on: the
// calling thread's own queue for CPU tensors, but for CUDA tensors the device's single worker thread, which every
// thread that calls backward() shares. An operation whose backward blocks on another thread (a ring exchange between
// ranks that are threads of one process, or the recompute of a layer that holds one) would block that shared worker,
// and the peer's backward, queued behind it on the same worker, would never run: a deadlock. So the operation is two
// autograd nodes joined by a CPU token:
//
//   inputs -> [compute] -> token (0-d CPU tensor) -> [release] -> outputs
//
// release's backward runs on the device worker and only hands the output gradients over; the token's gradient is a
// CPU tensor, so compute's backward (the operation's real backward, which may block) runs on the queue of the thread
// that called backward(). On the CPU both run on the calling thread, as any backward does.
#pragma once
#include <torch/torch.h>

namespace cpharness::model {

class CallerThreadOp : public torch::CustomClassHolder {
 public:
  // Runs without a graph; returns the outputs. Keep what backward needs as members, but never an output tensor
  // itself (it would own its own backward node: a reference cycle); keep `t.detach()` instead.
  virtual torch::autograd::variable_list forward(const torch::autograd::variable_list& inputs) = 0;
  // One gradient per input (undefined for none), given the inputs and one gradient per output (zeros where no
  // gradient flowed).
  virtual torch::autograd::variable_list backward(const torch::autograd::variable_list& inputs,
                                                  const torch::autograd::variable_list& grad_outputs) = 0;

 private:
  friend struct CallerThreadRelease;
  friend struct CallerThreadCompute;
  friend torch::autograd::variable_list apply_on_caller_thread(const c10::intrusive_ptr<CallerThreadOp>&,
                                                               const torch::autograd::variable_list&);
  // Custom autograd functions take defined tensors only: the defined inputs go through, `defined_` says where.
  torch::autograd::variable_list with_gaps(const torch::autograd::variable_list& defined_inputs) const;
  std::vector<bool> defined_;
  torch::autograd::variable_list outputs_;       // forward's result, from compute to release
  torch::autograd::variable_list grad_outputs_;  // backward's input, from release to compute
};

// The outputs of `op` on `inputs` (undefined inputs allowed: they get no gradient).
torch::autograd::variable_list apply_on_caller_thread(const c10::intrusive_ptr<CallerThreadOp>& op,
                                                      const torch::autograd::variable_list& inputs);

// True for the node that runs such an operation's backward (the one whose forward output is the CPU token). Tests
// that emulate a CUDA device's single autograd worker on the CPU serialise every other node.
bool runs_backward_on_caller_thread(const torch::autograd::Node& node);

}  // namespace cpharness::model
