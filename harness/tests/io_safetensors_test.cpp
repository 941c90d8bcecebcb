// Tests of harness/io/safetensors: round trips, the reference byte layout, sharded checkpoints, corrupt files.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "harness/io/safetensors.h"
#include "harness/tests/io_test_util.h"

namespace cpharness::io {
namespace {

using testing::bit_equal;
using testing::read_bytes;
using testing::TempDir;
using testing::throws_input_error;
using testing::write_bytes;

const std::vector<torch::ScalarType> kAllDtypes = {
    torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kFloat8_e4m3fn,
    torch::kFloat8_e5m2, torch::kInt64, torch::kInt32, torch::kInt16, torch::kInt8,
    torch::kUInt64, torch::kUInt32, torch::kUInt16, torch::kUInt8, torch::kBool};
const std::vector<std::vector<std::int64_t>> kShapes = {{}, {0}, {1}, {7}, {3, 5}, {4, 0, 3}, {2, 3, 4}};

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file from a header text and a data buffer, exactly per the spec.
std::string st_bytes(const std::string& header, const std::string& buffer) { return le64(header.size()) + header + buffer; }

std::string zeros(size_t n) { return std::string(n, '\0'); }

TEST(IoSafetensors, RoundTripEveryDtypeAndShapeBitExact) {
  TempDir dir;
  TensorMap in;
  std::uint64_t seed = 1;
  for (auto dt : kAllDtypes) {
    for (size_t i = 0; i < kShapes.size(); ++i) {
      in["t." + std::string(c10::toString(dt)) + "." + std::to_string(i)] = testing::random_tensor(dt, kShapes[i], seed++);
    }
  }
  const StringMap meta = {{"format", "pt"}, {"source", "io test"}};
  const std::string path = dir.file("all.safetensors");
  write_safetensors(path, in, meta);
  const TensorMap out = read_safetensors(path);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(out.count(name)) << name;
    EXPECT_TRUE(bit_equal(out.at(name), t)) << name;
    EXPECT_TRUE(out.at(name).is_contiguous());
  }
  EXPECT_EQ(read_safetensors_metadata(path), meta);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"all.safetensors"});  // no temp file left behind
}

TEST(IoSafetensors, EmptyMapAndNoMetadataRoundTrip) {
  TempDir dir;
  const std::string path = dir.file("empty.safetensors");
  write_safetensors(path, {});
  EXPECT_TRUE(read_safetensors(path).empty());
  EXPECT_TRUE(read_safetensors_metadata(path).empty());
}

TEST(IoSafetensors, ReadsHandBuiltReferenceLayout) {
  // Bytes as the Python reference writes them: metadata first, compact JSON, space padding to 8 bytes.
  std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"c":{"dtype":"BF16","shape":[1,2],"data_offsets":[16,20]},)"
      R"("m":{"dtype":"BOOL","shape":[3],"data_offsets":[20,23]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string buf;
  const std::int64_t b = -42;
  const float a[2] = {1.0f, -2.5f};
  const std::uint16_t c[2] = {0x3F80, 0xC000};  // bf16 1.0, -2.0
  buf.append(reinterpret_cast<const char*>(&b), 8);
  buf.append(reinterpret_cast<const char*>(a), 8);
  buf.append(reinterpret_cast<const char*>(c), 4);
  buf.append("\x01\x00\x01", 3);
  TempDir dir;
  const std::string path = dir.file("ref.safetensors");
  write_bytes(path, st_bytes(header, buf));

  const TensorMap t = read_safetensors(path);
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t.at("b").scalar_type(), torch::kInt64);
  EXPECT_EQ(t.at("b").dim(), 0);
  EXPECT_EQ(t.at("b").item<std::int64_t>(), -42);
  EXPECT_TRUE(torch::equal(t.at("a"), torch::tensor({1.0f, -2.5f})));
  EXPECT_EQ(t.at("c").scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(t.at("c").to(torch::kFloat32), torch::tensor({{1.0f, -2.0f}})));
  EXPECT_TRUE(torch::equal(t.at("m"), torch::tensor({true, false, true})));
  EXPECT_EQ(read_safetensors_metadata(path), (StringMap{{"format", "pt"}}));
}

