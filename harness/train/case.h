// A case file (cases/*.json, schema in cases/README.md): which model, which weights, which data, which lane,
// how many steps, which CP sizes. Validated on load: unknown keys and wrong types are errors naming the key.
#pragma once
#include <nlohmann/json.hpp>

#include <optional>
#include <map>
#include <string>
#include <vector>

#include "harness/model/config.h"
#include "harness/model/layer_checkpoint.h"
#include "harness/model/weights.h"
#include "harness/train/batch.h"
#include "harness/train/trainer.h"

namespace cpharness::train {

// fp64 is an exactness lane: CP and cp 1 differ only by summation order, so any real bug stands out.
enum class DtypeLane { kFp32, kBf16, kFp64 };

// Tolerances of a case (design.md "Tolerance policy"); the check layer turns them into thresholds.
struct CaseTolerances {
  double fp32_relative = 1e-5;
  double bf16_k = 2.0;
  double bf16_floor = 1e-3;
  double fp32_oracle_k = 2.0;
  double cp_growth = 0.0;  // thresholds x (1 + cp_growth * log2(cp))
  double activation_memory = 0.01;  // memory.activations: relative change allowed against the golden
};

// The parts of train.trained a case may waive (Case::trained_exemptions); a non-finite run can never be waived.
inline constexpr const char* kExemptZeroGradNorm = "zero_grad_norm";
inline constexpr const char* kExemptLossFrozen = "loss_frozen";
inline constexpr const char* kExemptOutputIgnoresInput = "output_ignores_input";

struct Case {
  std::string id;
  std::string path;
  std::string description;
  model::ModelConfig model;
  uint64_t init_seed = 0;
  std::string checkpoint;  // HF safetensors file/dir; empty: seeded init
  // What the checkpoint's headers gave the model (set when the case is loaded): how many tensors it loads, which it
  // skips, and which keep their seeded initialisation (a cache-gated model's shared layers' own K/V). The report
  // carries it, so a weight that did not come from the checkpoint is never silent.
  model::LoadSummary checkpoint_contents;
  std::string golden;      // a stored golden of this case (golden record) that `run` checks the cp 1 reference against
  BatchSpec data;
  DtypeLane dtype = DtypeLane::kFp32;
  int64_t steps = 3;
  OptimizerOptions optimizer;
  std::vector<int64_t> cp_sizes = {2};
  std::vector<std::string> requires_features;  // e.g. "cuda"
  std::vector<std::string> checks;             // catalogue names or prefixes ("cache."); empty: all
  CaseTolerances tolerances;
  int64_t q_block = 128;                       // block-mask query block ("block_size": n, or {"q": n, "kv": m})
  int64_t kv_block = 128;                      // block-mask key/value block
  int64_t gradient_bucket_elements = 0;        // the gradient all-reduce's bucket; 0: the runtime's (64 MiB)
  bool block_mask_cache = true;                // run the candidate with the block-mask cache on
  bool ring_hop_limit = false;                 // "ring": {"hop_limit": true}: sliding layers fetch only what W reaches
  std::string ring_mode = "collect";           // "ring": {"mode": "stream"}: exchanges posted ahead, dK/dV travelling
  // The candidates recompute each decoder layer in backward: kKvHolder (the key's true) or kLayerOnly (layer_checkpoint.h).
  model::ActivationCheckpointing activation_checkpointing = model::ActivationCheckpointing::kOff;
  int64_t micro_batches = 1;                   // gradient accumulation: the batch's rows in this many micro-batches
  std::string sharding = "contiguous";         // "contiguous" or "zigzag" (2 cp sub-chunks, rank r holds r and 2cp-1-r)
  bool record_tensors = true;                  // false: no step-0 tensors or final parameters kept (real sizes)
  int64_t reference_cp = 1;                    // the CP size of the run candidates are judged against
  // The reference (and its oracle) recompute each decoder layer in backward (kv_holder), whatever the candidates
  // do: memory for real sizes, where the eager reference's attention probabilities of every layer do not fit.
  bool reference_checkpointing = false;
  int64_t loss_chunk_tokens = 0;               // > 0: chunked LM head + cross entropy (no [S, V] logits)
  std::string device = "cpu";                  // "cpu", "cuda" or "cuda:N": where every run of the case trains
  // train.trained parts the case opts out of, each named with the reason shown in the report ("zero_grad_norm",
  // "loss_frozen", "output_ignores_input"; a non-finite loss or grad norm can never be waived).
  std::map<std::string, std::string> trained_exemptions;
  nlohmann::json raw;                          // the file as read, for provenance
};

// Sizes a case may ask for (checked on load, before anything is allocated).
inline constexpr int64_t kMaxSeqLen = int64_t(1) << 21;  // tokens per row
inline constexpr int64_t kMaxBatch = 1024;
inline constexpr int64_t kMaxTokens = int64_t(1) << 23;  // batch x seq_len
inline constexpr int64_t kMaxCp = 4096;
inline constexpr int64_t kMaxSteps = 100000;  // optimizer steps of one case
// Why `cp` cannot split `seq_len` tokens (more ranks than tokens, or above kMaxCp), or nullopt.
std::optional<std::string> cp_size_problem(int64_t cp, int64_t seq_len);

// Step `step`'s batch cut along its rows into the case's micro_batches (one: the batch itself).
std::vector<Batch> micro_batches_for_step(const Case& c, int64_t step);

Case case_from_json(const nlohmann::json& j, const std::string& path);
Case load_case(const std::string& path);
// A file, or every *.json in a directory (sorted by name).
std::vector<Case> load_cases(const std::vector<std::string>& paths);

std::string to_string(DtypeLane lane);
// The dtype a lane trains in: fp32, bf16 or fp64 (the exactness lane).
torch::ScalarType lane_dtype(DtypeLane lane);

// The batch of optimizer step k: the case's data with its seed advanced by k and its documents rotated by k,
// so that consecutive steps have different masks (a stale cached mask shows).
Batch batch_for_step(const Case& c, int64_t step);

}  // namespace cpharness::train
