// Weights in and out of the model: the expected names and shapes (computed from the config, no allocation),
// loading from a name -> tensor map (HF safetensors checkpoints: `model.language_model.` or `model.` prefixes,
// bf16/fp16/fp32, with or without the shared layers' redundant k/v tensors), and checkpoint files.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "harness/io/safetensors.h"
#include "harness/model/config.h"
#include "harness/model/gemma4.h"

namespace cpharness::model {

struct TensorSpec {
  std::string name;  // checkpoint name without prefix, e.g. "layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
  bool is_buffer = false;  // layer_scalar
};

// Every tensor the model of `config` owns, in model order, without allocating anything.
std::vector<TensorSpec> tensor_specs(const ModelConfig& config);

struct LoadSummary {
  int64_t loaded = 0;
  std::vector<std::string> skipped_redundant;   // shared layers' k/v tensors the model does not own; lm_head (tied, equal)
  std::vector<std::string> skipped_non_text;    // vision/audio towers
  std::vector<std::string> kept_init;           // cache-gated shared layers' own K/V, absent (kept as initialised)
};

// Copies `tensors` into `model` (converting dtype). Missing tensors, unknown text-model names and shape
// mismatches are io::InputError naming `source` and every offending tensor; the one exception is a cache-gated
// model's shared layers' own K/V weights (used only without the share holder), which newer transformers do not
// save: absent, they keep their initialisation (LoadSummary::kept_init).
LoadSummary load_weights(Gemma4Model& model, const std::map<std::string, torch::Tensor>& tensors, const std::string& source);

// load_weights' checks on names, shapes and dtypes (floating point only), from the tensors' descriptions alone: no
// model, no data. A NaN or Inf weight is found by load_weights (it needs the data).
LoadSummary check_weights(const ModelConfig& config, const std::map<std::string, io::TensorInfo>& tensors,
                          const std::string& source);
// The same from the tensors themselves (their dtypes and shapes).
LoadSummary check_weights(const ModelConfig& config, const std::map<std::string, torch::Tensor>& tensors,
                          const std::string& source);

// The model's tensors by checkpoint name (parameters and layer_scalar buffers), detached.
std::map<std::string, torch::Tensor> model_tensors(Gemma4Model& model);

// Detached host copies, by parameter name, in `dtype`: every parameter's gradient (zeros where the forward did not
// use it), or every parameter's value. What runs record for the checks.
std::map<std::string, torch::Tensor> gradient_copies(Gemma4Model& model, torch::ScalarType dtype);
std::map<std::string, torch::Tensor> parameter_copies(Gemma4Model& model, torch::ScalarType dtype);

// A second model over the same weights: every parameter and buffer aliases the source's storage (same dtype,
// device and values; an update to one is an update to both), while its parameters are leaves of its own, so its
// gradients are its own. Building it allocates one host initialisation of the model and frees it at once.
Gemma4Model model_sharing_weights(Gemma4Model& source);

}  // namespace cpharness::model

namespace cpharness::model {

// An HF safetensors checkpoint (file, directory, or sharded index json) into `model`.
LoadSummary load_checkpoint(Gemma4Model& model, const std::string& path);

// The checkpoint's headers against the model of `config` (check_weights): what a case checks when it is loaded,
// before any model is built. Errors name the file that lists the tensors (the .safetensors file or the index).
LoadSummary check_checkpoint(const ModelConfig& config, const std::string& path);

// The model's tensors as an HDF5 file (dataset per checkpoint name under /weights, config json as an attribute),
// and back. Loading checks names and shapes like load_weights.
void save_weights_hdf5(Gemma4Model& model, const std::string& path);
LoadSummary load_weights_hdf5(Gemma4Model& model, const std::string& path);

}  // namespace cpharness::model
