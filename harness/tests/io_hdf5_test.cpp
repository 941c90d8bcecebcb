// Tests of harness/io/hdf5_tensors: dtype round trips, groups, attributes, atomic writes, errors.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <limits>
#include <thread>

#include <hdf5.h>

#include "harness/io/atomic_file.h"
#include "harness/io/hdf5_tensors.h"
#include "harness/tests/io_test_util.h"

namespace cpharness::io {
namespace {

using testing::bit_equal;
using testing::read_bytes;
using testing::TempDir;
using testing::throws_input_error;
using testing::write_bytes;

const std::vector<torch::ScalarType> kDtypes = {
    torch::kFloat32, torch::kFloat64, torch::kFloat16, torch::kBFloat16, torch::kInt64, torch::kInt32,
    torch::kInt16,   torch::kInt8,    torch::kUInt8,   torch::kBool,     torch::kUInt16, torch::kUInt32, torch::kUInt64};
const std::vector<std::vector<std::int64_t>> kShapes = {{}, {0}, {1}, {7}, {3, 5}, {4, 0, 3}, {2, 3, 4}};

TEST(IoHdf5, RoundTripEveryDtypeAndShapeBitExact) {
  TempDir dir;
  TensorMap in;
  std::uint64_t seed = 100;
  for (auto dt : kDtypes) {
    for (size_t i = 0; i < kShapes.size(); ++i) {
      in[std::string(c10::toString(dt)) + "/shape_" + std::to_string(i)] = testing::random_tensor(dt, kShapes[i], seed++);
    }
  }
  const std::string path = dir.file("all.h5");
  write_hdf5(path, in);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"all.h5"});
  const TensorMap out = read_hdf5(path);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(out.count(name)) << name;
    EXPECT_TRUE(bit_equal(out.at(name), t)) << name;
  }
  Hdf5Reader r(path);
  for (const auto& [name, t] : in) {
    const DatasetInfo info = r.info(name);
    EXPECT_EQ(info.dtype, t.scalar_type()) << name;
    EXPECT_EQ(info.shape, t.sizes().vec()) << name;
  }
  // The storage convention: bf16 as uint16 + dtype="bfloat16", bool as uint8 + dtype="bool", others unmarked.
  EXPECT_EQ(r.attributes("BFloat16/shape_3"), (StringMap{{"dtype", "bfloat16"}}));
  EXPECT_EQ(r.attributes("Bool/shape_3"), (StringMap{{"dtype", "bool"}}));
  EXPECT_TRUE(r.attributes("Float/shape_3").empty());
  EXPECT_TRUE(r.attributes("UInt16/shape_3").empty());
}

TEST(IoHdf5, SpecialFloatValuesSurvive) {
  TempDir dir;
  const auto inf = std::numeric_limits<float>::infinity();
  const auto nan = std::numeric_limits<float>::quiet_NaN();
  const auto f = torch::tensor({0.0f, -0.0f, inf, -inf, nan, 1e-40f, 65504.0f, -3.5f});
  const TensorMap in = {{"f32", f}, {"f16", f.to(torch::kFloat16)}, {"bf16", f.to(torch::kBFloat16)},
                        {"f64", f.to(torch::kFloat64)}};
  const std::string path = dir.file("special.h5");
  write_hdf5(path, in);
  for (const auto& [n, t] : in) EXPECT_TRUE(bit_equal(read_hdf5_dataset(path, n), t)) << n;
}

