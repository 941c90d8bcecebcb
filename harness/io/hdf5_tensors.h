// HDF5 tensor files (goldens, dumps, user-supplied runs): name -> tensor, plus string attributes for provenance.
//
// Layout and conventions (stable; the Python exporters and users' dumps must follow them too):
//   - A tensor name is a '/'-separated path; every component but the last is a group, the last a dataset:
//     "step_0/logits" is dataset "logits" in group "step_0". Dots are ordinary characters
//     ("weights/layers.0.self_attn.q_proj.weight"). A leading '/' is optional; empty components and "." are
//     rejected. Names returned by the reader never start with '/'.
//   - Dataset types: float32/float64 -> IEEE LE floats; float16 -> the 16-bit IEEE float type h5py uses (numpy
//     float16); int64/int32/int16/int8/uint8 -> standard LE integers;
//     bfloat16 -> uint16 holding the raw bf16 bits, with string attribute dtype="bfloat16";
//     bool -> uint8 (0/1), with string attribute dtype="bool".
//     All round-trip bit-exactly (NaN payloads included). The dataset attribute "dtype" is reserved for this.
//   - 0-d tensors are scalar dataspaces; empty tensors are datasets with a zero extent.
//   - Attributes written here are scalar variable-length UTF-8 strings (what h5py writes for str); the reader also
//     accepts fixed-length strings and skips attributes that are not strings (non_string_attributes names them).
//   - Files are written atomically: PATH.tmp-* in the same directory, renamed over PATH on commit.
//
// Errors: every failure (missing file, not an HDF5 file, missing dataset/group, unsupported or unexpected dtype,
// HDF5 library errors) is an InputError naming the file and the dataset or group. HDF5's automatic error-stack
// printing is switched off while these functions run; its innermost messages go into the InputError's reason.
// All calls into HDF5 from this module are serialised by one process-wide mutex (ranks may be threads).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "harness/io/input_error.h"  // every error of this API is an InputError

namespace cpharness::io {

namespace detail {
// The lock every HDF5 call of this module holds (read_in_a_child_first forks with it held, so that no other thread
// is inside the library at that moment).
std::unique_lock<std::recursive_mutex> hold_hdf5_lock();
// In a forked child, whose copy of the lock is held by a thread the child does not have: a fresh lock.
void renew_hdf5_lock_in_child();
}  // namespace detail

using TensorMap = std::map<std::string, torch::Tensor>;
using StringMap = std::map<std::string, std::string>;
// Object path ("" or "/" for the file root, a group or a dataset name) -> its string attributes.
using AttributeMap = std::map<std::string, StringMap>;

struct DatasetInfo {
  torch::ScalarType dtype;
  std::vector<std::int64_t> shape;
};

// Writes a new HDF5 file; nothing appears at PATH until commit(). Destroying an uncommitted writer removes the
// temp file. Not copyable.
class Hdf5Writer {
 public:
  // `replace_existing` false: the commit refuses to overwrite a file at `path` (one made while this was written).
  explicit Hdf5Writer(std::string path, bool replace_existing = true);
  ~Hdf5Writer();
  Hdf5Writer(const Hdf5Writer&) = delete;
  Hdf5Writer& operator=(const Hdf5Writer&) = delete;

  // Writes one dataset (creating intermediate groups). Any device; stored from a contiguous CPU copy.
  // Writing a name twice, or a name under an existing dataset, is an InputError.
  void write(const std::string& name, const torch::Tensor& tensor);
  // Sets a string attribute on an object: "" or "/" is the root, otherwise an existing dataset or a group
  // (created if it does not exist yet). Setting "dtype" on a dataset is an InputError (reserved).
  void set_attribute(const std::string& object, const std::string& key, const std::string& value);
  // Closes the file and renames it into place. Further calls are errors.
  void commit();

  const std::string& path() const { return path_; }

 private:
  struct Impl;
  std::string path_;
  bool replace_existing_ = true;
  std::unique_ptr<Impl> impl_;
};

// Reads an HDF5 file (kept open until destruction). Not copyable.
class Hdf5Reader {
 public:
  explicit Hdf5Reader(std::string path);  // InputError: missing file, not an HDF5 file
  ~Hdf5Reader();
  Hdf5Reader(const Hdf5Reader&) = delete;
  Hdf5Reader& operator=(const Hdf5Reader&) = delete;

  // Every dataset at or below `group` (recursively), as full names without leading '/', sorted.
  // A missing group (or one that is a dataset) is an InputError, and so is a group below it with more than one name
  // (a hard link to a group: a cycle or an alias, whose contents a walk would see under one name only).
  std::vector<std::string> list_datasets(const std::string& group = "/") const;
  // Every dataset and every group strictly below `group` (empty groups included: a layout may refuse them by name),
  // from one walk with list_datasets' rules.
  struct Contents {
    std::vector<std::string> datasets, groups;
  };
  Contents contents(const std::string& group = "/") const;
  bool has_dataset(const std::string& name) const;
  DatasetInfo info(const std::string& name) const;
  // Reads one dataset as an owned contiguous CPU tensor in its stored dtype. With `expected`, a different stored
  // dtype is an InputError (no silent conversion).
  torch::Tensor read(const std::string& name, std::optional<torch::ScalarType> expected = std::nullopt) const;
  // Every dataset at or below `group`, keyed by full name.
  TensorMap read_all(const std::string& group = "/") const;
  // The string attributes of an object ("" or "/" = root); missing object is an InputError.
  StringMap attributes(const std::string& object = "/") const;
  // The attributes attributes() skips (not a single string), each with what it holds ("integer", "float",
  // "string array", ...): for readers whose attributes must all be strings, to name the offender.
  StringMap non_string_attributes(const std::string& object = "/") const;

  const std::string& path() const { return path_; }

 private:
  struct Impl;
  std::string path_;
  std::unique_ptr<Impl> impl_;
};

// Convenience wrappers.
void write_hdf5(const std::string& path, const TensorMap& tensors, const AttributeMap& attributes = {});
TensorMap read_hdf5(const std::string& path, const std::string& group = "/");
torch::Tensor read_hdf5_dataset(const std::string& path, const std::string& name,
                                std::optional<torch::ScalarType> expected = std::nullopt);
std::vector<std::string> list_hdf5_datasets(const std::string& path, const std::string& group = "/");
StringMap read_hdf5_attributes(const std::string& path, const std::string& object = "/");

}  // namespace cpharness::io