TEST(IoSafetensors, WriterProducesReferenceLayout) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  write_safetensors(path, {{"a", torch::tensor({1.0f, -2.5f})}, {"b", torch::tensor(std::int64_t{-42})},
                           {"c", torch::tensor({true})}},
                    {{"format", "pt"}});
  std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"c":{"dtype":"BOOL","shape":[1],"data_offsets":[16,17]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string buf;
  const std::int64_t b = -42;
  const float a[2] = {1.0f, -2.5f};
  buf.append(reinterpret_cast<const char*>(&b), 8);
  buf.append(reinterpret_cast<const char*>(a), 8);
  buf.append("\x01", 1);
  EXPECT_EQ(read_bytes(path), st_bytes(header, buf));
}

// harness/tests/data/io_python_reference.safetensors was written by the Python reference (safetensors 0.8.0):
//   save_file({"x": arange(6, f32).reshape(2,3), "y": array(5, i64), "z": [True, False], "h": [0.5, -1.0] f16,
//              "e": zeros((0,2), f64)}, metadata={"format": "np"})
TEST(IoSafetensors, MatchesPythonReferenceFileBothWays) {
  const std::string ref = std::string(CPHARNESS_SOURCE_DIR) + "/harness/tests/data/io_python_reference.safetensors";
  const TensorMap t = read_safetensors(ref);
  const TensorMap want = {{"x", torch::arange(6, torch::kFloat32).reshape({2, 3})},
                          {"y", torch::tensor(std::int64_t{5})},
                          {"z", torch::tensor({true, false})},
                          {"h", torch::tensor({0.5f, -1.0f}).to(torch::kFloat16)},
                          {"e", torch::zeros({0, 2}, torch::kFloat64)}};
  ASSERT_EQ(t.size(), want.size());
  for (const auto& [n, w] : want) EXPECT_TRUE(bit_equal(t.at(n), w)) << n;
  EXPECT_EQ(read_safetensors_metadata(ref), (StringMap{{"format", "np"}}));
  TempDir dir;
  const std::string ours = dir.file("ours.safetensors");
  write_safetensors(ours, want, {{"format", "np"}});
  EXPECT_EQ(read_bytes(ours), read_bytes(ref));  // byte-identical to the reference writer
}

TEST(IoSafetensors, WriterTakesNonContiguousAndGradTensorsAndReplacesFiles) {
  TempDir dir;
  const std::string path = dir.file("nc.safetensors");
  const auto base = torch::arange(12, torch::kFloat32).reshape({3, 4});
  const auto grad = torch::ones({2}, torch::requires_grad());
  write_safetensors(path, {{"t", base.t()}, {"g", grad}});
  auto out = read_safetensors(path);
  EXPECT_TRUE(torch::equal(out.at("t"), base.t().contiguous()));
  EXPECT_FALSE(out.at("g").requires_grad());
  write_safetensors(path, {{"only", torch::zeros({1})}});  // replaces the old file
  out = read_safetensors(path);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out.count("only"));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"nc.safetensors"});
}

TEST(IoSafetensors, WriterRejectsBadInputAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  EXPECT_TRUE(throws_input_error([&] { write_safetensors(path, {{"__metadata__", torch::zeros({1})}}); },
                                 {path, "__metadata__"}));
  EXPECT_TRUE(throws_input_error(
      [&] { write_safetensors(path, {{"cplx", torch::zeros({2}, torch::kComplexFloat)}}); }, {path, "cplx"}));
  const std::string nodir = dir.file("no/such/dir/x.safetensors");
  EXPECT_TRUE(throws_input_error([&] { write_safetensors(nodir, {{"a", torch::zeros({1})}}); }, {nodir}));
  EXPECT_TRUE(dir.entries().empty());
}

