// Pins a failed process-backend job on one rank from the job's stderr (mpirun's banners and the ranks' own
// "cpharness: rank R: ..." messages, which name the peer they were waiting for as "[culprit: rank P]"). Evidence,
// strongest first: a rank mpirun saw die (signal or non-zero exit); a rank blamed by a peer's CommError that never
// reported anything itself (it hung); a rank that reported its own failure; any blamed rank.
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

  // One line of the job's stderr (two ranks' messages glued into one line are read one by one).
  void line(const std::string& text);
  // The rank to blame, with the line that shows it; null when nothing points at one.
  const Seen* culprit() const;
  // A rank failed (not only "every rank exited 1 or 3 together", the verdicts a passing job's ranks agree on).
  bool hard_failure() const { return hard_failure_; }

 private:
  void one_line(const std::string& l);
  bool hard_failure_ = false;
  std::vector<Seen> died_, blamed_, self_failed_, reporters_;
};

}  // namespace cpharness::cp
