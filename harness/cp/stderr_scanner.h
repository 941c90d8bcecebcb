// Pins a failed process-backend job on one rank from the job's stderr (mpirun's banners and the ranks' own
// "cpharness: rank R: ..." messages, which name the peer they were waiting for as "[culprit: rank P]"). Evidence,
// strongest first: a rank mpirun saw die of a signal; a rank that exited non-zero without a word; a rank blamed by
// a peer's CommError that never reported anything itself (it hung); a rank that said nothing while another waited
// on "another rank" (MPI's startup or shutdown, which cannot tell which); a rank that reported its own failure; any
// blamed rank. mpirun's non-zero-exit banner names the first rank to exit, which is often the one that saw the
// failure and ended itself, so it counts only for a rank that said nothing.
#pragma once
#include <regex>
#include <string>
#include <vector>

namespace cpharness::cp {

class StderrScanner {
 public:
  struct Seen {
    int rank;
    std::string line;
  };

  // `world_size`: the job's ranks (0: unknown; a rank that said nothing cannot be found then).
  explicit StderrScanner(int world_size = 0) : world_size_(world_size) {}
  // One line of the job's stderr (two ranks' messages glued into one line are read one by one).
  void line(const std::string& text);
  // The rank to blame, with the line that shows it; null when nothing points at one.
  const Seen* culprit() const;
  // A rank failed (not only "every rank exited 1 or 3 together", the verdicts a passing job's ranks agree on).
  bool hard_failure() const { return hard_failure_; }
  // A rank said it failed, died of a signal or called MPI_Abort (beyond mpirun's report of a non-zero exit).
  bool rank_failure() const { return rank_failure_; }

 private:
  void one_line(const std::string& l);
  bool reported(int rank) const;
  int world_size_ = 0;
  bool hard_failure_ = false;
  bool rank_failure_ = false;
  std::vector<Seen> signalled_, exited_, blamed_, waited_on_another_, self_failed_, reporters_;
  mutable Seen silent_;  // a rank that said nothing, when one waited on "another rank" (culprit() returns a pointer)
};

}  // namespace cpharness::cp
