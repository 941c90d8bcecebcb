#include "harness/io/safetensors.h"

#include "harness/io/error_text.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <tuple>
#include <unistd.h>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/io/atomic_file.h"
#include "harness/io/input_error.h"
#include "harness/io/json_input.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors IO assumes a little-endian host");

namespace cpharness::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
constexpr const char* kMetadataKey = "__metadata__";

struct DtypeEntry {
  const char* name;
  torch::ScalarType type;
  int rank;  // position in the reference implementation's Dtype enum; its writer orders tensors by it, descending
};

constexpr DtypeEntry kDtypes[] = {
    {"BOOL", torch::kBool, 0},          {"U8", torch::kUInt8, 1},     {"I8", torch::kInt8, 2},
    {"F8_E5M2", torch::kFloat8_e5m2, 3}, {"F8_E4M3", torch::kFloat8_e4m3fn, 4},
    {"I16", torch::kInt16, 5},          {"U16", torch::kUInt16, 6},   {"F16", torch::kFloat16, 7},
    {"BF16", torch::kBFloat16, 8},      {"I32", torch::kInt32, 9},    {"U32", torch::kUInt32, 10},
    {"F32", torch::kFloat32, 11},       {"F64", torch::kFloat64, 12}, {"I64", torch::kInt64, 13},
    {"U64", torch::kUInt64, 14},
};

int dtype_rank(torch::ScalarType t) {
  for (const auto& e : kDtypes) {
    if (e.type == t) return e.rank;
  }
  return -1;
}

bool dtype_from_name(const std::string& name, torch::ScalarType* out) {
  for (const auto& e : kDtypes) {
    if (name == e.name) {
      *out = e.type;
      return true;
    }
  }
  return false;
}

struct Entry {
  std::string name;
  torch::ScalarType dtype;
  std::string dtype_name;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

struct Header {
  std::uint64_t header_len = 0;   // N
  std::uint64_t buffer_len = 0;   // file size - 8 - N
  std::vector<Entry> entries;     // in data order
  StringMap metadata;
};

std::uint64_t file_size_or_throw(const std::string& path) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) throw InputError(path, "", ec.message());  // a symlink loop
  if (ec || !fs::exists(status)) throw InputError(path, "", "no such file");
  if (fs::is_directory(status)) throw InputError(path, "", "is a directory, expected a .safetensors file");
  if (!fs::is_regular_file(status)) throw InputError(path, "", "is not a regular file, expected a .safetensors file");
  const auto size = fs::file_size(path, ec);
  if (ec) throw InputError(path, "", "cannot determine file size: " + ec.message());
  return size;
}

void read_exact(std::ifstream& in, const std::string& path, const std::string& what, char* dst, std::uint64_t n,
                std::uint64_t offset) {
  in.seekg(static_cast<std::streamoff>(offset));
  // Read in chunks so a single >2 GiB tensor does not overflow std::streamsize on any platform.
  constexpr std::uint64_t kChunk = 1ULL << 30;
  std::uint64_t done = 0;
  while (done < n && in) {
    const std::uint64_t len = std::min(kChunk, n - done);
    in.read(dst + done, static_cast<std::streamsize>(len));
    done += static_cast<std::uint64_t>(in.gcount());
  }
  if (done != n) {
    throw InputError(path, what,
                     "read " + std::to_string(done) + " of " + std::to_string(n) + " bytes at offset " +
                         std::to_string(offset) + " (file truncated or unreadable)");
  }
}

std::uint64_t json_uint(const json& v, const std::string& path, const std::string& what, const std::string& field) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  throw InputError(path, what, field + " must hold non-negative integers, got " + describe_json(v));
}

