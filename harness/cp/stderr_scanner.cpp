#include "harness/cp/stderr_scanner.h"

namespace cpharness::cp {
namespace {

const std::regex kOurs{R"(cpharness: rank (\d+): )"};
// Anywhere after the message, not only at the line's end: mpirun's banners can be glued on behind it.
const std::regex kCulpritTag{R"(\[culprit: rank (\d+)\])"};
const std::regex kSignal{R"(process rank (\d+) with PID .* exited on signal)"};
const std::regex kAbort{R"(MPI_ABORT was invoked on rank (\d+))"};
const std::regex kProcessName{R"(Process name: \[\[\d+,\d+\],(\d+)\])"};
const std::regex kExitCode{R"(Exit code:\s+(\d+))"};
// MPI startup and shutdown's watchdog (comm_mpi.cpp): the rank cannot tell which peer it waited for.
const std::string kWaitedOnAnother = "another rank or mpirun is stopped or unresponsive";

}  // namespace

void StderrScanner::line(const std::string& text) {
  // Two ranks writing to the shared stderr at once can glue their messages into one line ("...[culprit: rank
  // 1]cpharness: rank 0: ..."); each rank's message is read on its own, or one rank's blame is pinned on another.
  static const std::string kPrefix = "cpharness: rank ";
  std::size_t start = 0;
  for (std::size_t at = text.find(kPrefix, 1); at != std::string::npos; at = text.find(kPrefix, at + 1)) {
    one_line(text.substr(start, at - start));
    start = at;
  }
  one_line(text.substr(start));
}

void StderrScanner::one_line(const std::string& l) {
  std::smatch m;
  if (std::regex_search(l, m, kOurs)) {
    hard_failure_ = rank_failure_ = true;
    const int r = std::stoi(m[1].str());
    reporters_.push_back({r, l});
    if (std::smatch b; std::regex_search(l, b, kCulpritTag)) blamed_.push_back({std::stoi(b[1].str()), l});
    else if (l.find(kWaitedOnAnother) != std::string::npos) waited_on_another_.push_back({r, l});
    else self_failed_.push_back({r, l});
  } else if (std::regex_search(l, m, kSignal)) {
    hard_failure_ = rank_failure_ = true;
    signalled_.push_back({std::stoi(m[1].str()), l});
  } else if (std::regex_search(l, m, kAbort)) {
    hard_failure_ = rank_failure_ = true;
  } else if (std::regex_search(l, m, kProcessName)) {
    exited_.push_back({std::stoi(m[1].str()), l});
  } else if (std::regex_search(l, m, kExitCode)) {
    // 1 (a check failed) and 3 (no check ran) are verdicts every rank returns together; anything else is a failure.
    if (m[1].str() != "1" && m[1].str() != "3") hard_failure_ = true;
  }
}

bool StderrScanner::reported(int rank) const {
  for (const auto& r : reporters_)
    if (r.rank == rank) return true;
  return false;
}

const StderrScanner::Seen* StderrScanner::culprit() const {
  if (!signalled_.empty()) return &signalled_.front();
  for (const auto& e : exited_)
    if (!reported(e.rank)) return &e;
  for (const auto& b : blamed_)
    if (!reported(b.rank)) return &b;
  if (!waited_on_another_.empty())
    for (int r = 0; r < world_size_; ++r)
      if (!reported(r)) {
        silent_ = {r, "rank " + std::to_string(r) + " said nothing, while " + waited_on_another_.front().line};
        return &silent_;
      }
  if (!self_failed_.empty()) return &self_failed_.front();
  if (!blamed_.empty()) return &blamed_.front();
  if (!waited_on_another_.empty()) return &waited_on_another_.front();
  if (!exited_.empty()) return &exited_.front();
  return nullptr;
}

}  // namespace cpharness::cp