TEST(IoHdf5, NestedGroupsDottedNamesAndListing) {
  TempDir dir;
  const std::string path = dir.file("nested.h5");
  const TensorMap in = {{"step_0/logits", torch::randn({2, 3})},
                        {"step_1/layers/0/hidden", torch::randn({4})},
                        {"step_1/layers/1/hidden", torch::randn({4})},
                        {"weights/layers.0.self_attn.q_proj.weight", torch::randn({3, 3}).to(torch::kBFloat16)},
                        {"/top", torch::tensor(3.0)}};
  write_hdf5(path, in);
  Hdf5Reader r(path);
  EXPECT_EQ(r.list_datasets(), (std::vector<std::string>{"step_0/logits", "step_1/layers/0/hidden",
                                                         "step_1/layers/1/hidden",
                                                         "top", "weights/layers.0.self_attn.q_proj.weight"}));
  EXPECT_EQ(r.list_datasets("step_1"),
            (std::vector<std::string>{"step_1/layers/0/hidden", "step_1/layers/1/hidden"}));
  EXPECT_EQ(r.list_datasets("/step_1/layers/1"), (std::vector<std::string>{"step_1/layers/1/hidden"}));
  EXPECT_EQ(list_hdf5_datasets(path, "weights"),
            (std::vector<std::string>{"weights/layers.0.self_attn.q_proj.weight"}));
  EXPECT_TRUE(r.has_dataset("step_0/logits"));
  EXPECT_TRUE(r.has_dataset("/top"));
  EXPECT_FALSE(r.has_dataset("step_0"));
  EXPECT_FALSE(r.has_dataset("step_0/nothing"));
  EXPECT_FALSE(r.has_dataset("top/below"));
  const TensorMap w = r.read_all("weights");
  ASSERT_EQ(w.size(), 1u);
  EXPECT_TRUE(bit_equal(w.at("weights/layers.0.self_attn.q_proj.weight"),
                        in.at("weights/layers.0.self_attn.q_proj.weight")));
  EXPECT_TRUE(bit_equal(r.read("top"), in.at("/top")));
  EXPECT_TRUE(bit_equal(r.read("step_1/layers/0/hidden", torch::kFloat32), in.at("step_1/layers/0/hidden")));
}

TEST(IoHdf5, StringAttributesRoundTrip) {
  TempDir dir;
  const std::string path = dir.file("attrs.h5");
  const std::string big(100000, 'x');  // beyond the 64 KiB compact attribute limit of the oldest format
  const AttributeMap attrs = {
      {"/", {{"tool", "cpharness"}, {"git_sha", "c60eb75"}, {"case_json", big}, {"empty", ""}}},
      {"step_0", {{"note", "grüße, 日本"}}},
      {"step_0/logits", {{"units", "nats"}, {"cp", "4"}}},
      {"meta/provenance", {{"transformers", "4.99.0"}}}};  // a group that only holds attributes
  write_hdf5(path, {{"step_0/logits", torch::randn({2})}}, attrs);
  EXPECT_EQ(read_hdf5_attributes(path), attrs.at("/"));
  EXPECT_EQ(read_hdf5_attributes(path, ""), attrs.at("/"));
  Hdf5Reader r(path);
  EXPECT_EQ(r.attributes("step_0"), attrs.at("step_0"));
  EXPECT_EQ(r.attributes("step_0/logits"), attrs.at("step_0/logits"));
  EXPECT_EQ(r.attributes("/meta/provenance"), attrs.at("meta/provenance"));
  EXPECT_EQ(r.list_datasets(), std::vector<std::string>{"step_0/logits"});
  EXPECT_TRUE(throws_input_error([&] { r.attributes("nope"); }, {path, "nope", "no such"}));
}

TEST(IoHdf5, WriterSetsAndReplacesAttributesIncrementally) {
  TempDir dir;
  const std::string path = dir.file("inc.h5");
  Hdf5Writer w(path);
  w.set_attribute("/", "status", "running");
  w.write("a/b", torch::zeros({1}));
  w.set_attribute("a/b", "k", "v1");
  w.set_attribute("a/b", "k", "v2");
  w.set_attribute("/", "status", "done");
  EXPECT_FALSE(std::filesystem::exists(path));  // nothing at PATH before commit
  w.commit();
  EXPECT_EQ(read_hdf5_attributes(path), (StringMap{{"status", "done"}}));
  EXPECT_EQ(read_hdf5_attributes(path, "a/b"), (StringMap{{"k", "v2"}}));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"inc.h5"});
}

TEST(IoHdf5, AtomicWriteReplacesAndAbandonedWriterLeavesNothing) {
  TempDir dir;
  const std::string path = dir.file("atomic.h5");
  write_hdf5(path, {{"old", torch::ones({2})}});
  {
    Hdf5Writer w(path);
    w.write("new", torch::zeros({2}));
    // destroyed without commit
  }
  EXPECT_EQ(list_hdf5_datasets(path), std::vector<std::string>{"old"});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"atomic.h5"});
  // A failing write_hdf5 (unsupported dtype) leaves the old file and no temp file.
  EXPECT_TRUE(throws_input_error(
      [&] { write_hdf5(path, {{"a", torch::ones({1})}, {"z", torch::zeros({1}, torch::kComplexFloat)}}); },
      {path, "z", "cannot be stored"}));
  EXPECT_EQ(list_hdf5_datasets(path), std::vector<std::string>{"old"});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"atomic.h5"});
  write_hdf5(path, {{"new", torch::zeros({2})}});
  EXPECT_EQ(list_hdf5_datasets(path), std::vector<std::string>{"new"});
}

