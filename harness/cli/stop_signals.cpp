#include "harness/cli/stop_signals.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "harness/io/atomic_file.h"

namespace cpharness::cli {
namespace {

constexpr int kSignals[3] = {SIGTERM, SIGINT, SIGHUP};

struct Prepared {
  std::vector<StopReportFile> reports;
  std::vector<std::string> temps;  // one per report: where its contents are written before the rename
  std::vector<std::string> stale;
  std::string lines[3];
};
Prepared* g_prepared = nullptr;

// Who owns the report files now: two stop signals back to back (timeout's SIGTERM to the child and then to its
// group, Ctrl-C then a CI cancel) reach two threads at once, and a stop may come while the verdict is being written.
enum : int { kRunning, kStopping, kWritingVerdict };
std::atomic<int> g_owner{kRunning};

// False on a short write (a full disk, a file size limit).
bool write_all(int fd, const char* p, size_t left) {
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    left -= size_t(n);
  }
  return true;
}
bool write_all(int fd, const std::string& s) { return write_all(fd, s.data(), s.size()); }

// The error report replaces the report at `f`; where it cannot be written in full, neither the partial file nor the
// older report stays (unlinking needs no space): a missing report, never a truncated or another run's one.
void replace_report(const StopReportFile& f, const std::string& temp, int index) {
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  bool ok = fd >= 0 && write_all(fd, f.contents[index]);
  if (fd >= 0) ok = ::close(fd) == 0 && ok;
  if (ok && ::rename(temp.c_str(), f.path.c_str()) == 0) return;
  ::unlink(temp.c_str());
  ::unlink(f.path.c_str());
  static const char kCannot[] = "cpharness: could not write the error report; removed ";
  write_all(2, kCannot, sizeof(kCannot) - 1);
  write_all(2, f.path);
  write_all(2, "\n", 1);
}

void on_stop_signal_in_verb(int sig) {
  int owner = kRunning;
  if (!g_owner.compare_exchange_strong(owner, kStopping)) {
    if (owner == kWritingVerdict) return;  // the verdict stands, and the process ends with it
    for (;;) ::pause();                    // another thread's handler is ending the process
  }
  int i = 0;
  while (i < 2 && kSignals[i] != sig) ++i;
  const Prepared& p = *g_prepared;
  write_all(2, p.lines[i]);
  io::detail::remove_temp_files();
  for (size_t f = 0; f < p.reports.size(); ++f) replace_report(p.reports[f], p.temps[f], i);
  for (const auto& s : p.stale) ::unlink(s.c_str());
  ::_exit(2);
}

}  // namespace

void claim_reports_for_verdict() {
  int owner = kRunning;
  if (g_owner.compare_exchange_strong(owner, kWritingVerdict) || owner == kWritingVerdict) return;
  for (;;) ::pause();  // a stop handler is replacing the reports and will end the process
}

const char* stop_signal_name(int index) {
  static const char* const kNames[3] = {"SIGTERM", "SIGINT", "SIGHUP"};
  return kNames[index];
}

void end_on_stop_signals(const std::string& verb, std::vector<StopReportFile> reports, std::vector<std::string> stale) {
  auto* p = new Prepared;  // never freed: a handler may run until the process ends
  for (const auto& r : reports) p->temps.push_back(r.path + ".tmp-stop-" + std::to_string(::getpid()));
  p->reports = std::move(reports);
  p->stale = std::move(stale);
  for (int i = 0; i < 3; ++i)
    p->lines[i] = "cpharness: " + verb + " stopped: received " + stop_signal_name(i) +
                  (p->reports.empty() ? "" : "; the error report replaces the reports") + " (exit 2)\n";
  // Blocked while the pointer changes hands, so a handler never sees half of it.
  sigset_t block, old;
  sigemptyset(&block);
  for (int s : kSignals) sigaddset(&block, s);
  ::pthread_sigmask(SIG_BLOCK, &block, &old);
  g_prepared = p;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal_in_verb;
  sigemptyset(&sa.sa_mask);
  for (int s : kSignals) sigaddset(&sa.sa_mask, s);  // one stop at a time
  for (int s : kSignals) {
    // A signal ignored when the process started stays ignored (POSIX: nohup, a shell's background job).
    struct sigaction current {};
    if (::sigaction(s, nullptr, &current) == 0 && current.sa_handler == SIG_IGN) continue;
    ::sigaction(s, &sa, nullptr);
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

}  // namespace cpharness::cli
