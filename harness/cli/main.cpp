#include <torch/torch.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "harness/cli/app.h"
#include "harness/cli/verbs.h"
#include "harness/train/host_memory.h"

int main(int argc, char** argv) {
  // `cpharness run ... 2>&1 | head` must not die of SIGPIPE (no report, the old one kept): a write to a closed
  // pipe fails with EPIPE instead, and progress output that cannot be shown is dropped (iostreams stay quiet).
  ::signal(SIGPIPE, SIG_IGN);
  // Likewise a write past a file-size limit (ulimit -f, a CI sandbox's RLIMIT_FSIZE) fails with EFBIG, which the
  // writers report as they do a full disk, instead of killing the process with no report and a temp file left.
  ::signal(SIGXFSZ, SIG_IGN);
  cpharness::cli::take_withdrawn_reports_from_environment();
  // Ranks run as threads of this process; one intra-op thread each keeps runs deterministic and avoids
  // oversubscribing the cores (CPHARNESS_INTRA_OP_THREADS overrides).
  // A value that is not a whole number from 1 to 1024 is a usage error: 0, -1 and words read as 1, and 99999
  // threads took longer to start than any run.
  const std::vector<std::string> args(argv + 1, argv + argc);
  const char* threads = std::getenv("CPHARNESS_INTRA_OP_THREADS");
  int thread_count = 1;
  if (threads) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(threads, &end, 10);
    if (errno != 0 || end == threads || *end != '\0' || v < 1 || v > 1024) {
      // A usage error like any other: an older run's reports where this one writes are withdrawn.
      return cpharness::cli::refuse_before_parsing(
          args, "CPHARNESS_INTRA_OP_THREADS=" + std::string(threads).substr(0, 40) + ": expected a whole number from 1 to 1024");
    }
    thread_count = int(v);
  }
  torch::set_num_threads(thread_count);
  // cuBLAS is bitwise repeatable only with a fixed workspace (read when its first handle is made); a value the
  // user set is kept. Harmless on the CPU.
  setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);
  // Before any thread allocates: CPU runs' activation memory is counted per thread (memory.activations).
  cpharness::train::enable_host_memory_metering();
  return cpharness::cli::run_cli(args);
}