// A writer that must not replace (golden record without --force) refuses a file that appeared at PATH while it
// wrote, leaves it as it is and leaves no temp file; with PATH still free it commits as usual.
TEST(IoHdf5, ANoReplaceCommitNeverOverwrites) {
  TempDir dir;
  const std::string path = dir.file("golden.h5");
  {
    Hdf5Writer w(path, /*replace_existing=*/false);
    w.write("mine", torch::zeros({2}));
    write_hdf5(path, {{"theirs", torch::ones({2})}});  // another command recorded it meanwhile
    EXPECT_TRUE(throws_input_error([&] { w.commit(); }, {path, "not replaced"}));
  }
  EXPECT_EQ(list_hdf5_datasets(path), std::vector<std::string>{"theirs"});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"golden.h5"});
  const std::string fresh = dir.file("fresh.h5");
  Hdf5Writer w(fresh, false);
  w.write("mine", torch::zeros({2}));
  w.commit();
  EXPECT_EQ(list_hdf5_datasets(fresh), std::vector<std::string>{"mine"});
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"fresh.h5", "golden.h5"}));
}

// A temp file a killed writer left (SIGKILL mid-write) is swept by the next write of the same file, when it is this
// host's, its process is gone and it is older than a minute; another host's (a shared file system), a running
// process's, a fresh one and another file's temps stay.
TEST(IoHdf5, TempFilesOfAKilledWriterAreSweptByTheNextWrite) {
  TempDir dir;
  const std::string path = dir.file("golden.h5");
  const pid_t gone = ::fork();
  ASSERT_GE(gone, 0);
  if (gone == 0) ::_exit(0);
  ::waitpid(gone, nullptr, 0);
  const std::string host = cpharness::io::detail::temp_host(), dead = std::to_string(gone);
  auto leave = [&](const std::string& name, bool old) {
    std::ofstream(dir.file(name)) << "partial";
    if (old)
      std::filesystem::last_write_time(dir.file(name),
                                       std::filesystem::file_time_type::clock::now() - std::chrono::minutes(5));
  };
  leave("golden.h5.tmp-" + host + "-" + dead + "-0-17", true);        // swept
  leave("golden.h5.tmp-" + host + "-1-0-17", true);                   // pid 1 runs
  leave("golden.h5.tmp-" + host + "-" + dead + "-1-17", false);       // fresh
  leave("golden.h5.tmp-otherhost-" + dead + "-0-17", true);           // another host's
  leave("other.h5.tmp-" + host + "-" + dead + "-0-17", true);         // another file's
  write_hdf5(path, {{"a", torch::ones({2})}});
  std::vector<std::string> stay = {"golden.h5", "golden.h5.tmp-" + host + "-" + dead + "-1-17",
                                   "golden.h5.tmp-" + host + "-1-0-17", "golden.h5.tmp-otherhost-" + dead + "-0-17",
                                   "other.h5.tmp-" + host + "-" + dead + "-0-17"};
  auto left = dir.entries();
  std::sort(stay.begin(), stay.end());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, stay);
}

// What a stop signal's handler removes (io::detail::remove_temp_files): the temp file of a write in progress, and
// never a file already committed or a temp file already gone.
TEST(IoHdf5, AWriteInProgressIsTrackedForAStopSignalAndCommittedFilesAreNot) {
  TempDir dir;
  const std::string done = dir.file("done.h5"), busy = dir.file("busy.h5");
  write_hdf5(done, {{"a", torch::ones({2})}});
  Hdf5Writer w(busy);
  w.write("a", torch::ones({2}));
  ASSERT_EQ(dir.entries().size(), 2u);  // done.h5 and busy.h5's temp file
  cpharness::io::detail::remove_temp_files();
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"done.h5"});
}

