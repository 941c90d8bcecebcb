// Goldens exported from Hugging Face transformers (golden/export_hf.py): reading one, and running the C++ model
// on it at cp 1 (the plain model, eager attention) or cp N (ring attention over local ranks) from the golden's own
// weights and batch. Which KV-sharing semantics the C++ model uses follows the golden's provenance
// kv_share_mechanism: `cache-shared-layers` (transformers 5.5.0/5.5.1) runs cache-gated, the `shared-kv-states-*`
// mechanisms (5.5.2 and later) run shared-kv-states. Judging is check/hf_parity.h's job.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>

#include "harness/model/config.h"
#include "harness/report/run_dump.h"
#include "harness/train/batch.h"

namespace cpharness::runner {

struct HfGolden {
  std::string path;
  report::RunDump dump;
  model::ModelConfig config;     // from provenance `config`, with the semantics of `mechanism`
  std::string mechanism;         // provenance kv_share_mechanism
  std::string transformers_version;
  bool hf_use_cache = true;      // provenance hf_use_cache: whether HF ran with a cache
  train::Batch batch;            // from /inputs

  bool shares_kv() const { return config.num_kv_shared_layers > 0; }
  // Whether the C++ model needs the share holder to do what HF did: under cache-gated semantics HF shared K/V
  // only when it had a cache; the other semantics share regardless (the holder is then irrelevant).
  bool hf_shared_kv() const;
  double loss() const { return dump.steps.at(0).loss; }
  std::string id() const;        // provenance case_id, with "-no-cache" for a use_cache=False export
};

// Reads and validates an HF export: layout (report::read_run_dump), kind hf-export, provenance config and
// kv_share_mechanism, the inputs, weights, step 0's loss, logits and gradients. Every problem is an io::InputError
// naming the file and the field.
HfGolden load_hf_golden(const std::string& path);

// The C++ model's answer on the golden's batch.
struct HfRun {
  int cp = 1;
  bool holder = true;
  double loss = 0;
  torch::Tensor logits;                        // [B, S, V] global order, fp32
  std::map<std::string, torch::Tensor> grads;  // every parameter (zeros where the forward did not use it)
  double seconds = 0;
};

// Loads the golden's weights into a fresh model (fp32) and runs forward + backward at `cp` (1: eager, whole
// sequence; > 1: ring attention, ranks as threads). `holder` passes the KV-share holder (cache-gated only).
// `semantics` overrides the golden's (e.g. to run the correct, sharing reference against a buggy export).
HfRun run_on_hf_golden(const HfGolden& golden, int cp, bool holder);
HfRun run_on_hf_golden(const HfGolden& golden, int cp, bool holder, model::KvShareSemantics semantics);

}  // namespace cpharness::runner
