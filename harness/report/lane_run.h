// What a training run recorded, as the checks read it: the cp 1 reference or a cp N candidate of one case in one
// dtype lane. The runner fills these; the checks only read them (design.md: checks never train).
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "harness/cp/comm.h"
#include "harness/cp/ring_attention.h"
#include "harness/train/case.h"
#include "kernels/block_mask_cache.h"

namespace cpharness::report {

// One optimizer step of a run.
struct TrainingStep {
  double loss = 0, grad_norm = 0, param_norm = 0;
  int64_t counted_tokens = 0;
  // Figures: wall time of the step (device work finished), and the device's peak memory during it (bytes; -1 on
  // the CPU). Ranks as threads on one GPU share the device, so the peak is theirs together.
  double seconds = 0;
  int64_t peak_allocated = -1, peak_reserved = -1;
  // The cp 1 reference on the CPU: bytes its forward left alive for the backward (allocated on the lane's thread
  // after the step began, still held when backward starts: the saved activations, the logits and the loss). -1
  // where not measured (candidates, CUDA, metering off). train/host_memory.h says why it is deterministic.
  int64_t activation_bytes = -1;
};

struct LaneRun {
  int cp = 1;
  train::DtypeLane lane = train::DtypeLane::kFp32;
  std::vector<TrainingStep> steps;
  // Step 0, before the update, in global token order (padding cropped); fp64 copies.
  torch::Tensor logits;
  std::vector<torch::Tensor> hidden;  // index 0: embeddings, i + 1: after layer i
  std::map<std::string, torch::Tensor> grads;
  // cp > 1 only: [rank] each rank's own step-0 gradients just before they were summed over the ranks (fp64 copies;
  // train.grad_reduction holds `grads`, the sum, to them).
  std::vector<std::map<std::string, torch::Tensor>> local_grads;
  std::map<std::string, torch::Tensor> final_params;  // after the last step
  // A reference's (cp 1, or reference_cp) per tensor ‖final − initial‖: the update the run made, by which
  // train.param_parity scales cp N's difference. Empty for a candidate (never read) and where tensors were not
  // recorded: judged relative to the weights then.
  std::map<std::string, double> update_norms;
  // cp > 1 only: [step][rank] counters, [rank] step-0 ring traces and comm stats.
  std::vector<std::vector<kernels::BlockMaskCacheCounters>> cache;
  std::vector<std::vector<cp::RingTraceEntry>> traces;
  std::vector<cp::CommStats> comm_step0;
  int64_t gradient_all_reduces = 1;  // all-reduce calls that one gradient reduction takes (its buckets)
  std::vector<std::vector<int64_t>> token_index;  // [rank]: the global index of each local token at step 0
  // cp > 1 only: [rank][step] each rank's own figures. `steps` are rank 0's; loss, grad norm, parameter norm and
  // counted tokens are global values every rank must hold alike (train.rank_agreement).
  std::vector<std::vector<TrainingStep>> rank_steps;
  double seconds = 0;
  std::string device = "cpu";  // where it ran ("cpu", "cuda:0"), and the device's name
  std::string device_name = "cpu";
  int devices = 1;             // devices the run used (ranks as threads share one)
  int64_t tokens_per_step = 0;  // B x S of the global batch
};

// What one rank of a cp N run records; assembled into a LaneRun (rank 0 alone holds the global gradients and
// final parameters, which are identical on every rank after the all-reduce).
struct CpRankRecord {
  int rank = 0;
  std::vector<TrainingStep> steps;
  std::vector<kernels::BlockMaskCacheCounters> cache;  // per step
  std::vector<cp::RingTraceEntry> trace;               // step 0
  cp::CommStats comm_step0;
  int64_t gradient_all_reduces = 1;                    // all-reduce calls of one gradient reduction (buckets)
  std::vector<int64_t> token_index;                    // step 0: the global index of each local token
  torch::Tensor logits;               // step 0, this rank's shard, fp64
  std::vector<torch::Tensor> hidden;  // step 0, this rank's shard, fp64
  std::map<std::string, torch::Tensor> grads, final_params;  // rank 0 only
  std::map<std::string, torch::Tensor> local_grads;  // step 0, this rank's own before the all-reduce, fp64
};

}  // namespace cpharness::report
