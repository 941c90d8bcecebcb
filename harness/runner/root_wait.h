// How the other ranks of a process backend wait for rank 0's solo work: the cp 1 reference, the mask and attention
// checks, the judgement's reruns, the reports. That work takes as long as the model takes to train, which at real
// sizes is far longer than --timeout, while a rank 0 that stopped, hung or died must still be found within it. So
// the wait is on signs of life, not on the work's total duration: rank 0 says "still working" after each training
// step of its solo work (RootHeartbeat), and each sign restarts the others' wait (wait_for_root).
#pragma once
#include <chrono>
#include <cstdint>

#include "harness/cp/comm.h"

namespace cpharness::runner {

// Rank 0's side: beat() broadcasts "still working" to every rank of `world`, at most once per quarter of `wait`
// (toy steps take milliseconds; a beat is a collective). Every other rank must then be in wait_for_root.
class RootHeartbeat {
 public:
  RootHeartbeat(cp::Comm& world, std::chrono::milliseconds wait);
  void beat();
  int64_t beats_sent() const { return sent_; }
  // The rank a beat could not reach (-1: none failed). The beat's CommError is rethrown; this says it was the world's.
  int failed_peer() const { return failed_peer_; }

 private:
  cp::Comm& world_;
  std::chrono::milliseconds every_;
  std::chrono::steady_clock::time_point last_;
  int64_t sent_ = 0;
  int failed_peer_ = -1;
};

// Collective over `world`: rank 0's `value` reaches every rank, which returns it. The other ranks take any number of
// heartbeats first, each within `wait` of the previous (or of the call): a longer silence throws cp::CommError
// naming rank 0. Rank 0 itself sends at once.
int64_t wait_for_root(cp::Comm& world, int64_t value, std::chrono::milliseconds wait);

}  // namespace cpharness::runner
