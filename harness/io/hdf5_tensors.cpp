#include "harness/io/hdf5_tensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <utility>

#include <hdf5.h>

#include "harness/io/atomic_file.h"
#include "harness/io/error_text.h"
#include "harness/io/hdf5_probe.h"
#include "harness/io/input_error.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "HDF5 tensor IO assumes a little-endian host");

namespace cpharness::io {
namespace {

namespace fs = std::filesystem;

constexpr const char* kDtypeAttr = "dtype";

// ---------------------------------------------------------------------------------------------------------------
// Library state: one lock for every HDF5 call of this module, and HDF5's auto error printing off while we hold it.

std::recursive_mutex*& h5_mutex_slot() {
  static std::recursive_mutex* m = new std::recursive_mutex;  // never destroyed: a child replaces it (below)
  return m;
}

std::recursive_mutex& h5_mutex() { return *h5_mutex_slot(); }

// HDF5 1.10 keeps a file whose close failed (a full disk: its metadata could not be flushed) half destroyed in the
// library, and touching it again, as its shutdown at exit does (H5close -> H5F__close_cb), is a segfault after the
// run has already reported its error. So the library's shutdown is switched off before its first use (the C++
// library, which would call H5close from a static destructor, is not linked): every file of ours is closed
// explicitly, and what a failed close leaves is the OS's to reclaim at exit.
void no_library_shutdown_at_exit() {
  static const bool once = [] {
    H5dont_atexit();
    return true;
  }();
  (void)once;
}

class H5Guard {
 public:
  H5Guard() : lock_(h5_mutex()) {
    no_library_shutdown_at_exit();
    H5Eget_auto2(H5E_DEFAULT, &old_func_, &old_data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    H5Eclear2(H5E_DEFAULT);
  }
  ~H5Guard() {
    H5Eclear2(H5E_DEFAULT);
    H5Eset_auto2(H5E_DEFAULT, old_func_, old_data_);
  }
  H5Guard(const H5Guard&) = delete;
  H5Guard& operator=(const H5Guard&) = delete;

 private:
  std::lock_guard<std::recursive_mutex> lock_;
  H5E_auto2_t old_func_ = nullptr;
  void* old_data_ = nullptr;
};

// The HDF5 error stack as one line: the outermost (API) message and the innermost (cause), then cleared.
std::string h5_error_reason() {
  std::vector<std::string> descs;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* err, void* data) -> herr_t {
        auto* out = static_cast<std::vector<std::string>*>(data);
        std::string d = err->desc ? err->desc : "";
        if (d.empty() && err->func_name) d = std::string("error in ") + err->func_name;
        if (!d.empty()) out->push_back(std::move(d));
        return 0;
      },
      &descs);
  H5Eclear2(H5E_DEFAULT);
  // Some descriptions carry the OS error over several lines (ENOSPC: "file write failed: ..., error message =
  // 'No space left on device'\n..."): a reason is one line.
  for (auto& d : descs) {
    for (auto& c : d)
      if (c == '\n' || c == '\r') c = ' ';
    while (!d.empty() && d.back() == ' ') d.pop_back();
  }
  if (descs.empty()) return "HDF5 error";
  if (descs.size() == 1 || descs.front() == descs.back()) return "HDF5: " + descs.front();
  return "HDF5: " + descs.front() + " (" + descs.back() + ")";
}

[[noreturn]] void h5_fail(const std::string& file, const std::string& what, const std::string& doing) {
  throw InputError(file, what, doing + ": " + h5_error_reason());
}

// RAII for hid_t handles.
class Hid {
 public:
  using Closer = herr_t (*)(hid_t);
  Hid() = default;
  Hid(hid_t id, Closer close) : id_(id), close_(close) {}
  Hid(Hid&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), close_(o.close_) {}
  Hid& operator=(Hid&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      close_ = o.close_;
    }
    return *this;
  }
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  ~Hid() { reset(); }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = H5I_INVALID_HID;
  }
  herr_t close() {  // explicit close that reports failure
    herr_t r = 0;
    if (id_ >= 0 && close_) r = close_(id_);
    id_ = H5I_INVALID_HID;
    return r;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

// ---------------------------------------------------------------------------------------------------------------
// Names.

// Validates a tensor/group name; returns it without leading '/' ("" = the root, only if allow_root).
std::string normalize(const std::string& file, const std::string& name, bool allow_root) {
  std::string n = name;
  if (!n.empty() && n.front() == '/') n.erase(0, 1);
  if (n.empty()) {
    if (allow_root) return "";
    throw InputError(file, name.empty() ? "<empty name>" : name, "a dataset name must not be empty or the root");
  }
  size_t start = 0;
  while (true) {
    const size_t slash = n.find('/', start);
    const std::string comp = n.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (comp.empty()) throw InputError(file, name, "name has an empty path component");
    if (comp == ".") throw InputError(file, name, "name has a \".\" path component");
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return n;
}

std::string abs_path(const std::string& norm) { return "/" + norm; }

std::vector<std::string> prefixes(const std::string& norm) {  // "a/b/c" -> "a", "a/b", "a/b/c"
  std::vector<std::string> out;
  size_t pos = 0;
  while ((pos = norm.find('/', pos)) != std::string::npos) out.push_back(norm.substr(0, pos++));
  out.push_back(norm);
  return out;
}

enum class Kind { Missing, Group, Dataset, Other, Blocked };
struct Where {
  Kind kind;
  std::string at;  // for Missing: first missing prefix; for Blocked: the prefix that is not a group
};

Kind object_kind(hid_t file, const std::string& norm) {
  Hid obj(H5Oopen(file, norm.empty() ? "/" : abs_path(norm).c_str(), H5P_DEFAULT), H5Oclose);
  if (!obj.valid()) {
    H5Eclear2(H5E_DEFAULT);
    return Kind::Other;
  }
  switch (H5Iget_type(obj.get())) {
    case H5I_GROUP: return Kind::Group;
    case H5I_DATASET: return Kind::Dataset;
    default: return Kind::Other;
  }
}

Where locate(hid_t file, const std::string& norm) {
  if (norm.empty()) return {Kind::Group, ""};
  const auto ps = prefixes(norm);
  for (size_t i = 0; i < ps.size(); ++i) {
    const htri_t e = H5Lexists(file, abs_path(ps[i]).c_str(), H5P_DEFAULT);
    if (e <= 0) {
      H5Eclear2(H5E_DEFAULT);
      return {Kind::Missing, ps[i]};
    }
    const Kind k = object_kind(file, ps[i]);
    if (i + 1 == ps.size()) return {k, ps[i]};
    if (k != Kind::Group) return {Kind::Blocked, ps[i]};
  }
  return {Kind::Missing, norm};
}

// ---------------------------------------------------------------------------------------------------------------
// Types.

// The IEEE half type h5py uses for numpy float16.
hid_t float16_type() {
  static hid_t t = [] {
    hid_t id = H5Tcopy(H5T_IEEE_F32LE);
    H5Tset_fields(id, 15, 10, 5, 0, 10);
    H5Tset_size(id, 2);
    H5Tset_ebias(id, 15);
    H5Tpack(id);
    H5Tlock(id);
    return id;
  }();
  return t;
}

struct Storage {
  hid_t file_type;  // as stored
  hid_t mem_type;   // as read/written from torch memory
  const char* dtype_attr;  // nullptr or the value of the "dtype" attribute
};

bool storage_for(torch::ScalarType t, Storage* s) {
  switch (t) {
    case torch::kFloat32: *s = {H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, nullptr}; return true;
    case torch::kFloat64: *s = {H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, nullptr}; return true;
    case torch::kFloat16: *s = {float16_type(), float16_type(), nullptr}; return true;
    case torch::kBFloat16: *s = {H5T_STD_U16LE, H5T_NATIVE_UINT16, "bfloat16"}; return true;
    case torch::kBool: *s = {H5T_STD_U8LE, H5T_NATIVE_UINT8, "bool"}; return true;
    case torch::kInt64: *s = {H5T_STD_I64LE, H5T_NATIVE_INT64, nullptr}; return true;
    case torch::kInt32: *s = {H5T_STD_I32LE, H5T_NATIVE_INT32, nullptr}; return true;
    case torch::kInt16: *s = {H5T_STD_I16LE, H5T_NATIVE_INT16, nullptr}; return true;
    case torch::kInt8: *s = {H5T_STD_I8LE, H5T_NATIVE_INT8, nullptr}; return true;
    case torch::kUInt8: *s = {H5T_STD_U8LE, H5T_NATIVE_UINT8, nullptr}; return true;
    case torch::kUInt16: *s = {H5T_STD_U16LE, H5T_NATIVE_UINT16, nullptr}; return true;
    case torch::kUInt32: *s = {H5T_STD_U32LE, H5T_NATIVE_UINT32, nullptr}; return true;
    case torch::kUInt64: *s = {H5T_STD_U64LE, H5T_NATIVE_UINT64, nullptr}; return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// String attributes.

void write_string_attr(const std::string& file, const std::string& what, hid_t obj, const std::string& key,
                       const std::string& value) {
  if (key.empty()) throw InputError(file, what, "attribute name must not be empty");
  if (value.find('\0') != std::string::npos) {
    throw InputError(file, what + "@" + key, "attribute value contains a NUL byte");
  }
  const htri_t exists = H5Aexists(obj, key.c_str());
  if (exists < 0) h5_fail(file, what + "@" + key, "cannot check attribute");
  if (exists > 0 && H5Adelete(obj, key.c_str()) < 0) h5_fail(file, what + "@" + key, "cannot replace attribute");
  Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
  if (!type.valid() || H5Tset_size(type.get(), H5T_VARIABLE) < 0 || H5Tset_cset(type.get(), H5T_CSET_UTF8) < 0) {
    h5_fail(file, what + "@" + key, "cannot make string type");
  }
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid attr(H5Acreate2(obj, key.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attr.valid()) h5_fail(file, what + "@" + key, "cannot create attribute");
  const char* p = value.c_str();
  if (H5Awrite(attr.get(), type.get(), &p) < 0) h5_fail(file, what + "@" + key, "cannot write attribute");
}

// An attribute of `obj` opened with its type and dataspace.
struct OpenAttribute {
  Hid attr, type, space;
};

OpenAttribute open_attribute(const std::string& file, const std::string& what, hid_t obj, const std::string& key) {
  OpenAttribute a;
  a.attr = Hid(H5Aopen(obj, key.c_str(), H5P_DEFAULT), H5Aclose);
  if (!a.attr.valid()) h5_fail(file, what + "@" + key, "cannot open attribute");
  a.type = Hid(H5Aget_type(a.attr.get()), H5Tclose);
  a.space = Hid(H5Aget_space(a.attr.get()), H5Sclose);
  if (!a.type.valid() || !a.space.valid()) h5_fail(file, what + "@" + key, "cannot inspect attribute");
  return a;
}

// Reads a scalar (or single-element) string attribute; nullopt if it is not a string.
std::optional<std::string> read_string_attr(const std::string& file, const std::string& what, hid_t obj,
                                            const std::string& key) {
  const OpenAttribute a = open_attribute(file, what, obj, key);
  if (H5Tget_class(a.type.get()) != H5T_STRING) return std::nullopt;
  if (H5Sget_simple_extent_npoints(a.space.get()) != 1) return std::nullopt;
  const htri_t is_var = H5Tis_variable_str(a.type.get());
  if (is_var < 0) h5_fail(file, what + "@" + key, "cannot inspect attribute");
  if (is_var) {
    Hid mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), H5T_VARIABLE);
    H5Tset_cset(mem.get(), H5Tget_cset(a.type.get()));
    char* p = nullptr;
    if (H5Aread(a.attr.get(), mem.get(), &p) < 0) h5_fail(file, what + "@" + key, "cannot read attribute");
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    return s;
  }
  const size_t size = H5Tget_size(a.type.get());
  std::string buf(size, '\0');
  if (size > 0 && H5Aread(a.attr.get(), a.type.get(), buf.data()) < 0) {
    h5_fail(file, what + "@" + key, "cannot read attribute");
  }
  const size_t nul = buf.find('\0');
  if (nul != std::string::npos) buf.resize(nul);
  if (H5Tget_strpad(a.type.get()) == H5T_STR_SPACEPAD) {
    while (!buf.empty() && buf.back() == ' ') buf.pop_back();
  }
  return buf;
}

// What a non-string (or not single-valued) attribute holds, in words.
std::string attribute_kind(const std::string& file, const std::string& what, hid_t obj, const std::string& key) {
  const OpenAttribute a = open_attribute(file, what, obj, key);
  std::string kind;
  switch (H5Tget_class(a.type.get())) {
    case H5T_INTEGER: kind = "integer"; break;
    case H5T_FLOAT: kind = "float"; break;
    case H5T_STRING: kind = "string"; break;
    case H5T_ENUM: kind = "enum (e.g. a bool)"; break;
    case H5T_COMPOUND: kind = "compound"; break;
    case H5T_REFERENCE: kind = "reference"; break;
    default: kind = "non-string"; break;
  }
  const hssize_t n = H5Sget_simple_extent_npoints(a.space.get());
  if (n != 1) kind += " array of " + std::to_string(n) + " elements";
  return kind;
}

std::vector<std::string> attribute_names(const std::string& file, const std::string& what, hid_t obj) {
  std::vector<std::string> names;
  hsize_t idx = 0;
  const herr_t r = H5Aiterate2(
      obj, H5_INDEX_NAME, H5_ITER_INC, &idx,
      [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
        static_cast<std::vector<std::string>*>(data)->emplace_back(name);
        return 0;
      },
      &names);
  if (r < 0) h5_fail(file, what, "cannot list attributes");
  return names;
}

StringMap read_string_attrs(const std::string& file, const std::string& what, hid_t obj) {
  StringMap out;
  for (const auto& n : attribute_names(file, what, obj)) {
    if (auto v = read_string_attr(file, what, obj, n)) out[n] = std::move(*v);
  }
  return out;
}

hid_t file_access_plist() {
  hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  // Object headers of the 1.8 format: readable by every HDF5 >= 1.8 and h5py, and allowing large attributes.
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18);
#if H5_VERSION_GE(1, 10, 7)
  // Our files are private until renamed into place; locking only breaks on file systems without flock (NFS).
  H5Pset_file_locking(fapl, false, true);
#endif
  return fapl;
}

}  // namespace

// ===============================================================================================================
// Writer

struct Hdf5Writer::Impl {
  std::string tmp;
  Hid file;
  bool committed = false;

  // Closes and removes a temp file nothing will be read from. It is emptied first: a full disk is often full of
  // this very file, and HDF5 needs room for the metadata it writes on close; a close that fails anyway is not
  // retried (a second H5Fclose of that file crashes, see no_library_shutdown_at_exit).
  void abandon() {
    if (file.valid() && ::truncate(tmp.c_str(), 0) != 0) {
      // best effort: the close below may still succeed
    }
    file.close();
    detail::remove_quietly(tmp);
  }
};

Hdf5Writer::Hdf5Writer(std::string path, bool replace_existing)
    : path_(std::move(path)), replace_existing_(replace_existing), impl_(std::make_unique<Impl>()) {
  H5Guard guard;
  if (path_.empty()) throw InputError("<empty path>", "", "output path is empty");
  impl_->tmp = detail::temp_path_for(path_);
  Hid fapl(file_access_plist(), H5Pclose);
  // The root group's header too holds no times (groups and datasets below say so in their own lists): two files
  // of the same content written a second apart differed in it.
  Hid fcpl(H5Pcreate(H5P_FILE_CREATE), H5Pclose);
  H5Pset_obj_track_times(fcpl.get(), false);
  impl_->file = Hid(H5Fcreate(impl_->tmp.c_str(), H5F_ACC_EXCL, fcpl.get(), fapl.get()), H5Fclose);
  if (!impl_->file.valid()) h5_fail(path_, "", "cannot create temp file " + impl_->tmp);
}

Hdf5Writer::~Hdf5Writer() {
  if (!impl_ || impl_->committed) return;
  H5Guard guard;
  impl_->abandon();
}

namespace {

void ensure_group(const std::string& file, hid_t fid, const std::string& norm, const std::string& for_name) {
  if (norm.empty()) return;
  Hid gcpl(H5Pcreate(H5P_GROUP_CREATE), H5Pclose);
  H5Pset_obj_track_times(gcpl.get(), false);  // byte-reproducible files
  for (const auto& p : prefixes(norm)) {
    const Where w = locate(fid, p);
    if (w.kind == Kind::Group) continue;
    if (w.kind != Kind::Missing) {
      throw InputError(file, for_name, "\"" + w.at + "\" already exists and is not a group");
    }
    Hid g(H5Gcreate2(fid, abs_path(p).c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT), H5Gclose);
    if (!g.valid()) h5_fail(file, for_name, "cannot create group \"" + p + "\"");
  }
}

}  // namespace

void Hdf5Writer::write(const std::string& name, const torch::Tensor& tensor) {
  H5Guard guard;
  if (impl_->committed) throw InputError(path_, name, "writer already committed");
  const std::string norm = normalize(path_, name, false);
  if (!tensor.defined()) throw InputError(path_, name, "tensor is undefined");
  Storage st;
  if (!storage_for(tensor.scalar_type(), &st)) {
    throw InputError(path_, name, std::string("dtype ") + c10::toString(tensor.scalar_type()) +
                                      " cannot be stored in an HDF5 tensor file");
  }
  const hid_t fid = impl_->file.get();
  const Where w = locate(fid, norm);
  if (w.kind == Kind::Blocked) throw InputError(path_, name, "\"" + w.at + "\" is a dataset, not a group");
  if (w.kind != Kind::Missing) throw InputError(path_, name, "already exists in the file (written twice?)");
  const size_t slash = norm.rfind('/');
  if (slash != std::string::npos) ensure_group(path_, fid, norm.substr(0, slash), name);

  const torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
  Hid space;
  if (t.dim() == 0) {
    space = Hid(H5Screate(H5S_SCALAR), H5Sclose);
  } else {
    std::vector<hsize_t> dims(t.sizes().begin(), t.sizes().end());
    space = Hid(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  }
  if (!space.valid()) h5_fail(path_, name, "cannot create dataspace");
  Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_obj_track_times(dcpl.get(), false);
  Hid dset(H5Dcreate2(fid, abs_path(norm).c_str(), st.file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
           H5Dclose);
  if (!dset.valid()) h5_fail(path_, name, "cannot create dataset");
  if (t.numel() > 0 && H5Dwrite(dset.get(), st.mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0) {
    h5_fail(path_, name, "cannot write dataset");
  }
  if (st.dtype_attr) write_string_attr(path_, name, dset.get(), kDtypeAttr, st.dtype_attr);
}

void Hdf5Writer::set_attribute(const std::string& object, const std::string& key, const std::string& value) {
  H5Guard guard;
  if (impl_->committed) throw InputError(path_, object, "writer already committed");
  const std::string norm = normalize(path_, object, true);
  const std::string what = norm.empty() ? "/" : norm;
  const hid_t fid = impl_->file.get();
  const Where w = locate(fid, norm);
  if (w.kind == Kind::Blocked) throw InputError(path_, what, "\"" + w.at + "\" is a dataset, not a group");
  if (w.kind == Kind::Missing) ensure_group(path_, fid, norm, what);
  if (w.kind == Kind::Dataset && key == kDtypeAttr) {
    throw InputError(path_, what + "@" + key, "the dataset attribute \"dtype\" is reserved for the storage dtype");
  }
  Hid obj(H5Oopen(fid, norm.empty() ? "/" : abs_path(norm).c_str(), H5P_DEFAULT), H5Oclose);
  if (!obj.valid()) h5_fail(path_, what, "cannot open object");
  write_string_attr(path_, what, obj.get(), key, value);
}

void Hdf5Writer::commit() {
  H5Guard guard;
  if (impl_->committed) throw InputError(path_, "", "writer already committed");
  if (H5Fflush(impl_->file.get(), H5F_SCOPE_GLOBAL) < 0 || impl_->file.close() < 0) {
    const std::string reason = h5_error_reason();
    impl_->abandon();         // after a failed flush: closed here; after a failed close: removed only
    impl_->committed = true;  // nothing left to clean up
    throw InputError(path_, "", "cannot finish writing " + impl_->tmp + ": " + reason);
  }
  const int fd = ::open(impl_->tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  impl_->committed = true;
  detail::commit_temp_file(impl_->tmp, path_, replace_existing_);
}

// ===============================================================================================================
// Reader

struct Hdf5Reader::Impl {
  Hid file;
};

Hdf5Reader::Hdf5Reader(std::string path) : path_(std::move(path)), impl_(std::make_unique<Impl>()) {
  H5Guard guard;
  std::error_code ec;
  if (!fs::exists(path_, ec)) {
    if (ec && ec != std::errc::no_such_file_or_directory) throw InputError(path_, "", ec.message());  // a symlink loop
    throw InputError(path_, "", "no such file");
  }
  if (fs::is_directory(path_, ec)) throw InputError(path_, "", "is a directory, expected an HDF5 file");
  if (!fs::is_regular_file(path_, ec))  // a FIFO or device would block the read, or never end
    throw InputError(path_, "", "is not a regular file, expected an HDF5 file");
  const htri_t is = H5Fis_hdf5(path_.c_str());
  if (is <= 0) {
    if (is < 0) h5_fail(path_, "", "cannot read file");
    throw InputError(path_, "", "not an HDF5 file");
  }
  Hid fapl(file_access_plist(), H5Pclose);
  impl_->file = Hid(H5Fopen(path_.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose);
  if (!impl_->file.valid()) h5_fail(path_, "", "cannot open HDF5 file");
}

Hdf5Reader::~Hdf5Reader() {
  if (!impl_) return;
  H5Guard guard;
  impl_->file.reset();
}

namespace {

struct Opened {
  Hid dset;
  torch::ScalarType dtype = torch::kFloat32;
  hid_t mem_type = H5I_INVALID_HID;  // predefined or the static float16 type, or mem_owned
  Hid mem_owned;
  std::vector<std::int64_t> shape;
};

Opened open_dataset(const std::string& file, hid_t fid, const std::string& name) {
  const std::string norm = normalize(file, name, false);
  const Where w = locate(fid, norm);
  switch (w.kind) {
    case Kind::Dataset: break;
    case Kind::Missing:
      throw InputError(file, name, w.at == norm ? "no such dataset" : "no such dataset (group \"" + w.at + "\" is missing)");
    case Kind::Group: throw InputError(file, name, "is a group, not a dataset");
    case Kind::Blocked: throw InputError(file, name, "no such dataset (\"" + w.at + "\" is a dataset, not a group)");
    case Kind::Other: throw InputError(file, name, "is not a dataset");
  }
  Opened o;
  o.dset = Hid(H5Dopen2(fid, abs_path(norm).c_str(), H5P_DEFAULT), H5Dclose);
  if (!o.dset.valid()) h5_fail(file, name, "cannot open dataset");
  // A tensor file holds its own data, as it holds no links to other files: external raw storage (bytes read from
  // any path, /dev/zero included, whose declared size the stored-bytes guard below would take at its word) and
  // virtual datasets (another file's data) are refused.
  {
    Hid dcpl(H5Dget_create_plist(o.dset.get()), H5Pclose);
    if (!dcpl.valid()) h5_fail(file, name, "cannot read the dataset's creation properties");
    if (H5Pget_layout(dcpl.get()) == H5D_VIRTUAL)
      throw InputError(file, name, "is a virtual dataset (its data live in other files); a tensor file holds its own data");
    if (H5Pget_external_count(dcpl.get()) != 0)
      throw InputError(file, name, "keeps its data in external files; a tensor file holds its own data");
  }

  Hid type(H5Dget_type(o.dset.get()), H5Tclose);
  if (!type.valid()) h5_fail(file, name, "cannot read datatype");
  const H5T_class_t cls = H5Tget_class(type.get());
  const size_t size = H5Tget_size(type.get());
  std::string marker;
  const htri_t has_marker = H5Aexists(o.dset.get(), kDtypeAttr);
  if (has_marker < 0) h5_fail(file, name, "cannot check the dtype attribute");
  if (has_marker > 0) marker = read_string_attr(file, name, o.dset.get(), kDtypeAttr).value_or("");

  auto unsupported = [&](const std::string& why) -> InputError {
    return InputError(file, name, "unsupported datatype: " + why);
  };
  if (cls == H5T_FLOAT) {
    if (size == 2) o.dtype = torch::kFloat16, o.mem_type = float16_type();
    else if (size == 4) o.dtype = torch::kFloat32, o.mem_type = H5T_NATIVE_FLOAT;
    else if (size == 8) o.dtype = torch::kFloat64, o.mem_type = H5T_NATIVE_DOUBLE;
    else throw unsupported(std::to_string(size) + "-byte float");
  } else if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type.get()) == H5T_SGN_2;
    switch (size) {
      case 1: o.dtype = is_signed ? torch::kInt8 : torch::kUInt8; o.mem_type = is_signed ? H5T_NATIVE_INT8 : H5T_NATIVE_UINT8; break;
      case 2: o.dtype = is_signed ? torch::kInt16 : torch::kUInt16; o.mem_type = is_signed ? H5T_NATIVE_INT16 : H5T_NATIVE_UINT16; break;
      case 4: o.dtype = is_signed ? torch::kInt32 : torch::kUInt32; o.mem_type = is_signed ? H5T_NATIVE_INT32 : H5T_NATIVE_UINT32; break;
      case 8: o.dtype = is_signed ? torch::kInt64 : torch::kUInt64; o.mem_type = is_signed ? H5T_NATIVE_INT64 : H5T_NATIVE_UINT64; break;
      default: throw unsupported(std::to_string(size) + "-byte integer");
    }
  } else if (cls == H5T_ENUM && size == 1 && H5Tget_nmembers(type.get()) == 2) {
    // h5py stores numpy bool as an int8 enum {FALSE: 0, TRUE: 1}; read its raw bytes.
    // HDF5 does not convert enums to integers, so read with the stored 1-byte type itself.
    o.dtype = torch::kBool;
    o.mem_owned = Hid(H5Tcopy(type.get()), H5Tclose);
    o.mem_type = o.mem_owned.get();
  } else {
    const char* names[] = {"integer", "float", "time", "string", "bitfield", "opaque", "compound",
                           "reference", "enum", "variable-length", "array"};
    throw unsupported(cls >= 0 && cls < 11 ? std::string(names[cls]) + " class" : std::string("unknown class"));
  }
  if (marker == "bfloat16") {
    if (o.dtype != torch::kUInt16) throw InputError(file, name, "has dtype=\"bfloat16\" but is not stored as uint16");
    o.dtype = torch::kBFloat16;
  } else if (marker == "bool") {
    if (o.dtype != torch::kUInt8) throw InputError(file, name, "has dtype=\"bool\" but is not stored as uint8");
    o.dtype = torch::kBool;
  }

  Hid space(H5Dget_space(o.dset.get()), H5Sclose);
  if (!space.valid()) h5_fail(file, name, "cannot read dataspace");
  const H5S_class_t scls = H5Sget_simple_extent_type(space.get());
  if (scls == H5S_NULL) throw InputError(file, name, "has a null dataspace (no data), not a tensor");
  if (scls == H5S_SIMPLE) {
    const int nd = H5Sget_simple_extent_ndims(space.get());
    if (nd < 0) h5_fail(file, name, "cannot read dataspace");
    std::vector<hsize_t> dims(static_cast<size_t>(nd));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    o.shape.assign(dims.begin(), dims.end());
  } else if (scls != H5S_SCALAR) {
    throw InputError(file, name, "has an unsupported dataspace");
  }
  return o;
}

}  // namespace

namespace {

constexpr int kMaxGroupDepth = 16;

// numel x element size of `shape`; UINT64_MAX when it overflows.
uint64_t declared_bytes(const std::vector<int64_t>& shape, size_t element) {
  unsigned __int128 n = element;
  for (const int64_t d : shape) {
    n *= static_cast<uint64_t>(d < 0 ? 0 : d);
    if (n > UINT64_MAX / 2) return UINT64_MAX;
  }
  return static_cast<uint64_t>(n);
}

}  // namespace

namespace {

// How many hard links name the object (1 for a group named once). 0 when it cannot be read.
unsigned names_of(hid_t obj) {
#if H5_VERSION_GE(1, 12, 0)
  H5O_info2_t info{};
  if (H5Oget_info3(obj, &info, H5O_INFO_BASIC) < 0) return 0;
#else
  H5O_info_t info{};
  if (H5Oget_info2(obj, &info, H5O_INFO_BASIC) < 0) return 0;
#endif
  return info.rc;
}

}  // namespace

std::vector<std::string> Hdf5Reader::list_datasets(const std::string& group) const { return contents(group).datasets; }

Hdf5Reader::Contents Hdf5Reader::contents(const std::string& group) const {
  H5Guard guard;
  const std::string norm = normalize(path_, group, true);
  const std::string what = norm.empty() ? "/" : norm;
  const Where w = locate(impl_->file.get(), norm);
  if (w.kind == Kind::Missing || w.kind == Kind::Blocked) throw InputError(path_, what, "no such group");
  if (!norm.empty()) {  // the group itself a link (h5py's f["steps"] = h5py.SoftLink(...)): said as the walk says it
    H5L_info_t link{};
    if (H5Lget_info(impl_->file.get(), abs_path(norm).c_str(), &link, H5P_DEFAULT) >= 0 && link.type != H5L_TYPE_HARD)
      throw InputError(path_, what,
                       link.type == H5L_TYPE_SOFT ? "is a soft link; a tensor file holds only groups and datasets"
                                                  : "is an external or user-defined link; a tensor file holds only "
                                                    "groups and datasets");
    H5Eclear2(H5E_DEFAULT);
  }
  if (w.kind != Kind::Group) throw InputError(path_, what, "is not a group");
  Hid g(H5Gopen2(impl_->file.get(), norm.empty() ? "/" : abs_path(norm).c_str(), H5P_DEFAULT), H5Gclose);
  if (!g.valid()) h5_fail(path_, what, "cannot open group");
  struct Ctx {
    Contents found;
    std::string prefix;
    std::string bad_name, bad_reason;  // why the walk stopped, for the error
  } ctx{{}, norm.empty() ? "" : norm + "/", {}, {}};
  // Generic lambda: matches both the 1.10 (H5L_info_t) and 1.12+ (H5L_info2_t) callback signatures. A tensor file
  // holds groups and datasets only: a soft or external link (an alias, or data in another file) is refused rather
  // than skipped, and so is nesting far deeper than any layout uses (a walk over it costs time quadratic in depth).
  const herr_t r = H5Lvisit(
      g.get(), H5_INDEX_NAME, H5_ITER_INC,
      [](hid_t gid, const char* name, const auto* info, void* data) -> herr_t {
        auto* c = static_cast<Ctx*>(data);
        if (info->type != H5L_TYPE_HARD) {
          c->bad_name = c->prefix + name;
          c->bad_reason = info->type == H5L_TYPE_SOFT ? "is a soft link; a tensor file holds only groups and datasets"
                                                      : "is an external or user-defined link; a tensor file holds only "
                                                        "groups and datasets";
          return -1;
        }
        if (std::count(name, name + std::strlen(name), '/') >= kMaxGroupDepth) {
          c->bad_name = c->prefix + name;
          c->bad_reason = "groups nested more than " + std::to_string(kMaxGroupDepth) + " deep";
          return -1;
        }
        Hid obj(H5Oopen(gid, name, H5P_DEFAULT), H5Oclose);
        if (!obj.valid()) return -1;
        const auto type = H5Iget_type(obj.get());
        if (type == H5I_DATASET) c->found.datasets.push_back(c->prefix + name);
        if (type == H5I_GROUP) {
          // H5Lvisit enters a group once, under its first name: the contents under a second name (h5py's
          // f["steps/1"] = f["steps/0"], or a link back to an ancestor) would be missing, not read twice.
          if (const unsigned n = names_of(obj.get()); n != 1) {
            c->bad_name = c->prefix + name;
            c->bad_reason = n == 0 ? "cannot read the group's header"
                                   : "is a group with " + std::to_string(n) + " names (hard links to one group: an "
                                     "alias or a cycle, whose contents would be read under one name only); a tensor "
                                     "file names each group once";
            return -1;
          }
          c->found.groups.push_back(c->prefix + name);
        }
        return 0;
      },
      &ctx);
  if (!ctx.bad_reason.empty()) throw InputError(path_, ctx.bad_name, ctx.bad_reason);
  if (r < 0) h5_fail(path_, what, "cannot list group");
  std::sort(ctx.found.datasets.begin(), ctx.found.datasets.end());
  std::sort(ctx.found.groups.begin(), ctx.found.groups.end());
  return ctx.found;
}

bool Hdf5Reader::has_dataset(const std::string& name) const {
  H5Guard guard;
  return locate(impl_->file.get(), normalize(path_, name, false)).kind == Kind::Dataset;
}

DatasetInfo Hdf5Reader::info(const std::string& name) const {
  H5Guard guard;
  Opened o = open_dataset(path_, impl_->file.get(), name);
  return {o.dtype, o.shape};
}

torch::Tensor Hdf5Reader::read(const std::string& name, std::optional<torch::ScalarType> expected) const {
  H5Guard guard;
  Opened o = open_dataset(path_, impl_->file.get(), name);
  if (expected && *expected != o.dtype) {
    throw InputError(path_, name, std::string("stored dtype is ") + c10::toString(o.dtype) + ", expected " +
                                      c10::toString(*expected));
  }
  // A shape is checked against the bytes the file stores for it before anything is allocated: a header may
  // declare terabytes over a file of kilobytes. DEFLATE, the strongest filter h5py offers, shrinks at most ~1032:1.
  const uint64_t declared = declared_bytes(o.shape, c10::elementSize(o.dtype));
  const uint64_t stored = H5Dget_storage_size(o.dset.get());
  if (declared == UINT64_MAX || declared > 1032 * stored + (uint64_t(1) << 20))
    throw InputError(path_, name, "declares shape " + shape_text(o.shape) + " (" +
                                      (declared == UINT64_MAX ? std::string("more than 2^64") : std::to_string(declared)) +
                                      " bytes) but the file stores " + std::to_string(stored) + " bytes for it");
  torch::Tensor t;
  try {
    t = torch::empty(o.shape, torch::TensorOptions().dtype(o.dtype));
  } catch (const c10::Error& e) {
    throw InputError(path_, name, "cannot allocate shape " + shape_text(o.shape) + ": " + io::one_line(e));
  }
  if (t.numel() > 0) {
    if (H5Dread(o.dset.get(), o.mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0) {
      h5_fail(path_, name, "cannot read dataset");
    }
    if (o.dtype == torch::kBool) {
      const auto* p = static_cast<const std::uint8_t*>(t.data_ptr());
      for (std::int64_t i = 0; i < t.numel(); ++i) {
        if (p[i] > 1) {
          throw InputError(path_, name, "bool element " + std::to_string(i) + " has value " + std::to_string(p[i]) +
                                            ", expected 0 or 1");
        }
      }
    }
  }
  return t;
}

TensorMap Hdf5Reader::read_all(const std::string& group) const {
  H5Guard guard;
  TensorMap out;
  for (const auto& n : list_datasets(group)) out.emplace(n, read(n));
  return out;
}

namespace {

// An object ("" or "/" = root, a group or a dataset) opened to read its attributes; `what` names it in errors.
struct AttributedObject {
  Hid obj;
  std::string what;
};

AttributedObject open_attributed(const std::string& path, hid_t file, const std::string& object) {
  const std::string norm = normalize(path, object, true);
  AttributedObject o{Hid(), norm.empty() ? "/" : norm};
  const Where w = locate(file, norm);
  if (w.kind == Kind::Missing || w.kind == Kind::Blocked) throw InputError(path, o.what, "no such group or dataset");
  o.obj = Hid(H5Oopen(file, norm.empty() ? "/" : abs_path(norm).c_str(), H5P_DEFAULT), H5Oclose);
  if (!o.obj.valid()) h5_fail(path, o.what, "cannot open object");
  return o;
}

}  // namespace

StringMap Hdf5Reader::attributes(const std::string& object) const {
  H5Guard guard;
  const AttributedObject o = open_attributed(path_, impl_->file.get(), object);
  return read_string_attrs(path_, o.what, o.obj.get());
}

StringMap Hdf5Reader::non_string_attributes(const std::string& object) const {
  H5Guard guard;
  const AttributedObject o = open_attributed(path_, impl_->file.get(), object);
  StringMap out;
  for (const auto& n : attribute_names(path_, o.what, o.obj.get()))
    if (!read_string_attr(path_, o.what, o.obj.get(), n)) out[n] = attribute_kind(path_, o.what, o.obj.get(), n);
  return out;
}

// ===============================================================================================================
// Convenience wrappers

void write_hdf5(const std::string& path, const TensorMap& tensors, const AttributeMap& attributes) {
  Hdf5Writer w(path);
  for (const auto& [name, t] : tensors) w.write(name, t);
  for (const auto& [object, attrs] : attributes) {
    for (const auto& [k, v] : attrs) w.set_attribute(object, k, v);
  }
  w.commit();
}

TensorMap read_hdf5(const std::string& path, const std::string& group) {
  read_in_a_child_first(path, [&] { (void)Hdf5Reader(path).read_all(group); });
  return Hdf5Reader(path).read_all(group);
}

namespace detail {

std::unique_lock<std::recursive_mutex> hold_hdf5_lock() { return std::unique_lock<std::recursive_mutex>(h5_mutex()); }

void renew_hdf5_lock_in_child() { h5_mutex_slot() = new std::recursive_mutex; }

}  // namespace detail

torch::Tensor read_hdf5_dataset(const std::string& path, const std::string& name,
                                std::optional<torch::ScalarType> expected) {
  return Hdf5Reader(path).read(name, expected);
}

std::vector<std::string> list_hdf5_datasets(const std::string& path, const std::string& group) {
  return Hdf5Reader(path).list_datasets(group);
}

StringMap read_hdf5_attributes(const std::string& path, const std::string& object) {
  return Hdf5Reader(path).attributes(object);
}

}  // namespace cpharness::io
