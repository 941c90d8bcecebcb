// How a verb ends when SIGTERM, SIGINT or SIGHUP stops it (CI cancelling a job, `timeout`, Ctrl-C): exit 2, one
// line on stderr naming the signal, no temp file of its own left behind, and, for the verbs that write reports, the
// error report ("run stopped: received SIGTERM") in place of every report file it was asked for, and no page that
// belongs to another run. The handler only calls async-signal-safe functions (open, write, rename, unlink, _exit):
// the reports are rendered before any work, once per signal. An error report that cannot be written in full (a
// full disk) is not renamed into place, and the report it would replace is removed: a missing report, never a
// truncated one nor another run's. A signal ignored when the process started (nohup) stays ignored.
//
// The --nproc launcher has its own handling for the life of the job (it forwards the signal to every rank and
// writes the report after reaping them); ranks started by a launcher keep the default (the launcher decides).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace cpharness::cli {

// One report file and its contents, per stop signal (index: 0 SIGTERM, 1 SIGINT, 2 SIGHUP).
struct StopReportFile {
  std::string path;
  std::string contents[3];
};

// Installs the handlers for the rest of the process; `stale` are removed (a page rendered for another run).
void end_on_stop_signals(const std::string& verb, std::vector<StopReportFile> reports, std::vector<std::string> stale);

// Called before the verdict (or a final error report) is written: from then on a stop signal is ignored (the
// verdict stands and the process ends with it). Where a stop's handler already runs, the caller waits for it to end
// the process. A handler entered while another runs waits likewise, so the reports are written once.
void claim_reports_for_verdict();

// The names the handler uses, in index order.
const char* stop_signal_name(int index);

}  // namespace cpharness::cli
