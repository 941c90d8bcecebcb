// Hugging Face safetensors files: reading (single file or sharded checkpoint) and writing.
//
// Format (https://github.com/huggingface/safetensors): 8-byte little-endian u64 N, then N bytes of UTF-8 JSON
//   {"NAME": {"dtype": "F32", "shape": [d0, ...], "data_offsets": [BEGIN, END]}, ..., "__metadata__": {str: str}}
// (possibly padded with trailing spaces), then the byte buffer. Offsets are relative to the start of the buffer
// (the end of the header). The reader is as strict as the reference implementation: every tensor's byte range
// must equal numel x element size, the ranges must tile the buffer exactly (no gaps, no overlap, no trailing bytes),
// and names must be unique. Any violation is an InputError naming the file and the tensor.
//
// Dtypes: F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8 BOOL. Tensors come back as owned,
// contiguous CPU tensors in their stored dtype; converting is the caller's business. Host must be little-endian.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

#include "harness/io/input_error.h"  // every error of this API is an InputError

namespace cpharness::io {

using TensorMap = std::map<std::string, torch::Tensor>;
using StringMap = std::map<std::string, std::string>;

// Reads every tensor of one .safetensors file.
TensorMap read_safetensors(const std::string& path);

// The "__metadata__" string map of one .safetensors file (empty if absent); reads the header only.
StringMap read_safetensors_metadata(const std::string& path);

// Reads a checkpoint given as
//   - a single .safetensors file,
//   - a directory holding model.safetensors (preferred, as in transformers) or model.safetensors.index.json,
//   - a sharded-checkpoint index json ({"metadata": ..., "weight_map": {tensor: shard file}}); shard files are
//     resolved relative to the index's directory.
// For a sharded checkpoint exactly the tensors of weight_map are returned; a missing shard file, a tensor that
// its shard does not hold, a shard holding a tensor weight_map does not list for it, or a name listed twice is an
// InputError naming the index, the tensor and the shard.
TensorMap read_safetensors_checkpoint(const std::string& path);

// What read_safetensors_checkpoint would return, from the headers alone (nothing allocated but the headers): the
// dtype and shape of every tensor, and the file that lists them (the .safetensors file or the index json).
struct TensorInfo {
  torch::ScalarType dtype;
  std::vector<std::int64_t> shape;
};
struct CheckpointInfo {
  std::string file;
  std::map<std::string, TensorInfo> tensors;
};
CheckpointInfo read_safetensors_checkpoint_info(const std::string& path);

// Writes `tensors` (any device/layout; stored contiguous from CPU) with optional "__metadata__", byte-identical to
// the Python reference's save_file: compact JSON with "__metadata__" first, tensors ordered by dtype (U64 I64 F64
// F32 U32 I32 BF16 F16 U16 I16 F8_E4M3 F8_E5M2 I8 U8 BOOL) then name, header padded with spaces to a multiple of 8. Atomic: writes PATH.tmp-* in the same directory, then renames it over PATH.
// A tensor named "__metadata__" or of an unsupported dtype is an InputError.
void write_safetensors(const std::string& path, const TensorMap& tensors, const StringMap& metadata = {});

// The safetensors dtype string for a torch dtype ("F32", ...); throws std::invalid_argument if unsupported.
std::string safetensors_dtype_name(torch::ScalarType dtype);

}  // namespace cpharness::io
