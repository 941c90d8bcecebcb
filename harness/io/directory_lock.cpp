#include "harness/io/directory_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <iostream>
#include <set>
#include <thread>

namespace cpharness::io {

DirectoryLocks::DirectoryLocks(const std::vector<std::string>& paths, std::chrono::milliseconds patience) {
  namespace fs = std::filesystem;
  std::set<std::string> dirs;  // sorted: every writer takes the locks in the same order
  for (const auto& p : paths) {
    if (p.empty()) continue;
    std::error_code ec;
    const fs::path parent = fs::path(p).has_parent_path() ? fs::path(p).parent_path() : fs::path(".");
    const fs::path dir = fs::weakly_canonical(parent, ec);
    dirs.insert(ec ? parent.string() : dir.string());
  }
  for (const auto& dir : dirs) {
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) continue;  // (the write itself will say why the directory cannot be used)
    const auto deadline = std::chrono::steady_clock::now() + patience;
    bool locked = false;
    for (bool said = false;;) {
      if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
        locked = true;
        break;
      }
      if (errno != EWOULDBLOCK && errno != EINTR) break;  // a file system without locks: written as before
      if (std::chrono::steady_clock::now() >= deadline) {
        std::cerr << "cpharness: " << dir << " is still locked by another cpharness process writing its reports "
                  << "there; writing without the lock\n";
        break;
      }
      if (!said) std::cerr << "cpharness: another cpharness process is writing its reports in " << dir << "; waiting\n";
      said = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (locked) fds_.push_back(fd);
    else ::close(fd);
  }
}

DirectoryLocks::~DirectoryLocks() {
  for (int fd : fds_) ::close(fd);  // (closing releases the lock)
}

}  // namespace cpharness::io