// --- sharded checkpoints -----------------------------------------------------------------------------------------

struct Sharded {
  TensorMap all;
  std::string index;
};

Sharded make_sharded(const TempDir& dir) {
  Sharded s;
  TensorMap shard1 = {{"model.embed_tokens.weight", testing::random_tensor(torch::kBFloat16, {8, 4}, 1)},
                      {"model.layers.0.self_attn.q_proj.weight", testing::random_tensor(torch::kFloat32, {4, 4}, 2)}};
  TensorMap shard2 = {{"model.layers.1.mlp.down_proj.weight", testing::random_tensor(torch::kFloat16, {4, 6}, 3)},
                      {"model.norm.weight", testing::random_tensor(torch::kFloat32, {4}, 4)}};
  write_safetensors(dir.file("model-00001-of-00002.safetensors"), shard1, {{"format", "pt"}});
  write_safetensors(dir.file("model-00002-of-00002.safetensors"), shard2, {{"format", "pt"}});
  nlohmann::json idx;
  idx["metadata"] = {{"total_size", 1234}};
  for (const auto& [n, t] : shard1) idx["weight_map"][n] = "model-00001-of-00002.safetensors", s.all[n] = t;
  for (const auto& [n, t] : shard2) idx["weight_map"][n] = "model-00002-of-00002.safetensors", s.all[n] = t;
  s.index = dir.file("model.safetensors.index.json");
  std::ofstream(s.index) << idx.dump(2);
  return s;
}

void expect_same(const TensorMap& got, const TensorMap& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [n, t] : want) {
    ASSERT_TRUE(got.count(n)) << n;
    EXPECT_TRUE(bit_equal(got.at(n), t)) << n;
  }
}

TEST(IoSafetensors, ShardedCheckpointViaIndexOrDirectory) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  expect_same(read_safetensors_checkpoint(s.index), s.all);
  expect_same(read_safetensors_checkpoint(dir.path().string()), s.all);
}

TEST(IoSafetensors, CheckpointSingleFileAndDirectoryWithModelSafetensors) {
  TempDir dir;
  const TensorMap t = {{"w", testing::random_tensor(torch::kFloat32, {3, 3}, 9)}};
  write_safetensors(dir.file("model.safetensors"), t);
  expect_same(read_safetensors_checkpoint(dir.file("model.safetensors")), t);
  expect_same(read_safetensors_checkpoint(dir.path().string()), t);
}

TEST(IoSafetensors, CheckpointErrors) {
  TempDir dir;
  const std::string missing = dir.file("nothing.safetensors");
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(missing); }, {missing}));
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(dir.path().string()); },
                                 {dir.path().string(), "model.safetensors"}));
  const std::string bad_index = dir.file("bad.index.json");
  std::ofstream(bad_index) << "{\"weight_map\": ";
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(bad_index); }, {bad_index, "malformed JSON"}));
  std::ofstream(bad_index, std::ios::trunc) << "{\"metadata\": {}}";
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(bad_index); }, {bad_index, "weight_map"}));
}

TEST(IoSafetensors, CheckpointMissingShardNamesIndexTensorAndShard) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  std::filesystem::remove(dir.file("model-00002-of-00002.safetensors"));
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); },
                                 {s.index, "model.layers.1.mlp.down_proj.weight", "model-00002-of-00002.safetensors",
                                  "does not exist"}));
  // A shard that is there but no file (a FIFO would block a reader; a directory) says so.
  ASSERT_EQ(::mkfifo(dir.file("model-00002-of-00002.safetensors").c_str(), 0644), 0);
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); },
                                 {s.index, "model-00002-of-00002.safetensors", "is not a regular file"}));
}

TEST(IoSafetensors, CheckpointTensorAbsentFromItsShard) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  auto idx = nlohmann::json::parse(read_bytes(s.index));
  idx["weight_map"]["model.layers.7.ghost.weight"] = "model-00001-of-00002.safetensors";
  std::ofstream(s.index, std::ios::trunc) << idx.dump();
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); },
                                 {s.index, "model.layers.7.ghost.weight", "model-00001-of-00002.safetensors",
                                  "absent"}));
}

