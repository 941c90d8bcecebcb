// The check catalogue of design.md. Each function reads what the runner recorded (or runs the small, exact
// computation it needs) and returns CheckResults with the observed value, the threshold and the policy.
// Checks never train: the runner does.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "harness/check/tolerance.h"
#include "harness/cp/ring_attention.h"
#include "harness/report/report.h"
#include "harness/report/lane_run.h"
#include "harness/train/case.h"

namespace cpharness::check {

using report::CheckResult;

// Known-bad block-mask builder for the selftest: partial tiles classified as full.
enum class BlockMaskMutation { kNone, kPartialAsFull };

// mask.dense_slice and mask.block_classification: for every distinct layer geometry of the case, every rank and
// every ring chunk, the rank-local mask (as the ring builds it) equals the slice of the cp 1 global mask, and
// the analytic block mask equals the brute-force one.
std::vector<CheckResult> check_masks(const train::Case& c, int cp, const cp::RingOptions& ring,
                                     BlockMaskMutation mutation = BlockMaskMutation::kNone);

// The page's block-mask figure (report.json block_masks, schema $defs/block_mask_grid): for each distinct layer
// geometry, rank and ring chunk, the tile classes of the block mask the ring builds for batch row 0 of step 0
// ("F" full, "P" partial, "E" empty). Null when there would be more than kMaxBlockMaskGrids grids or more than
// kMaxBlockMaskGridSide blocks on a side (too many or too large to draw).
inline constexpr int64_t kMaxBlockMaskGrids = 64, kMaxBlockMaskGridSide = 64;
nlohmann::json block_mask_grids(const train::Case& c, int cp, const cp::RingOptions& ring);

// attention.parity: seeded fp64 Q/K/V with the case's metadata and head geometry, ring vs full attention per
// rank (out, dQ, dK, dV) and per chunk (out, LSE); padded rows exactly zero in output and dQ. And the same
// inputs rounded to bf16: the ring's error over that of one bf16 rounding of the exact result, at most
// kBf16RoundingsAllowed (a ring that sums in bf16 rounds once per ring step: sqrt(cp) x).
constexpr double kBf16RoundingsAllowed = 1.05;  // a correct ring measured <= 1.00001 (fp32 sums)
std::vector<CheckResult> check_attention_parity(const train::Case& c, int cp, const cp::RingOptions& ring);

// attention.parity's padded_rows_max_abs on one rank: the largest |value| of the output and of dQ over the query
// rows `padding` marks ([B, L] bool; out and dq are [B, H, L, D]). Both must be exactly zero there.
double padded_rows_max_abs(const torch::Tensor& out, const torch::Tensor& dq, const torch::Tensor& padding);

// The case's shard layout ("sharding": contiguous or zigzag) and ring mode ("ring": {"mode": collect or stream}).
cp::Sharding case_sharding(const train::Case& c);
cp::RingMode case_ring_mode(const train::Case& c);

// shard.layout: every rank's tokens, as the candidate sharded its step-0 batch, are where the case's layout puts
// them (contiguous: [r S_loc, (r+1) S_loc); zigzag: sub-chunks r and 2cp-1-r of S_loc/2, in that order), each
// token on exactly one rank. The ring masks by the layout, so a batch laid out otherwise is attended wrongly. The
// details carry the causal work per rank and its imbalance (max/min), what the layout is for.
std::vector<CheckResult> check_shard_layout(const train::Case& c, const report::LaneRun& candidate);

// train.rank_agreement: every rank's loss, gradient norm, parameter norm and counted tokens at every step are rank
// 0's, bit for bit. They are global values (each rank computes them from the all-reduced sums and the same weights),
// while the parity checks read rank 0's alone: a rank whose gradients never received the sums (a reduce to the root,
// an all-reduce whose result only rank 0 keeps) trains on wrong gradients with its own weights, or, on shared
// weights, shows it only in its own figures. One result per rank > 0.
std::vector<CheckResult> check_rank_agreement(const report::LaneRun& candidate);

// train.grad_reduction: the gradients the step trained on (rank 0's, after the all-reduce) are the sum of the ranks'
// own step-0 gradients within what the summation itself may cost: every element within one rounding to the
// gradients' dtype of the exact sum, plus the fp32 (fp64 in the fp64 lane) accumulation's own bound, (cp - 1) u of
// the sum of magnitudes. The parity checks judge the bf16 lane by k x cp 1's error, loose enough to hide a reduction
// that rounds more than once (a predivide factor: two roundings more); this bound is exact. Needs recorded tensors.
struct ReductionError {
  int64_t elements = 0, beyond = 0;  // elements judged, and those past the bound
  double worst = 0;                  // the largest |reduced - sum| / bound (0 where both are 0)
  int64_t worst_index = -1;          // its flat index
};
// `locals` are the ranks' own gradients of one tensor (values of `dtype`, held in fp64), `reduced` their sum as the
// step made it (likewise), `dtype` the gradients' own.
ReductionError reduction_error(const std::vector<torch::Tensor>& locals, const torch::Tensor& reduced,
                               torch::ScalarType dtype);
std::vector<CheckResult> check_grad_reduction(const report::LaneRun& candidate);

// ring.rotation_order, ring.grad_return, ring.hop_limit and ring.chunks_held from the candidate's step-0 traces and
// comm counts. Per layer and micro-batch, with h the layer's ring steps: collect mode: forward h ring exchanges,
// backward h (replay) and h direct dK/dV returns, h + 1 chunks held; stream mode: forward h, backward 2h (the replay
// and the travelling accumulators) and one return home, at most 2 chunks held.
std::vector<CheckResult> check_ring(const train::Case& c, const report::LaneRun& candidate);

// The ring steps after its own chunk that `layer` of `c` takes at cp `n`: cp - 1, or under the case's hop limit
// (ring.hop_limit) min(cp - 1, ceil(W / S_loc)) on sliding layers without vision groups (upstream #2984). Written
// from that rule here, not taken from the runtime's cp::ring_steps, so that a wrong formula there is seen.
int expected_ring_steps(const train::Case& c, int64_t layer, int n);

// The ring steps `layer` must take at cp `n` for no allowed (query, key) pair to be skipped, from the mask rule
// alone (causal, and q - k < W on sliding layers; any pair on vision-bidirectional layers, whose groups reach past
// both): the farthest ring distance at which some rank's real queries may see a real key of the chunk held there.
// Upstream's formula is never below it, and above it by one when W - 1 is a multiple of S_loc.
int needed_ring_steps(const train::Case& c, int64_t layer, int n);

// The name the report and the page give a layer geometry ("full", "sliding (window 32)", "sliding (window 32),
// vision bidirectional").
std::string layer_type_name(const kernels::LayerGeometry& geometry);

// cache.build_count, cache.hit_count, cache.generation_reset per rank and step. `uncached` is a one-step run
// with the cache off (builds must equal lookups); the expected counts are derived from the case.
std::vector<CheckResult> check_cache(const train::Case& c, const report::LaneRun& candidate,
                                     const report::LaneRun* uncached);

// train.loss_parity, train.grad_norm_parity, train.param_parity per step (and step-0 logits and gradients);
// on failure the first diverging layer and tensor is named, and both tensors are dumped under `dump_dir`.
// `oracle` (cp 1 fp32) is required for the bf16 lane. `fp64`, for the fp32 lane where some tensor missed
// fp32_relative against cp 1: step-0 gradients are judged against its reference (the fp64 oracle, policy
// fp32_oracle_relative); final parameters that missed, and the per-step figures from step 1 on, between its two
// runs (policy fp64_rerun); see judge_final_params.
struct Fp64Rerun {
  const report::LaneRun* reference = nullptr;  // cp 1 (or reference_cp) in fp64, same weights and batches
  const report::LaneRun* candidate = nullptr;  // cp N in fp64 (only needed for the final parameters)
};
std::vector<CheckResult> check_training(const train::Case& c, const Tolerances& tol, const report::LaneRun& reference,
                                        const report::LaneRun& candidate, const report::LaneRun* oracle,
                                        const std::string& dump_dir, const Fp64Rerun* fp64 = nullptr);

// Whether every final parameter (step-0 gradient) tensor of an fp32 candidate is within fp32_relative of the
// reference's: when not, the runner makes the fp64 runs of Fp64Rerun.
bool final_params_within_fp32(const Tolerances& tol, const report::LaneRun& reference, const report::LaneRun& candidate);
bool step0_grads_within_fp32(const Tolerances& tol, const report::LaneRun& reference, const report::LaneRun& candidate);
// Whether every step-0 gradient of an fp32 candidate is within the oracle-relative bound (k x cp 1's own error
// against the fp64 oracle + fp32_relative): when not, the runner makes the cp N fp64 rerun too.
bool step0_grads_within_oracle(const Tolerances& tol, const report::LaneRun& reference, const report::LaneRun& candidate,
                               const report::LaneRun& oracle);
// Whether the loss, grad norm and param norm of every step from `from_step` on are within fp32_relative. When a
// step misses, the runner makes the fp64 oracle (step 0 is judged against it: k x cp 1's own error +
// fp32_relative); when a step after the first misses, the cp N rerun too, and those steps are judged between the
// reruns (as the final parameters are).
bool steps_within_fp32(const Tolerances& tol, const report::LaneRun& reference, const report::LaneRun& candidate,
                       size_t from_step);
// Whether the step-0 logits are: when not (nor the steps' figures), they are judged against the fp64 oracle.
bool step0_logits_within_fp32(const train::Case& c, const Tolerances& tol, const report::LaneRun& reference,
                              const report::LaneRun& candidate);

// cp 1's own error against `truth`, as a scale: per family of tensors (tensor_family), the largest; a tensor `cp1`
// lacks makes its family's infinite.
std::map<std::string, double> family_errors(const std::map<std::string, torch::Tensor>& cp1,
                                            const std::map<std::string, torch::Tensor>& truth);

// train.param_parity on the final parameters, tensor by tensor: observed is the worst error / allowed.
//   bf16 lane (`bf16_oracle`, cp 1 fp32): error vs that oracle <= bf16_k x cp 1's error + bf16_floor;
//   fp32 lane: cp N vs cp 1 <= fp32_relative, in fp32, or between the fp64 reruns of `fp64` when given.
CheckResult judge_final_params(const Tolerances& tol, const report::LaneRun& reference, const report::LaneRun& candidate,
                               const report::LaneRun* bf16_oracle, const Fp64Rerun* fp64);

// kvshare.loss_parity (cp N with the holder under cache-gated semantics vs the cp 1 sharing reference) and
// kvshare.bug_detected (without the holder the loss must move beyond tolerance). Only for cases with KV sharing.
// The runner makes both one-step cp N runs under cache-gated semantics: `with_holder` (the holder as the
// candidate passes it, `holder` says whether it did) and `without_holder` (the 5.5.0-style dead K/V).
std::vector<CheckResult> check_kvshare(const train::Case& c, int cp, const Tolerances& tol,
                                       const report::LaneRun& reference, const report::LaneRun& with_holder,
                                       const report::LaneRun& without_holder, bool holder);

// train.trained: did this run (the reference, cp = 1, or a candidate) train at all? Fails when any step's loss
// or gradient norm is not finite, any gradient norm is exactly zero (a dead model: two such runs agree
// perfectly and prove nothing), or, over more than one step, the loss never moves although every step sees a
// different batch. Judged for every run whatever checks the case selects: a non-finite or dead run is never a pass.
// `exemptions` (a case's trained_exemptions: part -> reason) waives the named parts, never the non-finite one;
// the details and the message say which were waived and why.
CheckResult check_trained(const report::LaneRun& run, const std::map<std::string, std::string>& exemptions = {});

// The data of the page's divergence figure (report.json divergence_profile, schema $defs/divergence_profile): the
// relative error of every hidden state at step 0 in forward order, then of every gradient in backward order, each
// with the threshold the training checks judge it by. Empty when the runs recorded no tensors.
nlohmann::json divergence_profile(const train::Case& c, const Tolerances& tol, const report::LaneRun& reference,
                                  const report::LaneRun& candidate, const report::LaneRun* oracle);

// power.boundary_label: can this case see a CP-shaped bug? `seen` are the case's selected parity checks judged on a
// one-step candidate whose `perturbation` (named in the report) a correct implementation never shows; at least one
// must fail, else the case is insensitive (a failure). `applicable` false (no parity check selected, or nothing to
// perturb): skipped, with `why`.
CheckResult check_power(int cp, const std::string& perturbation, const std::vector<CheckResult>& seen, bool applicable,
                        const std::string& why = "");

// The results of a perturbed run that can count as seeing its perturbation (check_power's `seen`): a failure whose
// twin (same check, metric and step) the unperturbed run fails too is noise the run shows without the perturbation
// (weights fp32 cannot hold to the bound), not sight of it.
std::vector<CheckResult> beyond_unperturbed(const std::vector<CheckResult>& perturbed,
                                            const std::vector<CheckResult>& unperturbed);

// determinism.repeat_bitwise: two runs are bit-identical (losses, grad norms, final parameters).
CheckResult check_determinism(const train::Case& c, int cp, const report::LaneRun& first, const report::LaneRun& second);

// The counts the cache checks expect for one rank and step of `c` at `cp`.
struct ExpectedCacheCounts {
  int64_t lookups = 0;  // layers x chunks x passes x segment pairs (1 contiguous, 4 zigzag)
  int64_t builds = 0;   // distinct keys: layer geometries x kv offsets x segment pairs
};
ExpectedCacheCounts expected_cache_counts(const train::Case& c, int cp, bool cache_enabled);

}  // namespace cpharness::check
