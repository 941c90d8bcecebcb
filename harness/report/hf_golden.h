// Goldens exported from Hugging Face transformers (golden/export_hf.py), read and validated, and the record of a
// C++ run on one (what hf.parity judges). Which KV-sharing semantics the C++ model uses follows the golden's
// provenance kv_share_mechanism: `cache-shared-layers` (transformers 5.5.0/5.5.1) runs cache-gated, the
// `shared-kv-states-*` mechanisms (5.5.2 and later) run shared-kv-states.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>

#include "harness/model/config.h"
#include "harness/report/run_dump.h"
#include "harness/train/batch.h"

namespace cpharness::report {

struct HfGolden {
  std::string path;
  RunDump dump;
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
  bool document_ids_from_positions = false;  // no /inputs/document_ids: derived from position restarts
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

}  // namespace cpharness::report
