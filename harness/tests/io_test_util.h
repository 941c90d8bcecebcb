// Helpers shared by the io, golden and report test suites.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "harness/io/input_error.h"

namespace cpharness::io::testing {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    for (int attempt = 0; attempt < 100; ++attempt) {
      fs::path p = fs::temp_directory_path() / ("cpharness_io_test_" + std::to_string(rd()));
      if (fs::create_directory(p)) {
        path_ = p;
        return;
      }
    }
    throw std::runtime_error("cannot create temp dir");
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);  // a test may have made it read-only
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  fs::path path_;
};

// A tensor of `dtype` and `shape` whose bytes are random (floats may hold NaN/Inf bit patterns, bools are 0/1).
inline torch::Tensor random_tensor(torch::ScalarType dtype, const std::vector<std::int64_t>& shape, std::uint64_t seed) {
  std::int64_t numel = 1;
  for (auto d : shape) numel *= d;
  if (numel == 0) return torch::empty(shape, torch::TensorOptions().dtype(dtype));
  auto gen = at::detail::createCPUGenerator(seed);
  const std::int64_t nbytes = numel * static_cast<std::int64_t>(c10::elementSize(dtype));
  torch::Tensor bytes = dtype == torch::kBool
                            ? torch::randint(0, 2, {nbytes}, gen, torch::TensorOptions().dtype(torch::kUInt8))
                            : torch::randint(0, 256, {nbytes}, gen, torch::TensorOptions().dtype(torch::kUInt8));
  return bytes.view(dtype).reshape(shape).clone();
}

// Same dtype, same shape, same bytes.
inline ::testing::AssertionResult bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type()) {
    return ::testing::AssertionFailure() << "dtype " << a.scalar_type() << " vs " << b.scalar_type();
  }
  if (a.sizes() != b.sizes()) return ::testing::AssertionFailure() << "shape " << a.sizes() << " vs " << b.sizes();
  const auto ac = a.contiguous(), bc = b.contiguous();
  if (ac.nbytes() != bc.nbytes()) return ::testing::AssertionFailure() << "nbytes differ";
  if (ac.nbytes() > 0 && std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) != 0) {
    return ::testing::AssertionFailure() << "bytes differ";
  }
  return ::testing::AssertionSuccess();
}

// Runs fn; asserts it throws InputError whose message contains every needle.
inline ::testing::AssertionResult throws_input_error(const std::function<void()>& fn,
                                                     std::initializer_list<std::string> needles) {
  try {
    fn();
  } catch (const InputError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) {
      if (msg.find(n) == std::string::npos) {
        return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << n << "\"";
      }
    }
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-InputError: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace cpharness::io::testing