// The 8-byte little-endian header length, checked against the file; the JSON header text after it.
std::string read_header_text(std::ifstream& in, const std::string& path, std::uint64_t file_size, Header& h) {
  if (file_size < 8) {
    throw InputError(path, "header", "file is " + std::to_string(file_size) +
                                         " bytes, too short for the 8-byte header length (truncated?)");
  }
  unsigned char len_bytes[8];
  read_exact(in, path, "header", reinterpret_cast<char*>(len_bytes), 8, 0);
  for (int i = 7; i >= 0; --i) h.header_len = (h.header_len << 8) | len_bytes[i];
  if (h.header_len > kMaxHeaderBytes) {
    throw InputError(path, "header", "header length " + std::to_string(h.header_len) + " exceeds the limit of " +
                                         std::to_string(kMaxHeaderBytes) + " bytes (not a safetensors file?)");
  }
  if (h.header_len > file_size - 8) {
    throw InputError(path, "header", "header length " + std::to_string(h.header_len) + " is beyond the file size " +
                                         std::to_string(file_size) + " (truncated or not a safetensors file)");
  }
  h.buffer_len = file_size - 8 - h.header_len;
  std::string text(h.header_len, '\0');
  read_exact(in, path, "header", text.data(), h.header_len, 8);
  return text;
}

// The header as a JSON object, rejecting duplicate top-level names (nlohmann would silently keep the last one).
json parse_header_json(const std::string& text, const std::string& path) {
  std::set<std::string> seen;
  std::string duplicate;
  json doc;
  try {
    doc = json::parse(text, [&](int depth, json::parse_event_t event, json& parsed) {
      if (event == json::parse_event_t::key && depth == 1) {
        const auto key = parsed.get<std::string>();
        if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
      }
      return true;
    });
  } catch (const json::exception& e) {
    throw InputError(path, "header", "malformed JSON header: " + json_error_text(e));
  }
  if (!duplicate.empty()) throw InputError(path, duplicate, "name appears twice in the header");
  if (!doc.is_object()) throw InputError(path, "header", "JSON header is not an object");
  return doc;
}

void read_metadata(const json& v, const std::string& path, Header& h) {
  if (v.is_null()) return;
  if (!v.is_object()) throw InputError(path, kMetadataKey, "must be an object of strings, got " + describe_json(v));
  for (auto m = v.begin(); m != v.end(); ++m) {
    if (!m.value().is_string()) {
      throw InputError(path, std::string(kMetadataKey) + "." + m.key(),
                       "metadata values must be strings, got " + describe_json(m.value()));
    }
    h.metadata[m.key()] = m.value().get<std::string>();
  }
}

// One tensor entry: dtype, shape and data_offsets, whose span must match the shape's byte size and lie in the
// data buffer.
Entry read_entry(const std::string& name, const json& v, const std::string& path, std::uint64_t buffer_len) {
  if (!v.is_object()) throw InputError(path, name, "tensor entry must be an object, got " + describe_json(v));
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!v.contains(field)) throw InputError(path, name, std::string("tensor entry lacks \"") + field + "\"");
  }
  Entry e;
  e.name = name;
  if (!v["dtype"].is_string()) throw InputError(path, name, "dtype must be a string, got " + describe_json(v["dtype"]));
  e.dtype_name = v["dtype"].get<std::string>();
  if (!dtype_from_name(e.dtype_name, &e.dtype)) throw InputError(path, name, "unknown dtype \"" + e.dtype_name + "\"");
  if (!v["shape"].is_array()) throw InputError(path, name, "shape must be an array, got " + describe_json(v["shape"]));
  std::uint64_t numel = 1;
  bool overflow = false;
  for (const auto& d : v["shape"]) {
    const std::uint64_t dim = json_uint(d, path, name, "shape");
    if (dim > static_cast<std::uint64_t>(INT64_MAX)) overflow = true;
    e.shape.push_back(static_cast<std::int64_t>(dim));
    overflow |= __builtin_mul_overflow(numel, dim, &numel);
  }
  const auto& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2) {
    throw InputError(path, name, "data_offsets must be [begin, end], got " + describe_json(off));
  }
  e.begin = json_uint(off[0], path, name, "data_offsets");
  e.end = json_uint(off[1], path, name, "data_offsets");
  if (e.begin > e.end) {
    throw InputError(path, name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                     "] has begin after end");
  }
  std::uint64_t nbytes = 0;
  overflow |= __builtin_mul_overflow(numel, static_cast<std::uint64_t>(c10::elementSize(e.dtype)), &nbytes);
  if (overflow) throw InputError(path, name, "shape " + shape_text(e.shape) + " overflows the byte size");
  if (e.end - e.begin != nbytes) {
    throw InputError(path, name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                     "] span " + std::to_string(e.end - e.begin) + " bytes but shape " +
                                     shape_text(e.shape) + " of " + e.dtype_name + " needs " + std::to_string(nbytes));
  }
  if (e.end > buffer_len) {
    throw InputError(path, name, "data_offsets end " + std::to_string(e.end) + " is beyond the data buffer of " +
                                     std::to_string(buffer_len) + " bytes (file truncated?)");
  }
  return e;
}