// Hostile structure, built with the HDF5 API: a dataset declaring terabytes over no stored data is refused before
// anything is allocated; a soft or external link, and groups nested deeper than any layout, are refused by name.
TEST(IoHdf5, LyingShapesLinksAndDeepNestingAreInputErrorsNamingTheObject) {
  TempDir dir;
  const std::string path = dir.file("hostile.h5");
  {
    const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t dims[2] = {hsize_t(1) << 20, hsize_t(1) << 20}, chunk[2] = {16, 16};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(plist, 2, chunk);
    const hid_t d = H5Dcreate2(f, "huge", H5T_IEEE_F32LE, space, H5P_DEFAULT, plist, H5P_DEFAULT);  // no data written
    H5Dclose(d);
    H5Pclose(plist);
    H5Sclose(space);
    H5Fclose(f);
  }
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "huge"); }, {path, "huge", "declares shape", "stores"}));
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    H5Ldelete(f, "huge", H5P_DEFAULT);
    H5Lcreate_soft("/elsewhere", f, "alias", H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
  }
  EXPECT_TRUE(throws_input_error([&] { list_hdf5_datasets(path); }, {path, "alias", "soft link"}));
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    H5Ldelete(f, "alias", H5P_DEFAULT);
    std::string name;
    for (int i = 0; i < 20; ++i) {
      name += "/a";
      H5Gclose(H5Gcreate2(f, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    }
    H5Fclose(f);
  }
  EXPECT_TRUE(throws_input_error([&] { list_hdf5_datasets(path); }, {path, "nested"}));
}

// Data kept outside the file: external raw storage (here /dev/zero, which claims every declared byte as stored, so a
// 1 TiB shape would pass the stored-bytes guard and be allocated) and a virtual dataset over another file.
TEST(IoHdf5, DataKeptOutsideTheFileIsRefused) {
  TempDir dir;
  const std::string path = dir.file("outside.h5"), source = dir.file("source.h5");
  write_hdf5(source, {{"x", torch::arange(3, torch::kFloat32)}});
  {
    const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t dims[2] = {hsize_t(1) << 20, hsize_t(1) << 18};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    hid_t plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_external(plist, "/dev/zero", 0, H5F_UNLIMITED);
    H5Dclose(H5Dcreate2(f, "external", H5T_IEEE_F32LE, space, H5P_DEFAULT, plist, H5P_DEFAULT));
    H5Pclose(plist);
    H5Sclose(space);
    const hsize_t three = 3;
    const hid_t small = H5Screate_simple(1, &three, nullptr);
    plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_virtual(plist, small, source.c_str(), "/x", small);
    H5Dclose(H5Dcreate2(f, "virtual", H5T_IEEE_F32LE, small, H5P_DEFAULT, plist, H5P_DEFAULT));
    H5Pclose(plist);
    H5Sclose(small);
    H5Fclose(f);
  }
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "external"); }, {path, "external", "external files"}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "virtual"); }, {path, "virtual", "virtual dataset"}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5(path); }, {path, "external"}));
}

TEST(IoHdf5, SameContentGivesSameBytes) {
  TempDir dir;
  const TensorMap t = {{"g/a", torch::arange(6).reshape({2, 3})}, {"b", torch::ones({3}, torch::kBFloat16)}};
  const AttributeMap attrs = {{"/", {{"tool", "cpharness"}}}, {"g", {{"x", "y"}}}};
  write_hdf5(dir.file("1.h5"), t, attrs);
  // Across a second boundary: the root group's header kept its times, and writes a second apart differed there.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  write_hdf5(dir.file("2.h5"), t, attrs);
  EXPECT_EQ(read_bytes(dir.file("1.h5")), read_bytes(dir.file("2.h5")));
}

TEST(IoHdf5, WriterRejectsBadNames) {
  TempDir dir;
  const std::string path = dir.file("names.h5");
  Hdf5Writer w(path);
  w.write("a/b", torch::zeros({1}));
  EXPECT_TRUE(throws_input_error([&] { w.write("a/b", torch::zeros({1})); }, {path, "a/b", "already exists"}));
  EXPECT_TRUE(throws_input_error([&] { w.write("a", torch::zeros({1})); }, {path, "already exists"}));
  EXPECT_TRUE(throws_input_error([&] { w.write("a/b/c", torch::zeros({1})); }, {path, "a/b/c", "not a group"}));
  EXPECT_TRUE(throws_input_error([&] { w.write("x//y", torch::zeros({1})); }, {path, "x//y", "empty path component"}));
  EXPECT_TRUE(throws_input_error([&] { w.write("x/./y", torch::zeros({1})); }, {path, "x/./y"}));
  EXPECT_TRUE(throws_input_error([&] { w.write("/", torch::zeros({1})); }, {path}));
  EXPECT_TRUE(throws_input_error([&] { w.write("", torch::zeros({1})); }, {path}));
  EXPECT_TRUE(throws_input_error([&] { w.write("u", torch::Tensor()); }, {path, "u", "undefined"}));
  EXPECT_TRUE(throws_input_error([&] { w.set_attribute("a/b", "dtype", "float32"); }, {path, "a/b", "reserved"}));
  EXPECT_TRUE(throws_input_error([&] { w.set_attribute("a/b/c", "k", "v"); }, {path, "a/b/c", "not a group"}));
  EXPECT_TRUE(throws_input_error([&] { w.set_attribute("/", "", "v"); }, {path, "attribute name"}));
  w.commit();
  EXPECT_TRUE(throws_input_error([&] { w.write("late", torch::zeros({1})); }, {path, "late", "committed"}));
}

