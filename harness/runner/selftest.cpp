#include "harness/runner/selftest.h"

#include "harness/report/environment.h"
#include "harness/runner/golden.h"

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>

namespace cpharness::runner {

using report::Policy;
using report::Status;

SuiteOptions mutate(SuiteOptions o, const std::string& name) {
  auto& ring = o.run.ring;
  if (name == "window_off_by_one_at_shard_edge") ring.mutation = cp::RingMutation::kWindowOffByOneAtEdge;
  else if (name == "ring_rotated_wrong_way") ring.mutation = cp::RingMutation::kReverseRotation;
  else if (name == "dkdv_never_returned") ring.mutation = cp::RingMutation::kDropGradReturn;
  else if (name == "dkdv_returned_to_wrong_rank") ring.mutation = cp::RingMutation::kGradReturnToWrongRank;
  else if (name == "stale_block_mask_cache") ring.mutation = cp::RingMutation::kStaleGeneration;
  else if (name == "lse_merge_without_rescaling") ring.merge = kernels::LseMergeMode::kNoRescale;
  else if (name == "kv_shared_layers_without_holder") o.run.use_share_holder = false;
  else if (name == "labels_shifted_after_sharding") o.run.step_mutation = StepMutation::kShiftLabelsAfterSharding;
  else if (name == "padded_rows_not_zeroed") ring.mutation = cp::RingMutation::kPaddedRowsNotZeroed;
  else if (name == "cache_rebuilds_every_lookup") ring.cache_enabled = false;
  else if (name == "block_mask_partial_tiles_as_full") o.block_mask_mutation = check::BlockMaskMutation::kPartialAsFull;
  else if (name == "nondeterministic_repeat") o.perturb_repeat_seed = true;
  else if (name == "power_perturbation_not_applied") o.power_not_perturbed = true;
  else if (name == "dead_model_zero_weights") o.run.zero_weights = true;
  else if (name == "output_ignores_input") o.run.zero_final_norm = true;
  else if (name == "activation_checkpointing_not_applied") o.run.skip_reference_checkpointing = true;
  else if (name == "hop_limit_one_too_many") ring.mutation = cp::RingMutation::kHopLimitOneTooMany;
  else if (name == "cp_gradients_averaged") o.run.step_mutation = StepMutation::kAverageGradients;
  else if (name == "gradients_reduced_to_rank_zero") o.run.step_mutation = StepMutation::kGradientsReducedToRankZero;
  else if (name == "gradients_predivided_in_bf16") o.run.step_mutation = StepMutation::kGradientsPredivided;
  else if (name == "returned_dkdv_accumulated_in_bf16") ring.mutation = cp::RingMutation::kInputDtypeGradAccumulation;
  else if (name == "zigzag_chunk_order_swapped") o.run.step_mutation = StepMutation::kSwapZigzagHalves;
  else if (name == "micro_batch_gradients_cleared") o.run.step_mutation = StepMutation::kZeroGradPerMicroBatch;
  else if (name == "stream_merge_drops_chunk_in_flight") ring.mutation = cp::RingMutation::kStreamDropsChunkInFlight;
  else if (name == "stream_collects_every_chunk") ring.mutation = cp::RingMutation::kStreamCollectsEveryChunk;
  else if (name == "micro_batch_mean_of_means") o.run.step_mutation = StepMutation::kMeanOfMicroBatchMeans;
  else if (name == "block_masks_from_row_zero") ring.mutation = cp::RingMutation::kMasksFromRowZero;
  else if (name == "empty_chunks_computed") ring.mutation = cp::RingMutation::kComputesEmptyChunks;
  else if (name == "empty_zigzag_pairs_computed") ring.mutation = cp::RingMutation::kComputesEmptySegmentPairs;
  else if (name == "candidate_adamw_without_weight_decay") o.run.step_mutation = StepMutation::kCandidatesWithoutWeightDecay;
  else throw std::invalid_argument("unknown mutant '" + name + "'");
  return o;
}

std::vector<Mutant> selftest_mutants() {
  return {
      {"window_off_by_one_at_shard_edge", "sliding window q - k <= W on foreign chunks", "mask.dense_slice"},
      {"ring_rotated_wrong_way", "chunks labelled as coming from rank + s", "ring.rotation_order"},
      {"dkdv_never_returned", "foreign dK/dV stay where they were computed", "ring.grad_return"},
      {"dkdv_returned_to_wrong_rank", "foreign dK/dV sent to rank - d instead of their owner rank + d", "ring.grad_return"},
      {"stale_block_mask_cache", "cache generation never advances: a mask survives a new batch", "cache.generation_reset"},
      {"lse_merge_without_rescaling", "partial outputs summed without exp(lse_i - lse)", "attention.parity"},
      {"kv_shared_layers_without_holder", "cache-gated sharing without the holder: shared layers use dead K/V", "kvshare.loss_parity"},
      {"labels_shifted_after_sharding", "each rank shifts its own shard; shard-edge targets are lost", "train.loss_parity"},
      {"cp_gradients_averaged", "gradients averaged over the ranks instead of summed", "train.grad_norm_parity"},
      {"gradients_reduced_to_rank_zero", "the summed gradients copied back on rank 0 only; the other ranks keep their own",
       "train.rank_agreement"},
      // Within the bf16 lane's k x cp 1 bounds (it survived them at cp 3); in fp32 the two extra roundings stay
      // inside the summation's own bound, so it acts in bf16 alone.
      {"gradients_predivided_in_bf16", "each rank's bf16 gradients divided by cp before the all-reduce and multiplied "
       "back after (a predivide factor)", "train.grad_reduction", {}, {}, "bf16", "\"dtype\": \"bf16\""},
      // Weight decay moves a weight by lr x wd of itself a step (1e-6 here), a hundredth of what AdamW's step moves
      // it: judged against the weights it hides under fp32_relative, against the update it is plain.
      {"candidate_adamw_without_weight_decay", "the cp N runs' AdamW drops weight decay (the reference keeps 0.01)",
       "train.param_parity", {"train.loss_parity"}, {}, "default", "\"optimizer\": {\"weight_decay\"} > 0 (the default 0.01)"},
      // cp 8: a sum in the input dtype adds a rounding per ring step that carries a nonzero share; at cp 2 it is
      // the final rounding itself, and with a small window few chunks carry one.
      {"returned_dkdv_accumulated_in_bf16", "returned dK/dV summed in the input dtype (bf16) instead of fp32",
       "attention.parity", {}, {8}},
      {"hop_limit_one_too_many", "sliding layers fetch one chunk more than the window reaches", "ring.hop_limit", {}, {},
       "default", "\"ring\": {\"hop_limit\": true} and a window shorter than (cp - 1) x S_loc"},
      // Every number stays bitwise the same (an empty chunk merges with weight 0, its dK/dV are zeros): only the
      // work shows it, half of a causal ring's compute.
      {"empty_chunks_computed", "chunks with no allowed pair (a later rank's) computed instead of skipped",
       "ring.hop_limit"},
      // The same waste inside a chunk: under zigzag a chunk with work has sub-chunk pairs without (a rank's own late
      // queries against its early keys' mirror), which the chunk-level skip cannot see.
      {"empty_zigzag_pairs_computed", "zigzag sub-chunk pairs with no allowed pair computed inside chunks that have work",
       "ring.hop_limit", {}, {}, "zigzag", "\"sharding\": \"zigzag\""},
      {"zigzag_chunk_order_swapped", "each rank's two zigzag sub-chunks laid in the wrong order (the ring masks by the layout)",
       "shard.layout", {}, {}, "zigzag"},
      {"stream_merge_drops_chunk_in_flight", "streaming ring: the chunk that arrives at the last ring step is never merged",
       "attention.parity", {}, {}, "stream", "\"ring\": {\"mode\": \"stream\"}"},
      {"stream_collects_every_chunk", "\"stream\" mode that still collects every chunk before computing", "ring.chunks_held",
       {}, {}, "stream", "\"ring\": {\"mode\": \"stream\"}"},
      {"micro_batch_gradients_cleared", "gradients cleared before every micro-batch: only the last reaches the update",
       "train.grad_norm_parity", {}, {}, "micro_batches", "\"micro_batches\" > 1"},
      {"micro_batch_mean_of_means", "each micro-batch's loss divided by its own counted tokens: a mean of micro-batch means",
       "train.loss_parity", {}, {}, "micro_batches", "\"micro_batches\" > 1 and rows that count different tokens (data.rows)"},
      {"block_masks_from_row_zero", "block masks built for row 0 and broadcast over the batch (flex's B=None)",
       "attention.parity", {}, {}, "rows", "\"data.batch\" > 1 with rows that differ (data.rows)"},
      {"padded_rows_not_zeroed", "empty query rows take V of local index 0", "attention.parity"},
      {"cache_rebuilds_every_lookup", "block-mask cache off: every lookup builds", "cache.build_count"},
      {"block_mask_partial_tiles_as_full", "analytic builder calls partial tiles full", "mask.block_classification"},
      {"nondeterministic_repeat", "the repeat run draws other initial weights", "determinism.repeat_bitwise"},
      {"power_perturbation_not_applied", "the power check's perturbed run carries no perturbation",
       "power.boundary_label", {"train.loss_parity", "train.grad_norm_parity"}},
      {"dead_model_zero_weights", "every weight zero in every run: two dead models agree", "train.trained"},
      {"output_ignores_input", "final norm weight zero in every run: logits 0 at every position, loss ln(vocab)",
       "train.trained"},
      // Upstream #3677: checkpointing silently skipped, +16 % memory and not one number moved.
      {"activation_checkpointing_not_applied", "the reference's activation checkpointing silently not applied",
       "memory.activations", {}, {}, "memory", "\"reference_checkpointing\": true and a golden"},
  };
}

train::Case selftest_case(const std::string& variant) {
  nlohmann::json j = {
      {"id", "selftest"},
      {"description", "E4B-like layout at tiny width: 8 layers, KV sharing (4..7 read 2 / 3), packed documents, padding"},
      {"model", {{"preset", "tiny-e4b"},
                 {"overrides", {{"num_hidden_layers", 8},
                                {"layer_types", {"sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
                                                 "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"}},
                                {"num_kv_shared_layers", 4},
                                {"sliding_window", 6}}}}},
      {"weights", {{"init_seed", 5}}},
      {"data", {{"batch", 1}, {"seq_len", 40}, {"document_lengths", {15, 20}}, {"padding", 5}, {"seed", 9}}},
      {"dtype", "fp32"},
      {"steps", 2},
      {"cp", {3}},  // 3, not 2: at cp 2 rank - 1 and rank + 1 are the same rank, so a reversed ring is invisible
      {"block_size", 4},
      {"ring", {{"hop_limit", true}}},  // S_loc 14, window 6: sliding layers take 1 ring step of 2
  };
  if (variant == "zigzag") {
    j["sharding"] = "zigzag";
    j.erase("ring");  // the hop limit needs contiguous shards
  } else if (variant == "stream") {
    j["ring"]["mode"] = "stream";
  } else if (variant == "micro_batches" || variant == "rows") {
    // Row 1 packs other documents behind other padding: 35 and 31 tokens, 33 and 28 of them with targets.
    j["data"]["batch"] = 2;
    j["data"]["rows"] = {nlohmann::json::object(), {{"document_lengths", {6, 12, 13}}, {"padding", 9}}};
    if (variant == "micro_batches") j["micro_batches"] = 2;
  } else if (variant == "bf16") {
    j["dtype"] = "bf16";
  } else if (variant == "memory") {
    j["reference_checkpointing"] = true;  // its golden (run_selftest records it) holds the checkpointed memory
  } else if (variant != "default") {
    throw std::invalid_argument("unknown selftest case variant '" + variant + "'");
  }
  return train::case_from_json(j, "<selftest case>");
}

std::map<std::string, train::Case> selftest_baselines(const std::vector<Mutant>& mutants) {
  std::map<std::string, train::Case> cases;
  for (auto& m : mutants) {
    auto [it, fresh] = cases.try_emplace(m.variant, selftest_case(m.variant));
    auto& c = it->second;
    if (fresh) c.checks.clear();
    auto select = [&c](const std::string& check) {
      if (std::find(c.checks.begin(), c.checks.end(), check) == c.checks.end()) c.checks.push_back(check);
    };
    select(m.target_check);
    for (const auto& check : m.with_checks) select(check);  // as the mutant's run has them (what judges the target)
    for (auto n : m.cp)  // the baseline passes at every cp size a mutant runs at, so the failure is the mutant's
      if (std::find(c.cp_sizes.begin(), c.cp_sizes.end(), n) == c.cp_sizes.end()) c.cp_sizes.push_back(n);
  }
  return cases;
}

report::Report run_selftest(const SuiteOptions& base, const std::vector<std::string>& only) {
  auto rep = report::new_report("cpu", base.comm);
  const auto start = std::chrono::steady_clock::now();
  auto mutants = selftest_mutants();
  if (!only.empty()) {
    std::vector<Mutant> keep;
    for (auto& m : mutants)
      for (auto& o : only)
        if (m.name == o) keep.push_back(m);
    mutants = keep;
  }
  auto cases = selftest_baselines(mutants);
  // The memory variant judges the reference against a golden: one recorded here, by the unmutated code.
  struct RemovedAtExit {
    std::string path;
    ~RemovedAtExit() {
      std::error_code ec;
      if (!path.empty()) std::filesystem::remove(path, ec);
    }
  } golden;
  if (auto it = cases.find("memory"); it != cases.end()) {
    golden.path = (std::filesystem::temp_directory_path() / fmt::format("cpharness-selftest-{}-golden.h5", ::getpid())).string();
    report::write_run_dump(golden.path, reference_dump(it->second, report::kKindGolden));
    it->second.golden = golden.path;
  }
  for (auto& [variant, c] : cases) {
    std::cerr << fmt::format("[selftest] baseline (no mutant, {} case)\n", variant);
    auto baseline = run_case(c, base);
    baseline.id = variant == "default" ? "selftest.baseline" : "selftest.baseline." + variant;
    rep.cases.push_back(baseline);
  }

  for (auto& m : mutants) {
    std::cerr << fmt::format("[selftest] mutant {}: {}\n", m.name, m.bug);
    auto mc = cases.at(m.variant);
    const auto case_cp = selftest_case(m.variant).cp_sizes;
    mc.checks = {m.target_check};
    mc.checks.insert(mc.checks.end(), m.with_checks.begin(), m.with_checks.end());
    mc.cp_sizes = m.cp.empty() ? case_cp : m.cp;
    auto caught = run_case(mc, mutate(base, m.name));
    report::CaseReport out;
    out.id = "selftest." + m.name;
    out.description = m.bug;
    out.cp_sizes = caught.cp_sizes;
    out.dtype = caught.dtype;
    out.duration_s = caught.duration_s;
    int failures = 0;
    std::string evidence;
    for (auto& chk : caught.checks)
      if (chk.name == m.target_check && chk.status == Status::Fail) {
        if (!failures) evidence = chk.message;
        ++failures;
      }
    auto result = report::CheckResult::judge(m.target_check, int(mc.cp_sizes.front()), std::nullopt, "mutant_caught", failures > 0 ? 1.0 : 0.0, 1.0,
                                             Policy::Count,
                                             {{"mutant", m.name}, {"bug", m.bug}, {"failing_results", failures},
                                              {"evidence", evidence}, {"case_error", caught.error ? *caught.error : ""}});
    result.message = failures > 0 ? fmt::format("caught by {}: {}", m.target_check, evidence)
                                  : fmt::format("NOT caught: {} passed with mutant {}{}", m.target_check, m.name,
                                                caught.error ? " (case error: " + *caught.error + ")" : "");
    out.checks.push_back(result);
    std::cerr << fmt::format("[selftest]   {}\n", result.message);
    rep.cases.push_back(out);
  }
  rep.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return rep;
}

}  // namespace cpharness::runner