// A shard is a file beside its index: a weight_map value that is a path ("/etc/passwd", "../elsewhere.safetensors",
// "sub/x") would read a file that is no part of the checkpoint, and is refused naming the index and the tensor, even
// when that file exists and is a valid safetensors file.
TEST(IoSafetensors, AShardOutsideTheIndexsDirectoryIsRefused) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  std::filesystem::create_directories(dir.path() / "sub");
  write_safetensors(dir.file("sub/x.safetensors"), {{"model.norm.weight", testing::random_tensor(torch::kFloat32, {4}, 4)}});
  for (const std::string value : {"/etc/passwd", "../model-00002-of-00002.safetensors", "sub/x.safetensors", "..", ""}) {
    SCOPED_TRACE(value);
    auto idx = nlohmann::json::parse(read_bytes(s.index));
    idx["weight_map"]["model.norm.weight"] = value;
    std::ofstream(s.index, std::ios::trunc) << idx.dump();
    EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); },
                                   {s.index, "model.norm.weight", "not a file name beside the index"}));
  }
}

// A checkpoint path, or the model.safetensors in its directory, that is a symbolic link loop is an error saying so,
// not "no such file" or "holds neither model.safetensors nor ...".
TEST(IoSafetensors, ALinkLoopIsCalledALoopNotMissing) {
  TempDir dir;
  std::filesystem::create_directories(dir.path() / "ckpt");
  std::filesystem::create_symlink("model.safetensors", dir.path() / "ckpt" / "model.safetensors");
  std::filesystem::create_symlink("loop", dir.path() / "loop");
  for (const auto& path : {(dir.path() / "ckpt").string(), (dir.path() / "loop").string()}) {
    SCOPED_TRACE(path);
    EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(path); }, {path, "symbolic links"}));
  }
}

// The index is as strict as a single file: a name listed twice in weight_map (JSON keeps one silently), and a shard
// holding a tensor weight_map does not list for it, are errors naming the index and the tensor.
TEST(IoSafetensors, AnIndexListingANameTwiceOrAShardHoldingAnUnlistedTensorIsRefused) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  std::string text = read_bytes(s.index);
  const std::string dup = "\"weight_map\": {\n    \"model.norm.weight\": \"nonexistent.safetensors\",";
  const auto at = text.find("\"weight_map\": {");
  ASSERT_NE(at, std::string::npos);
  write_bytes(s.index, text.substr(0, at) + dup + text.substr(at + std::string("\"weight_map\": {").size()));
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); }, {s.index, "model.norm.weight", "twice"}));
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint_info(s.index); }, {s.index, "twice"}));
  write_bytes(s.index, text);
  auto idx = nlohmann::json::parse(text);
  idx["weight_map"].erase("model.norm.weight");
  std::ofstream(s.index, std::ios::trunc) << idx.dump();
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); },
                                 {s.index, "model.norm.weight", "not listed"}));
}

// The headers alone say what the checkpoint holds: every tensor's dtype and shape, the same as reading it.
TEST(IoSafetensors, CheckpointInfoDescribesWhatReadingWouldReturn) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  const auto info = read_safetensors_checkpoint_info(dir.path().string());
  EXPECT_EQ(info.file, s.index);
  ASSERT_EQ(info.tensors.size(), s.all.size());
  for (const auto& [name, t] : s.all) {
    ASSERT_TRUE(info.tensors.count(name)) << name;
    EXPECT_EQ(info.tensors.at(name).dtype, t.scalar_type()) << name;
    EXPECT_EQ(info.tensors.at(name).shape, t.sizes().vec()) << name;
  }
}