TEST(IoHdf5, WriteIntoMissingDirectoryFails) {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/out.h5");
  EXPECT_TRUE(throws_input_error([&] { write_hdf5(path, {{"a", torch::zeros({1})}}); }, {path, "cannot create"}));
}

TEST(IoHdf5, ReadErrorsNameFileAndDataset) {
  TempDir dir;
  const std::string path = dir.file("r.h5");
  write_hdf5(path, {{"step_0/logits", torch::randn({2, 2})}, {"mask", torch::ones({2}, torch::kBool)}});
  Hdf5Reader r(path);
  EXPECT_TRUE(throws_input_error([&] { r.read("step_0/loss"); }, {path, "step_0/loss", "no such dataset"}));
  EXPECT_TRUE(throws_input_error([&] { r.read("step_9/logits"); }, {path, "step_9/logits", "step_9"}));
  EXPECT_TRUE(throws_input_error([&] { r.read("step_0"); }, {path, "step_0", "is a group"}));
  EXPECT_TRUE(throws_input_error([&] { r.read("mask/x"); }, {path, "mask/x"}));
  EXPECT_TRUE(throws_input_error([&] { r.info("nope"); }, {path, "nope"}));
  EXPECT_TRUE(throws_input_error([&] { r.read("step_0/logits", torch::kBFloat16); },
                                 {path, "step_0/logits", "stored dtype is Float", "expected BFloat16"}));
  EXPECT_TRUE(throws_input_error([&] { r.read("mask", torch::kUInt8); }, {path, "mask", "Bool"}));
  EXPECT_TRUE(throws_input_error([&] { r.list_datasets("step_1"); }, {path, "step_1", "no such group"}));
  EXPECT_TRUE(throws_input_error([&] { r.list_datasets("mask"); }, {path, "mask", "not a group"}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "absent", torch::kFloat32); }, {path, "absent"}));
}

TEST(IoHdf5, MissingAndNonHdf5Files) {
  TempDir dir;
  const std::string missing = dir.file("missing.h5");
  EXPECT_TRUE(throws_input_error([&] { Hdf5Reader r(missing); }, {missing, "no such file"}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5(missing); }, {missing}));
  const std::string text = dir.file("text.h5");
  write_bytes(text, "this is not HDF5 at all\n");
  EXPECT_TRUE(throws_input_error([&] { read_hdf5(text); }, {text, "not an HDF5 file"}));
  const std::string empty = dir.file("empty.h5");
  write_bytes(empty, "");
  EXPECT_TRUE(throws_input_error([&] { read_hdf5(empty); }, {empty}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5(dir.path().string()); }, {dir.path().string(), "directory"}));
}

TEST(IoHdf5, TruncatedFileIsInputError) {
  TempDir dir;
  const std::string path = dir.file("trunc.h5");
  write_hdf5(path, {{"a/big", torch::randn({256, 256})}, {"b/small", torch::randn({4})}});
  const std::string bytes = read_bytes(path);
  for (size_t keep : {bytes.size() / 2, size_t{600}, size_t{100}}) {
    write_bytes(path, bytes.substr(0, keep));
    EXPECT_TRUE(throws_input_error([&] { read_hdf5(path); }, {path})) << "kept " << keep << " bytes";
  }
}

// Adds a string attribute behind the writer's back (the writer reserves "dtype" on datasets).
void add_raw_string_attr(const std::string& path, const std::string& object, const std::string& key,
                         const std::string& value) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hid_t o = H5Oopen(f, object.c_str(), H5P_DEFAULT);
  ASSERT_GE(o, 0);
  const hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, value.size());
  const hid_t space = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(o, key.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(a, 0);
  ASSERT_GE(H5Awrite(a, type, value.data()), 0);  // a fixed-length string, as some writers make
  H5Aclose(a);
  H5Sclose(space);
  H5Tclose(type);
  H5Oclose(o);
  H5Fclose(f);
}

