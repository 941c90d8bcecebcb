// RunDump: what one training run records, and its HDF5 file layout (layout_version "1").
//
// One type for every producer: a cp1 reference, a cpN candidate, a committed golden, or an export from another
// training stack (Hugging Face transformers via golden/export_hf.py, or a user's own stack writing with h5py).
// The file layout is documented for non-C++ writers in golden/README.md; in short:
//
//   /                        attribute layout_version = "1"
//   /provenance              group; string attributes (tool, tool_version, git_sha, torch_version, kind, ...)
//   /inputs/<name>           the batch: input_ids, labels, position_ids, document_ids, padding, vision_group_ids
//   /weights/<name>          optional initial weights, HF checkpoint names ("layers.0.self_attn.q_proj.weight")
//   /steps/<k>/loss          float64 scalar (required for every step)
//   /steps/<k>/activation_bytes  optional int64 scalar
//   /steps/<k>/grad_norm     float64 scalar (optional)
//   /steps/<k>/param_norm    float64 scalar (optional)
//   /steps/<k>/logits        optional tensor
//   /steps/<k>/hidden/<i>    optional tensors; i = 0 is the embedding output, i + 1 the output of layer i
//   /steps/<k>/grads/<name>  optional tensors, keyed by parameter name
//
// <k> and <i> are decimal integers without sign or leading zeros ("0", "12"). Tensors use the dtype conventions of
// harness/io/hdf5_tensors.h (bf16 as uint16 bits + dataset attribute dtype="bfloat16"). Anything else in the file is
// a layout error: the reader is strict so that a typo in a foreign writer cannot silently drop data from a compare.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <torch/torch.h>

#include "harness/io/hdf5_tensors.h"

namespace cpharness::report {

inline constexpr const char* kRunDumpLayoutVersion = "1";

// Allowed values of provenance["kind"].
inline constexpr const char* kKindGolden = "golden";
inline constexpr const char* kKindDump = "dump";
inline constexpr const char* kKindHfExport = "hf-export";

struct StepRecord {
  double loss = 0.0;
  std::optional<double> grad_norm;   // global L2 norm of all gradients (before clipping)
  std::optional<double> param_norm;  // global L2 norm of all parameters after this step's update
  torch::Tensor logits;              // undefined when not recorded
  std::map<std::int64_t, torch::Tensor> hidden;  // 0 = embedding output, i + 1 = after layer i
  io::TensorMap grads;                           // parameter name -> gradient
  // Bytes the forward left alive for the backward (report::TrainingStep::activation_bytes); judged by
  // memory.activations, not by compare_dumps.
  std::optional<std::int64_t> activation_bytes;
};

struct RunDump {
  // Free-form string map; the documented keys are tool, tool_version, git_sha, torch_version,
  // transformers_version (optional), dtype (the lane: "fp32" | "bf16"), case_id, case_hash, config (JSON text),
  // kind ("golden" | "dump" | "hf-export", required), kv_share_mechanism (optional).
  io::StringMap provenance;
  io::TensorMap inputs;                      // input_ids, labels, position_ids, document_ids, padding, vision_group_ids
  io::TensorMap weights;                     // optional initial weights
  std::map<std::int64_t, StepRecord> steps;  // step index k -> record; at least one step
};

// Provenance every C++ producer should start from: tool, tool_version, git_sha, torch_version and kind.
io::StringMap base_provenance(const std::string& kind);

// Writes DUMP to PATH atomically (temp file + rename). Throws io::InputError (naming the path and the offending
// entry) for a dump that cannot be represented: no steps, a negative step or layer index, an empty name or one
// containing '/', an undefined tensor, a kind that is not one of the three.
// `replace_existing` false: a file at PATH when the dump is committed (one another process made meanwhile) is an
// InputError, not overwritten.
void write_run_dump(const std::string& path, const RunDump& dump, bool replace_existing = true);

// Reads a run dump. Every layout violation is an io::InputError naming the file and the offending HDF5 path:
// missing or unsupported layout_version, missing /provenance or provenance kind, missing or empty /steps,
// a non-numeric step or layer name, a step without loss, a scalar that is not a floating-point scalar,
// an unknown dataset anywhere in the file.
RunDump read_run_dump(const std::string& path);

// The provenance of the dump at `path`, checked as read_run_dump checks it (layout version, string values, kind),
// without reading a tensor: what a golden is, asked before any work.
io::StringMap read_run_dump_provenance(const std::string& path);

}  // namespace cpharness::report