// The byte ranges must tile the buffer exactly, as the reference implementation requires (sorts the entries).
void check_entries_tile_buffer(std::vector<Entry>& entries, std::uint64_t buffer_len, const std::string& path) {
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  std::uint64_t cursor = 0;
  const Entry* prev = nullptr;
  for (const auto& e : entries) {
    if (e.begin < cursor) {
      throw InputError(path, e.name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                         "] overlap tensor \"" + (prev ? prev->name : "") + "\"");
    }
    if (e.begin > cursor) {
      throw InputError(path, e.name, "data_offsets begin " + std::to_string(e.begin) + " leaves a gap of " +
                                         std::to_string(e.begin - cursor) + " bytes before it");
    }
    cursor = e.end;
    prev = &e;
  }
  if (cursor != buffer_len) {
    throw InputError(path, prev ? prev->name : std::string("data buffer"),
                     std::to_string(buffer_len - cursor) + " trailing bytes after the last tensor (buffer is " +
                         std::to_string(buffer_len) + " bytes, tensors end at " + std::to_string(cursor) + ")");
  }
}

Header parse_header(std::ifstream& in, const std::string& path, std::uint64_t file_size) {
  Header h;
  const json doc = parse_header_json(read_header_text(in, path, file_size, h), path);
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    if (it.key() == kMetadataKey) read_metadata(it.value(), path, h);
    else h.entries.push_back(read_entry(it.key(), it.value(), path, h.buffer_len));
  }
  check_entries_tile_buffer(h.entries, h.buffer_len, path);
  return h;
}

std::ifstream open_or_throw(const std::string& path) {
  std::error_code ec;
  if (fs::exists(path, ec) && !fs::is_regular_file(path, ec))  // a FIFO would block the read
    throw InputError(path, "", "is not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path, "", std::string("cannot open: ") + std::strerror(errno));
  return in;
}

// A sharded checkpoint's index: weight_map's entries by shard file (resolved beside the index). Strict as a single
// file is: a name listed twice is an error (JSON parsers keep one silently), and read_index refuses a shard that
// holds a tensor weight_map does not list (a single file's unknown tensor is refused too).
std::map<std::string, std::vector<std::string>> read_weight_map(const std::string& index_path) {
  json doc;
  {
    std::ifstream in = open_or_throw(index_path);
    std::string top_key, duplicate;
    std::set<std::string> names;
    const json::parser_callback_t watch_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
      if (event != json::parse_event_t::key) return true;
      if (depth == 1) top_key = parsed.get<std::string>();
      else if (depth == 2 && top_key == "weight_map" && !names.insert(parsed.get<std::string>()).second &&
               duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    };
    try {
      doc = json::parse(in, watch_duplicates);
    } catch (const json::exception& e) {
      throw InputError(index_path, "index", std::string("malformed JSON: ") + e.what());
    }
    if (!duplicate.empty()) throw InputError(index_path, "weight_map." + duplicate, "listed twice");
  }
  if (!doc.is_object() || !doc.contains("weight_map")) {
    throw InputError(index_path, "weight_map", "missing: not a safetensors index");
  }
  const json& wm = doc["weight_map"];
  if (!wm.is_object()) throw InputError(index_path, "weight_map", "must be an object, got " + describe_json(wm));
  if (wm.empty()) throw InputError(index_path, "weight_map", "is empty");
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    if (!it.value().is_string()) {
      throw InputError(index_path, it.key(), "weight_map value must be a shard file name, got " + describe_json(it.value()));
    }
    // A shard is a file beside the index (transformers writes "model-00001-of-00002.safetensors"): a path elsewhere
    // ("/etc/passwd", "../x") would read a file that is no part of the checkpoint.
    const auto shard = it.value().get<std::string>();
    if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos ||
        shard.find('\0') != std::string::npos)
      throw InputError(index_path, it.key(),
                       "weight_map value \"" + clip(shard, 100) + "\" is not a file name beside the index (no directories)");
    by_shard[shard].push_back(it.key());
  }
  const fs::path dir = fs::path(index_path).parent_path();
  std::map<std::string, std::vector<std::string>> out;
  for (auto& [shard, names] : by_shard) {
    const std::string shard_path = (dir / shard).string();
    std::error_code ec;
    if (!fs::is_regular_file(shard_path, ec)) {
      const bool exists = fs::exists(fs::symlink_status(shard_path, ec));  // (a FIFO, a directory, a dangling link)
      throw InputError(index_path, names.front(),
                       "shard file \"" + shard_path + "\" (holding " + std::to_string(names.size()) +
                           " tensors of weight_map) " + (exists ? "is not a regular file" : "does not exist"));
    }
    out[shard_path] = names;
  }
  return out;
}

