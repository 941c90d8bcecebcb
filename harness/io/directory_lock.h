// Exclusive locks on the directories a set of files is written to, held while the set is written: processes that
// write to the same place (two CI jobs sharing a workspace and an --out) take turns, so that the files there all come
// from one of them, never one's JSON beside the other's page. Advisory (flock on the directory itself: no lock file
// is left behind); it guards against cpharness processes only.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace cpharness::io {

class DirectoryLocks {
 public:
  // Locks the directory of each path (once each, in one order, so that two writers cannot deadlock). A directory
  // still locked after `patience` (a writer stopped mid-write) is written without its lock, said on stderr.
  explicit DirectoryLocks(const std::vector<std::string>& paths,
                          std::chrono::milliseconds patience = std::chrono::minutes(5));
  ~DirectoryLocks();
  DirectoryLocks(const DirectoryLocks&) = delete;
  DirectoryLocks& operator=(const DirectoryLocks&) = delete;

 private:
  std::vector<int> fds_;
};

}  // namespace cpharness::io