TEST(IoSafetensors, CorruptShardIsReportedWithShardPathAndTensor) {
  TempDir dir;
  const Sharded s = make_sharded(dir);
  const std::string shard = dir.file("model-00002-of-00002.safetensors");
  const std::string bytes = read_bytes(shard);
  write_bytes(shard, bytes.substr(0, bytes.size() - 3));
  // Tensors are stored largest element first, then by name: model.norm.weight (F32) first, then the F16 tensor.
  EXPECT_TRUE(throws_input_error([&] { read_safetensors_checkpoint(s.index); },
                                 {shard, "model.layers.1.mlp.down_proj.weight", "truncated"}));
}

// --- corrupt single files ----------------------------------------------------------------------------------------

class IoSafetensorsCorrupt : public ::testing::Test {
 protected:
  // A valid file: "layers.0.weight" F32 [4,4] at [0,64), "layers.1.bias" F32 [8] at [64,96).
  void SetUp() override {
    path_ = dir_.file("ckpt.safetensors");
    write_safetensors(path_, {{"layers.0.weight", torch::randn({4, 4})}, {"layers.1.bias", torch::randn({8})}});
    ASSERT_NO_THROW(read_safetensors(path_));
    bytes_ = read_bytes(path_);
  }
  // Writes a file with this header text (padded) and a zero buffer of `buffer_len` bytes.
  void write_raw(const std::string& header, size_t buffer_len) {
    std::string h = header;
    h.append((8 - h.size() % 8) % 8, ' ');
    write_bytes(path_, st_bytes(h, zeros(buffer_len)));
  }
  ::testing::AssertionResult read_fails(std::initializer_list<std::string> needles) {
    std::vector<std::string> all = {path_};
    all.insert(all.end(), needles);
    try {
      read_safetensors(path_);
    } catch (const InputError& e) {
      for (const auto& n : all) {
        if (std::string(e.what()).find(n) == std::string::npos) {
          return ::testing::AssertionFailure() << "message \"" << e.what() << "\" lacks \"" << n << "\"";
        }
      }
      return ::testing::AssertionSuccess();
    } catch (const std::exception& e) {
      return ::testing::AssertionFailure() << "non-InputError: " << e.what();
    }
    return ::testing::AssertionFailure() << "read did not throw";
  }

  TempDir dir_;
  std::string path_;
  std::string bytes_;
};

TEST_F(IoSafetensorsCorrupt, TruncatedDataNamesLastTensor) {
  write_bytes(path_, bytes_.substr(0, bytes_.size() - 5));
  EXPECT_TRUE(read_fails({"layers.1.bias", "beyond the data buffer"}));
}

TEST_F(IoSafetensorsCorrupt, TruncatedIntoHeader) {
  write_bytes(path_, bytes_.substr(0, 20));
  EXPECT_TRUE(read_fails({"header", "beyond the file size"}));
  write_bytes(path_, bytes_.substr(0, 5));
  EXPECT_TRUE(read_fails({"header", "too short"}));
  write_bytes(path_, "");
  EXPECT_TRUE(read_fails({"header"}));
}

TEST_F(IoSafetensorsCorrupt, HeaderLengthBeyondFile) {
  std::string b = bytes_;
  b.replace(0, 8, le64(bytes_.size()));
  write_bytes(path_, b);
  EXPECT_TRUE(read_fails({"header", "header length"}));
  b.replace(0, 8, le64(~0ULL));
  write_bytes(path_, b);
  EXPECT_TRUE(read_fails({"header", "exceeds the limit"}));
}

TEST_F(IoSafetensorsCorrupt, MalformedJsonHeader) {
  std::string b = bytes_;
  const size_t colon = b.find(':', 8);
  ASSERT_NE(colon, std::string::npos);
  b[colon] = '#';
  write_bytes(path_, b);
  EXPECT_TRUE(read_fails({"header", "malformed JSON"}));
  write_raw("[1, 2]", 0);
  EXPECT_TRUE(read_fails({"header", "not an object"}));
}

TEST_F(IoSafetensorsCorrupt, DataOffsetsOutOfRange) {
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8);
  EXPECT_TRUE(read_fails({"layers.0.weight", "beyond the data buffer"}));
}