// Every tensor of a sharded checkpoint, as `read_shard` gives a shard's (a name -> T map).
template <class Map, class ReadShard>
Map read_index(const std::string& index_path, ReadShard read_shard) {
  Map out;
  for (auto& [shard_path, names] : read_weight_map(index_path)) {
    auto shard = read_shard(shard_path);
    const std::set<std::string> listed(names.begin(), names.end());
    for (const auto& held : shard)
      if (!listed.count(held.first))
        throw InputError(index_path, held.first,
                         "held by shard file \"" + shard_path + "\" but not listed for it in weight_map");
    for (const auto& name : names) {
      auto found = shard.find(name);
      if (found == shard.end()) {
        throw InputError(index_path, name, "listed in weight_map but absent from its shard file \"" + shard_path + "\"");
      }
      out.emplace(name, std::move(found->second));
    }
  }
  return out;
}

// The checkpoint file `path` names: a .safetensors file, an index json, or a directory holding either.
struct CheckpointFile {
  std::string path;
  bool is_index = false;
};
// Whether `p` is there. One that cannot be examined (a symbolic link loop, no permission) is an error saying why,
// naming it, rather than "missing".
bool present(const fs::path& p, const std::string& path) {
  std::error_code ec;
  const auto status = fs::status(p, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw InputError(path, p.string() == path ? "" : p.filename().string(), "cannot be examined: " + ec.message());
  return fs::exists(status);
}

CheckpointFile checkpoint_file(const std::string& path) {
  std::error_code ec;
  const fs::path p(path);
  if (!present(p, path)) throw InputError(path, "", "no such file or directory");
  if (fs::is_directory(p, ec)) {
    const fs::path single = p / "model.safetensors";
    const fs::path index = p / "model.safetensors.index.json";
    if (present(single, path)) return {single.string(), false};
    if (present(index, path)) return {index.string(), true};
    throw InputError(path, "", "directory holds neither model.safetensors nor model.safetensors.index.json");
  }
  return {path, p.extension() == ".json"};
}

std::map<std::string, TensorInfo> read_infos(const std::string& path) {
  const std::uint64_t size = file_size_or_throw(path);
  std::ifstream in = open_or_throw(path);
  std::map<std::string, TensorInfo> out;
  for (const auto& e : parse_header(in, path, size).entries) out[e.name] = TensorInfo{e.dtype, e.shape};
  return out;
}

}  // namespace

std::string safetensors_dtype_name(torch::ScalarType dtype) {
  for (const auto& e : kDtypes) {
    if (e.type == dtype) return e.name;
  }
  throw std::invalid_argument(std::string("safetensors: unsupported dtype ") + c10::toString(dtype));
}