TEST(IoHdf5, InconsistentDtypeMarkerIsInputError) {
  TempDir dir;
  const std::string path = dir.file("marker.h5");
  write_hdf5(path, {{"g/x", torch::zeros({2})}, {"g/y", torch::zeros({2}, torch::kInt16)}});
  add_raw_string_attr(path, "/g/x", "dtype", "bfloat16");
  add_raw_string_attr(path, "/g/y", "dtype", "bool");
  add_raw_string_attr(path, "/", "fixed", "fixed-length");
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "g/x"); }, {path, "g/x", "bfloat16"}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "g/y"); }, {path, "g/y", "bool"}));
  EXPECT_EQ(read_hdf5_attributes(path), (StringMap{{"fixed", "fixed-length"}}));
}

TEST(IoHdf5, UnsupportedStoredTypeIsInputError) {
  TempDir dir;
  const std::string path = dir.file("strings.h5");
  write_hdf5(path, {{"x", torch::zeros({1})}});
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, 4);
    const hsize_t dims[1] = {2};
    const hid_t space = H5Screate_simple(1, dims, nullptr);
    const hid_t d = H5Dcreate2(f, "/names", type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    ASSERT_GE(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, "abcdefgh"), 0);
    H5Dclose(d);
    H5Sclose(space);
    H5Tclose(type);
    H5Fclose(f);
  }
  EXPECT_TRUE(throws_input_error([&] { read_hdf5_dataset(path, "names"); }, {path, "names", "unsupported datatype"}));
  EXPECT_TRUE(throws_input_error([&] { read_hdf5(path); }, {path, "names"}));
}

// harness/tests/data/io_h5py_fixture.h5 was written by h5py 3.7 (numpy float16, numpy bool as h5py's enum,
// big-endian int32, str/bytes/int attributes); see the generator in the commit that added it.
TEST(IoHdf5, ReadsH5pyWrittenFile) {
  const std::string path = std::string(CPHARNESS_SOURCE_DIR) + "/harness/tests/data/io_h5py_fixture.h5";
  Hdf5Reader r(path);
  EXPECT_EQ(r.list_datasets(), (std::vector<std::string>{"be_i32", "scalar", "step_0/f16", "step_0/f32",
                                                         "step_0/mask", "weights/layers.0.w"}));
  EXPECT_EQ(r.attributes(), (StringMap{{"fixed", "fixed-len"}, {"tool", "h5py"}}));  // int attribute skipped
  EXPECT_EQ(r.attributes("step_0"), (StringMap{{"note", "grüße"}}));
  EXPECT_TRUE(bit_equal(r.read("step_0/f16"), (torch::arange(6, torch::kFloat32).reshape({2, 3}) / 4).to(torch::kFloat16)));
  EXPECT_TRUE(bit_equal(r.read("step_0/f32"), torch::tensor({1.5f, -2.0f})));
  EXPECT_TRUE(bit_equal(r.read("step_0/mask"), torch::tensor({true, false, true})));
  EXPECT_TRUE(bit_equal(r.read("weights/layers.0.w"), torch::arange(4, torch::kInt64)));
  EXPECT_TRUE(bit_equal(r.read("scalar"), torch::tensor(2.25, torch::kFloat64)));
  EXPECT_TRUE(bit_equal(r.read("be_i32"), torch::tensor({1, -2, 3}, torch::kInt32)));
}

TEST(IoHdf5, ConcurrentReadersAndWritersFromThreads) {
  TempDir dir;
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      const std::string path = dir.file("t" + std::to_string(i) + ".h5");
      const TensorMap t = {{"rank_" + std::to_string(i) + "/x", torch::full({64}, static_cast<float>(i))}};
      for (int k = 0; k < 5; ++k) {
        write_hdf5(path, t, {{"/", {{"rank", std::to_string(i)}}}});
        const TensorMap back = read_hdf5(path);
        if (back.size() != 1 || !torch::equal(back.begin()->second, t.begin()->second)) return;
      }
      ok[i] = 1;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok, std::vector<int>(4, 1));
}

}  // namespace
}  // namespace cpharness::io
