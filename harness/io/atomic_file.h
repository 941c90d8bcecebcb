// Internal helper of harness/io: atomic file replacement (write a temp file beside the target, then rename).
#pragma once

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "harness/io/input_error.h"

namespace cpharness::io::detail {

// A fresh temp path in the same directory as `path` (same file system, so rename is atomic).
inline std::string temp_path_for(const std::string& path) {
  static std::atomic<unsigned long> counter{0};
  const auto ticks = static_cast<unsigned long>(std::chrono::steady_clock::now().time_since_epoch().count());
  return path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" +
         std::to_string(ticks % 1000000007UL);
}

// Renames tmp over path; on failure removes tmp and throws InputError naming path.
inline void commit_temp_file(const std::string& tmp, const std::string& path) {
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw InputError(path, "", "cannot rename temp file " + tmp + " into place: " + ec.message());
  }
}

inline void remove_quietly(const std::string& path) {
  std::error_code ignored;
  std::filesystem::remove(path, ignored);
}

}  // namespace cpharness::io::detail