TensorMap read_safetensors(const std::string& path) {
  const std::uint64_t size = file_size_or_throw(path);
  std::ifstream in = open_or_throw(path);
  const Header h = parse_header(in, path, size);
  TensorMap out;
  const std::uint64_t base = 8 + h.header_len;
  for (const auto& e : h.entries) {
    torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype));
    const std::uint64_t nbytes = e.end - e.begin;
    if (nbytes > 0) read_exact(in, path, e.name, static_cast<char*>(t.data_ptr()), nbytes, base + e.begin);
    if (e.dtype == torch::kBool) {
      const auto* p = static_cast<const std::uint8_t*>(t.data_ptr());
      for (std::uint64_t i = 0; i < nbytes; ++i) {
        if (p[i] > 1) {
          throw InputError(path, e.name, "BOOL element " + std::to_string(i) + " has byte value " +
                                             std::to_string(p[i]) + ", expected 0 or 1");
        }
      }
    }
    out.emplace(e.name, std::move(t));
  }
  return out;
}

StringMap read_safetensors_metadata(const std::string& path) {
  const std::uint64_t size = file_size_or_throw(path);
  std::ifstream in = open_or_throw(path);
  return parse_header(in, path, size).metadata;
}

TensorMap read_safetensors_checkpoint(const std::string& path) {
  const auto file = checkpoint_file(path);
  if (file.is_index) return read_index<TensorMap>(file.path, read_safetensors);
  return read_safetensors(file.path);
}

CheckpointInfo read_safetensors_checkpoint_info(const std::string& path) {
  const auto file = checkpoint_file(path);
  if (file.is_index) return {file.path, read_index<std::map<std::string, TensorInfo>>(file.path, read_infos)};
  return {file.path, read_infos(file.path)};
}

void write_safetensors(const std::string& path, const TensorMap& tensors, const StringMap& metadata) {
  struct Item {
    const std::string* name;
    torch::Tensor t;
    std::string dtype;
  };
  std::vector<Item> items;
  items.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    if (name.empty()) throw InputError(path, "<empty name>", "tensor names must not be empty");
    if (name == kMetadataKey) throw InputError(path, name, "reserved name, cannot be a tensor");
    if (!tensor.defined()) throw InputError(path, name, "tensor is undefined");
    std::string dtype;
    try {
      dtype = safetensors_dtype_name(tensor.scalar_type());
    } catch (const std::invalid_argument&) {
      throw InputError(path, name, std::string("dtype ") + c10::toString(tensor.scalar_type()) +
                                       " cannot be stored in safetensors");
    }
    items.push_back({&name, tensor.detach().to(torch::kCPU).contiguous(), dtype});
  }
  // The reference writer's order: by dtype (its enum order, descending: 8-byte types first, so every tensor stays
  // aligned), then by name. With it, our files are byte-identical to safetensors' save_file output.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    const int ra = dtype_rank(a.t.scalar_type()), rb = dtype_rank(b.t.scalar_type());
    if (ra != rb) return ra > rb;
    return *a.name < *b.name;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header[kMetadataKey] = m;
  }
  std::uint64_t offset = 0;
  for (const auto& it : items) {
    const auto nbytes = static_cast<std::uint64_t>(it.t.nbytes());
    header[*it.name] = {{"dtype", it.dtype}, {"shape", it.t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  const std::string tmp = detail::temp_path_for(path);
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw InputError(path, "", "cannot create temp file " + tmp + ": " + std::strerror(errno));
  bool ok = true;
  unsigned char len_bytes[8];
  std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xff);
  ok = ok && std::fwrite(len_bytes, 1, 8, f) == 8;
  ok = ok && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const auto& it : items) {
    const auto nbytes = static_cast<size_t>(it.t.nbytes());
    if (nbytes > 0) ok = ok && std::fwrite(it.t.data_ptr(), 1, nbytes, f) == nbytes;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  const int saved_errno = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    detail::remove_quietly(tmp);
    throw InputError(path, "", std::string("write failed: ") + std::strerror(saved_errno));
  }
  detail::commit_temp_file(tmp, path);
}

}  // namespace cpharness::io
