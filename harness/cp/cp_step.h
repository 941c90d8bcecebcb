// One training step at CP = N, on one rank: shard the batch (labels shifted on the full sequence first), run
// the unmodified model with ring attention as its attention backend, then reduce across ranks: the loss is the
// sum of per-token losses over all ranks divided by the global count of counted tokens (not a mean of rank
// means), every gradient is summed, the grad norm is global. At cp = 1 with the eager backend it is the
// reference step.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "harness/cp/comm.h"
#include "harness/cp/ring_attention.h"
#include "harness/cp/shard_plan.h"
#include "harness/model/gemma4.h"
#include "harness/train/batch.h"
#include "harness/train/trainer.h"

namespace cpharness::cp {

// The gradient all-reduce's bucket (all_reduce_gradients): 64 MiB in fp32.
inline constexpr int64_t kGradientBucketElements = int64_t(1) << 24;

struct CpForwardResult {
  double loss = 0;              // global
  int64_t counted_tokens = 0;   // global
  torch::Tensor local_logits;   // [B, S_loc, V] of this rank (detached); undefined under the chunked loss
  ShardPlan plan;
  torch::Tensor token_index;    // int64 [S_loc]: the global index of each local token as the batch was sharded
};

struct CpStepOptions {
  bool use_share_holder = true;               // pass a fresh KV-share holder (cache-gated semantics need it)
  bool shift_labels_after_sharding = false;   // KNOWN-BAD, selftest only: each rank shifts its own shard
  bool average_gradients = false;             // KNOWN-BAD, selftest only: gradients averaged over ranks, not summed
  bool reduce_to_rank_zero_only = false;      // KNOWN-BAD, selftest only: the reduced gradients reach rank 0 only
  bool swap_zigzag_halves = false;            // KNOWN-BAD, selftest only: the batch's two sub-chunks per rank are
                                              // laid in the wrong order while the ring masks by the layout
  bool zero_grad_per_micro_batch = false;     // KNOWN-BAD, selftest only: gradients cleared before every micro-batch
  bool micro_batch_mean_of_means = false;     // KNOWN-BAD, selftest only: each micro-batch normalised by its own
                                              // counted tokens (x micro-batches) instead of the step's
  bool predivide_gradients = false;           // KNOWN-BAD, selftest only: each rank's gradients divided by cp in their
                                              // own dtype before the sum and multiplied back after (fp16 training's
                                              // predivide factor): two more roundings in bf16
  // Receives fp64 copies of this rank's own gradients just before they are summed over the ranks (the last
  // micro-batch's call; train.grad_reduction holds the sum to them).
  std::map<std::string, torch::Tensor>* local_gradients = nullptr;
  std::vector<torch::Tensor>* hidden_states = nullptr;  // receives this rank's residual stream per layer
  int64_t loss_chunk_tokens = 0;  // > 0: chunked LM head + cross entropy; local_logits stays undefined
  bool chunked_loss_ignored = false;  // KNOWN-BAD, tests only: loss_chunk_tokens not applied under CP
  // The power check's perturbation (never in a real run): the label of boundary_label_target() is dropped.
  bool drop_boundary_label = false;
  Sharding sharding = Sharding::kContiguous;  // the layout of the shards (the ring follows it)
  // Gradient accumulation: >= 0, the global count of counted tokens over every micro-batch of the optimizer step,
  // which divides this micro-batch's loss sum (not its own count: a mean of micro-batch means weighs tokens
  // unequally). -1: this batch is the whole step, its count comes from the loss all-reduce.
  int64_t step_counted_tokens = -1;
  bool reduce_gradients = true;  // false: gradients stay local (all but the last micro-batch; the last sums all)
  int64_t gradient_bucket_elements = kGradientBucketElements;  // the gradient all-reduce's bucket
  // The ranks' models alias one set of weights (ranks as threads, model_sharing_weights): rank 0 alone updates them,
  // then every rank waits at a barrier, so that none reads them mid-update. Each rank keeps its own gradients.
  bool shared_weights = false;
  // Recompute each decoder layer in backward (its forward ring runs again there).
  model::ActivationCheckpointing activation_checkpointing = model::ActivationCheckpointing::kOff;
  // Called with the loss whose backward is about to run (its graph complete). Tests install autograd hooks with it
  // (caller_thread_backward_test emulates a CUDA device's single autograd worker); runs leave it empty.
  std::function<void(const torch::Tensor& loss)> before_backward;
};

// A training batch as the shard plan takes it (labels not yet shifted), for prepare_cp_batch: what the CP step
// pads, shards and trains on.
TokenBatch token_batch_of(const train::Batch& batch);

// The token the power check perturbs: the first counted target (label != -100 after the full-sequence shift) of
// the first rank > 0 that holds one, i.e. a token at or near a shard edge; in row 0, else in the first row that
// has one there. rank -1 when no rank > 0 has one in any row.
struct BoundaryLabel {
  int rank = -1;
  int64_t row = 0;            // batch row
  int64_t local_index = -1;   // in that rank's shard of the row
  int64_t global_index = -1;  // in the sequence
};
BoundaryLabel boundary_label_target(const train::Batch& batch, int cp, int64_t pad_token_id,
                                    Sharding sharding = Sharding::kContiguous);
// What dropping it is, for reports: "dropping the label of token 17 (the first counted target of rank 1's shard)",
// with the row when it is not row 0.
std::string boundary_label_text(const BoundaryLabel& target);

// Forward and backward on this rank's shard; afterwards every parameter's .grad() holds the global gradient
// (all-reduced).
CpForwardResult cp_forward_backward(Comm& comm, model::Gemma4Model& model, RingAttention& ring, const train::Batch& batch,
                                    uint64_t generation, const CpStepOptions& options = {});

// Sums every parameter gradient over the ranks (undefined grads count as zero), in buckets of `bucket_elements`
// elements of the gradients laid end to end: bit-identical to one flat collective, with one bucket of extra memory.
// `root_only` is KNOWN-BAD (selftest): only rank 0 takes the sums, the others keep their own gradients.
void all_reduce_gradients(Comm& comm, const std::vector<torch::Tensor>& parameters,
                          int64_t bucket_elements = kGradientBucketElements, bool root_only = false);
// How many all-reduce calls all_reduce_gradients makes for these parameters (the ring.grad_return count).
int64_t gradient_all_reduce_calls(const std::vector<torch::Tensor>& parameters,
                                  int64_t bucket_elements = kGradientBucketElements);

class CpTrainer {
 public:
  CpTrainer(Comm& comm, model::Gemma4Model model, const train::OptimizerOptions& options, RingOptions ring_options = {},
            CpStepOptions step_options = {});
  // One optimizer step; `forward`, when given, receives the forward result (local logits, plan), and
  // `hidden_states` this rank's residual stream per layer. Gradients stay readable until the next step.
  // `gradients`, when given, receives fp64 copies of the all-reduced gradients before clipping and the update,
  // `local_gradients` fp64 copies of this rank's own before the all-reduce.
  train::StepResult step(const train::Batch& batch, CpForwardResult* forward = nullptr,
                         std::vector<torch::Tensor>* hidden_states = nullptr,
                         std::map<std::string, torch::Tensor>* gradients = nullptr,
                         std::map<std::string, torch::Tensor>* local_gradients = nullptr);
  // One optimizer step over micro-batches (gradient accumulation): every micro-batch's loss sum is divided by the
  // global count of counted tokens of all of them, gradients accumulate locally and are summed over the ranks once,
  // the grad norm is taken (and clipping applied) on the sum. `forward` receives the first micro-batch's result with
  // its logits and `hidden_states` its residual stream, each the micro-batches' laid along the batch dimension.
  train::StepResult step(const std::vector<train::Batch>& micro_batches, CpForwardResult* forward = nullptr,
                         std::vector<torch::Tensor>* hidden_states = nullptr,
                         std::map<std::string, torch::Tensor>* gradients = nullptr,
                         std::map<std::string, torch::Tensor>* local_gradients = nullptr);
  model::Gemma4Model& model() { return model_; }
  RingAttention& ring() { return ring_; }

 private:
  // The grad norm (before clipping), the gradients' copies when asked, the optimizer step.
  train::StepResult finish_step(double loss, int64_t counted_tokens, std::map<std::string, torch::Tensor>* gradients);

  Comm& comm_;
  model::Gemma4Model model_;
  RingAttention ring_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  CpStepOptions step_options_;
  train::OptimizerOptions optimizer_options_;
  uint64_t generation_ = 0;
};

}  // namespace cpharness::cp