TEST_F(IoSafetensorsCorrupt, DataOffsetsInconsistentWithShape) {
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  EXPECT_TRUE(read_fails({"layers.0.weight", "needs 12"}));
  write_raw(R"({"layers.0.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", 16);
  EXPECT_TRUE(read_fails({"layers.0.weight", "needs 8"}));
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8);
  EXPECT_TRUE(read_fails({"layers.0.weight", "begin after end"}));
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8);
  EXPECT_TRUE(read_fails({"layers.0.weight", "data_offsets"}));
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8);
  EXPECT_TRUE(read_fails({"layers.0.weight", "shape"}));
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8);
  EXPECT_TRUE(read_fails({"layers.0.weight", "overflow"}));
}

TEST_F(IoSafetensorsCorrupt, UnknownDtype) {
  write_raw(R"({"layers.0.weight":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16);
  EXPECT_TRUE(read_fails({"layers.0.weight", "unknown dtype", "F128"}));
  write_raw(R"({"layers.0.weight":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", 4);
  EXPECT_TRUE(read_fails({"layers.0.weight", "dtype"}));
}

// A value nested 100000 deep in the header: an error naming the tensor, not a stack overflow while the message
// is written.
TEST_F(IoSafetensorsCorrupt, DeeplyNestedHeaderValuesAreErrorsNotCrashes) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  write_raw(R"({"layers.0.weight":{"dtype":)" + deep + R"(,"shape":[1],"data_offsets":[0,4]}})", 4);
  EXPECT_TRUE(read_fails({"layers.0.weight", "dtype", "array"}));
  write_raw(R"({"layers.0.weight":{"dtype":"F32","shape":[)" + deep + R"(],"data_offsets":[0,4]}})", 4);
  EXPECT_TRUE(read_fails({"layers.0.weight", "shape"}));
  write_raw(R"({"__metadata__":{"a":)" + deep + R"(}})", 0);
  EXPECT_TRUE(read_fails({"metadata"}));
}

TEST_F(IoSafetensorsCorrupt, MissingFields) {
  write_raw(R"({"layers.0.weight":{"dtype":"F32","data_offsets":[0,4]}})", 4);
  EXPECT_TRUE(read_fails({"layers.0.weight", "shape"}));
  write_raw(R"({"layers.0.weight":[1,2]})", 0);
  EXPECT_TRUE(read_fails({"layers.0.weight", "must be an object"}));
}

TEST_F(IoSafetensorsCorrupt, OverlapGapAndTrailingBytes) {
  write_raw(R"({"a.w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b.w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  EXPECT_TRUE(read_fails({"b.w", "overlap", "a.w"}));
  write_raw(R"({"a.w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b.w":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20);
  EXPECT_TRUE(read_fails({"b.w", "gap"}));
  write_raw(R"({"a.w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12);
  EXPECT_TRUE(read_fails({"a.w", "trailing"}));
}

TEST_F(IoSafetensorsCorrupt, DuplicateNameAndBadMetadata) {
  write_raw(R"({"a.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4);
  EXPECT_TRUE(read_fails({"a.w", "twice"}));
  write_raw(R"({"__metadata__":{"step":3},"a.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4);
  EXPECT_TRUE(read_fails({"__metadata__.step", "strings"}));
}

TEST_F(IoSafetensorsCorrupt, InvalidBoolByte) {
  std::string h = R"({"mask.0":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})";
  h.append((8 - h.size() % 8) % 8, ' ');
  write_bytes(path_, st_bytes(h, std::string("\x01\x00\x02", 3)));
  EXPECT_TRUE(read_fails({"mask.0", "byte value 2"}));
}

TEST_F(IoSafetensorsCorrupt, MissingFileAndDirectory) {
  std::filesystem::remove(path_);
  EXPECT_TRUE(read_fails({"no such file"}));
  EXPECT_TRUE(throws_input_error([&] { read_safetensors(dir_.path().string()); }, {dir_.path().string(), "directory"}));
}

}  // namespace
}  // namespace cpharness::io
