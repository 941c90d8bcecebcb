// Runs one case: the cp 1 reference (the plain model with eager attention on the whole sequence) and cp N
// candidates (ring attention over a Comm backend), from identical weights and batches, for K optimizer steps,
// recording what the checks read: per-step trajectories, step-0 tensors in global order, block-mask cache
// counters per rank and step, ring traces and comm counts. It decides nothing: checks do.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "harness/cp/comm.h"
#include "harness/cp/ring_attention.h"
#include "harness/model/gemma4.h"
#include "harness/report/lane_run.h"
#include "harness/train/case.h"
#include "kernels/block_mask_cache.h"

namespace cpharness::runner {

using report::CpRankRecord;
using report::LaneRun;
using report::TrainingStep;

// Known-bad variants of the CP step itself (the ring's own live in cp::RingMutation), for selftest mutants.
enum class StepMutation {
  kNone,
  kShiftLabelsAfterSharding,  // each rank shifts its own shard: the token at a shard edge loses its target
  kAverageGradients,          // gradients averaged over the ranks instead of summed (the loss is already global)
  kZeroGradPerMicroBatch,     // gradients cleared before every micro-batch: only the last one reaches the update
  kMeanOfMicroBatchMeans,     // each micro-batch divided by its own counted tokens: a mean of micro-batch means
  kChunkedLossIgnored,        // the candidates form whole logits although loss_chunk_tokens is set (same numbers)
  kSwapZigzagHalves,          // zigzag: each rank's two sub-chunks laid in the wrong order (the ring masks by the layout)
  kCandidatesWithoutWeightDecay,  // the cp N runs' AdamW without weight decay (3e-6 of the weights after 3 steps)
  kGradientsReducedToRankZero,    // the reduced gradients copied back on rank 0 only (reduce-to-root): every other rank
                                  // keeps its own shard's gradients
  kGradientsPredivided,           // each rank's gradients divided by cp in their own dtype before the sum, multiplied
                                  // back after (a predivide factor): in bf16, two roundings more than the one allowed
};

// A fault injected into one rank of a cp N run (CPHARNESS_INJECT_FAULT=crash@1 or hang@0:2), to prove that a rank
// that dies or hangs ends the run within the timeout with exit 2 and an error report naming it.
struct Fault {
  // stop: the rank sends itself SIGSTOP (frozen, not dead); throw: an unexpected exception (two lines of text);
  // slow: rank 0 healthy but slow, its cp 1 reference idling --timeout in each step while it sends signs of life
  // (solo work that outlasts --timeout on any machine, which the waiting ranks must not call a hang)
  enum class Kind { kCrash, kHang, kStop, kThrow, kSlow };
  Kind kind = Kind::kCrash;
  int rank = 0;
  int64_t step = 0;  // before this optimizer step's forward
  bool at_exit = false;  // KIND@RANK:exit: once the ranks agree on the verdict, before MPI's shutdown
};
Fault parse_fault(const std::string& spec);  // KIND@RANK[:STEP|:exit]; std::invalid_argument when malformed
// stop@0 and throw@0 act on rank 0 before its cp 1 reference; crash and hang before a candidate step; any kind
// but slow with :exit at the very end of the rank's run (`run` acts on it, every step-based point ignores it).
// slow@0 acts in each step of the reference (run_reference) and is no point fault: inject_fault refuses it.
[[noreturn]] void inject_fault(const Fault& fault);

struct RunOptions {
  cp::RingOptions ring;              // cache switch, mutations, block sizes
  StepMutation step_mutation = StepMutation::kNone;
  cp::Sharding sharding = cp::Sharding::kContiguous;  // the case's layout
  bool use_share_holder = true;      // pass the KV-share holder (matters under cache-gated semantics)
  std::optional<model::KvShareSemantics> semantics;  // override the case's semantics
  bool record_tensors = true;        // step-0 logits, hidden states and gradients
  // With record_tensors, a ring run that is a reference (reference_cp > 1) records the update each weight took
  // (update_norms), keeping a copy of the initial weights for it; cp 1 references always do, candidates never need to.
  bool record_update = false;
  std::chrono::milliseconds timeout{120000};
  std::optional<Fault> fault;        // candidates only
  torch::Device device{torch::kCPU}; // where every run of the case trains (the case's "device" or --device)
  bool drop_boundary_label = false;  // the power check's perturbation (candidates only)
  bool zero_weights = false;         // selftest: every weight zero in every run (a dead model)
  bool zero_final_norm = false;      // selftest: final norm weight zero: logits 0 everywhere (output ignores input)
  bool skip_reference_checkpointing = false;  // selftest: the reference ignores reference_checkpointing (same numbers)
  // Called after every training step of a run rank 0 makes alone while the other ranks of a process backend wait
  // for it (root_wait.h: each call may tell them it is still working); rank 0's thread only. Unset elsewhere.
  std::function<void()> root_alive;
};

// The case's model with its initial weights (seeded init or checkpoint) in `dtype`, on `device`. Weights are made
// on the host (the seeded init is defined there) and moved once.
model::Gemma4Model build_model(const train::Case& c, torch::ScalarType dtype,
                               std::optional<model::KvShareSemantics> semantics = std::nullopt,
                               const torch::Device& device = torch::kCPU, bool zero_weights = false,
                               bool zero_final_norm = false);

// Draws the case's initial weights into this process's cache now (the next build_model copies them): under a
// process backend the other ranks do it while rank 0 trains the reference, instead of at their first ring exchange
// with rank 0 waiting there (at real size a draw takes minutes).
void prepare_initial_weights(const train::Case& c);

LaneRun run_reference(const train::Case& c, train::DtypeLane lane, const RunOptions& options = {});

// This rank's part of a cp N run over `comm` (any backend).
// `shared_model`, when given, returns this rank's model over weights shared by every rank (ranks as threads); rank
// 0 alone then updates them. Without it the rank builds a model of its own.
CpRankRecord run_cp_rank(cp::Comm& comm, const train::Case& c, train::DtypeLane lane, const RunOptions& options,
                         const std::function<model::Gemma4Model()>& shared_model = {});
// The records of ranks 0..N-1 (in order) as one run: shards put back in global order through the shard plan.
// `devices`: how many devices the ranks ran on (1 for ranks as threads on one GPU or the CPU).
LaneRun assemble_cp_run(const train::Case& c, train::DtypeLane lane, cp::Sharding sharding, std::vector<CpRankRecord> ranks, double seconds,
                        const torch::Device& device = torch::kCPU, int devices = 1);
// cp N with the local backend (ranks as threads of this process).
LaneRun run_cp(const train::Case& c, train::DtypeLane lane, int cp, const RunOptions& options = {});
// cp = world.size() over a process backend: every rank runs its part, the records are gathered to rank 0, which
// returns the assembled run; the other ranks return nothing.
std::optional<LaneRun> run_cp_on(cp::Comm& world, const train::Case& c, train::DtypeLane lane, const RunOptions& options);

}  // namespace cpharness::runner
