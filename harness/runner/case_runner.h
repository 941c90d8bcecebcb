// Runs one case: the cp 1 reference (the plain model with eager attention on the whole sequence) and cp N
// candidates (ring attention over a Comm backend), from identical weights and batches, for K optimizer steps,
// recording what the checks read: per-step trajectories, step-0 tensors in global order, block-mask cache
// counters per rank and step, ring traces and comm counts. It decides nothing: checks do.
#pragma once
#include <torch/torch.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "harness/cp/comm.h"
#include "harness/cp/ring_attention.h"
#include "harness/model/gemma4.h"
#include "harness/train/case.h"
#include "kernels/block_mask_cache.h"

namespace cpharness::runner {

// Known-bad variants of the CP step itself (the ring's own live in cp::RingMutation), for selftest mutants.
enum class StepMutation {
  kNone,
  kShiftLabelsAfterSharding,  // each rank shifts its own shard: the token at a shard edge loses its target
};

struct RunOptions {
  cp::RingOptions ring;              // cache switch, mutations, block sizes
  StepMutation step_mutation = StepMutation::kNone;
  bool use_share_holder = true;      // pass the KV-share holder (matters under cache-gated semantics)
  std::optional<model::KvShareSemantics> semantics;  // override the case's semantics
  bool record_tensors = true;        // step-0 logits, hidden states and gradients
  std::chrono::milliseconds timeout{120000};
};

struct StepRecord {
  double loss = 0, grad_norm = 0, param_norm = 0;
  int64_t counted_tokens = 0;
};

struct LaneRun {
  int cp = 1;
  std::string lane;  // "fp32" or "bf16"
  std::vector<StepRecord> steps;
  // Step 0, before the update, in global token order (padding cropped); fp64 copies.
  torch::Tensor logits;
  std::vector<torch::Tensor> hidden;  // index 0: embeddings, i + 1: after layer i
  std::map<std::string, torch::Tensor> grads;
  std::map<std::string, torch::Tensor> final_params;  // after the last step
  // cp > 1 only: [step][rank] counters, [rank] step-0 ring traces and comm stats.
  std::vector<std::vector<kernels::BlockMaskCacheCounters>> cache;
  std::vector<std::vector<cp::RingTraceEntry>> traces;
  std::vector<cp::CommStats> comm_step0;
  double seconds = 0;
};

// The batch of optimizer step k: the case's data with its seed advanced by k and its documents rotated by k,
// so that consecutive steps have different masks (a stale cached mask shows).
train::Batch batch_for_step(const train::Case& c, int64_t step);

// The case's model with its initial weights (seeded init or checkpoint) in `dtype`.
model::Gemma4Model build_model(const train::Case& c, torch::ScalarType dtype,
                               std::optional<model::KvShareSemantics> semantics = std::nullopt);

torch::ScalarType lane_dtype(const std::string& lane);

LaneRun run_reference(const train::Case& c, const std::string& lane, const RunOptions& options = {});
LaneRun run_cp(const train::Case& c, const std::string& lane, int cp, const RunOptions& options = {});

}  // namespace cpharness::runner
