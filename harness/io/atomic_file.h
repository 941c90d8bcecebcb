// Internal helper of harness/io: atomic file replacement (write a temp file beside the target, then rename).
#pragma once

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "harness/io/input_error.h"

namespace cpharness::io::detail {

// The temp files this process is writing, so that a stop signal's handler can remove them (remove_temp_files:
// async-signal-safe, fixed slots, no allocation). A path too long for a slot, or more than kSlots at once, is
// simply not tracked.
struct TempFiles {
  static constexpr int kSlots = 32;
  static constexpr size_t kPathMax = 4096;
  std::atomic<bool> used[kSlots] = {};
  char path[kSlots][kPathMax] = {};
};
inline TempFiles g_temp_files;

inline void track_temp_file(const std::string& p) {
  if (p.size() >= TempFiles::kPathMax) return;
  for (int i = 0; i < TempFiles::kSlots; ++i) {
    bool expected = false;
    if (g_temp_files.used[i].load() || !g_temp_files.used[i].compare_exchange_strong(expected, true)) continue;
    std::memcpy(g_temp_files.path[i], p.c_str(), p.size() + 1);
    return;
  }
}
inline void untrack_temp_file(const std::string& p) {
  for (int i = 0; i < TempFiles::kSlots; ++i)
    if (g_temp_files.used[i].load() && p == g_temp_files.path[i]) g_temp_files.used[i] = false;
}
// For a signal handler: unlinks every tracked temp file.
inline void remove_temp_files() {
  for (int i = 0; i < TempFiles::kSlots; ++i)
    if (g_temp_files.used[i].load()) ::unlink(g_temp_files.path[i]);
}

// This host's name as temp file names carry it (letters, digits, '.', '_'; "host" when it has none).
inline std::string temp_host() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) name[0] = 0;
  std::string host;
  for (const char* c = name; *c; ++c) host += std::isalnum(static_cast<unsigned char>(*c)) || *c == '.' ? *c : '_';
  return host.empty() ? "host" : host;
}

// Removes the temp files of `path` that a process of this host left when it was killed mid-write (SIGKILL, an
// out-of-memory kill): named `<path>.tmp-<this host>-<pid>-...`, that pid no longer running, untouched for a minute.
// Another host's temp (a shared file system), a running process's and a fresh one are never touched.
inline void sweep_dead_temp_files(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string prefix = target.filename().string() + ".tmp-" + temp_host() + "-";
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    const size_t digits = rest.find_first_not_of("0123456789");
    if (digits == 0 || digits > 9 || digits == std::string::npos || rest[digits] != '-') continue;
    const pid_t pid = static_cast<pid_t>(std::stol(rest.substr(0, digits)));
    if (pid <= 0 || pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;  // running (or not ours)
    std::error_code file_ec;
    const auto written = fs::last_write_time(it->path(), file_ec);
    if (file_ec || fs::file_time_type::clock::now() - written < std::chrono::minutes(1)) continue;
    fs::remove(it->path(), file_ec);
  }
}

// A fresh temp path in the same directory as `path` (same file system, so rename is atomic), tracked until it is
// committed or removed. Temps of `path` that a killed process of this host left are swept first.
inline std::string temp_path_for(const std::string& path) {
  static std::atomic<unsigned long> counter{0};
  sweep_dead_temp_files(path);
  const auto ticks = static_cast<unsigned long>(std::chrono::steady_clock::now().time_since_epoch().count());
  std::string tmp = path + ".tmp-" + temp_host() + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) +
                    "-" + std::to_string(ticks % 1000000007UL);
  track_temp_file(tmp);
  return tmp;
}

// Renames tmp over path; on failure removes tmp and throws InputError naming path. `replace` false: path must not
// exist when tmp takes its place (a hard link, which fails if it does, then tmp removed): a file another process
// made there meanwhile is never overwritten.
inline void commit_temp_file(const std::string& tmp, const std::string& path, bool replace = true) {
  if (!replace) {
    const int linked = ::link(tmp.c_str(), path.c_str());
    const int err = errno;
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    untrack_temp_file(tmp);
    if (linked != 0)
      throw InputError(path, "", err == EEXIST ? std::string("appeared while this was written (another process made "
                                                             "it); it is not replaced")
                                               : "cannot move temp file " + tmp + " into place: " + std::strerror(err));
    return;
  }
  std::error_code ec;
  // Only a regular file is replaced: renaming over a FIFO or a device node (/dev/full) would destroy it.
  const auto existing = std::filesystem::status(path, ec);
  if (!ec && std::filesystem::exists(existing) && !std::filesystem::is_regular_file(existing)) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    untrack_temp_file(tmp);
    throw InputError(path, "", "exists and is not a regular file; it is not replaced");
  }
  std::filesystem::rename(tmp, path, ec);
  untrack_temp_file(tmp);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw InputError(path, "", "cannot rename temp file " + tmp + " into place: " + ec.message());
  }
}

inline void remove_quietly(const std::string& path) {
  std::error_code ignored;
  std::filesystem::remove(path, ignored);
  untrack_temp_file(path);
}

}  // namespace cpharness::io::detail
