#include "harness/io/hdf5_probe.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

#include <ATen/Parallel.h>

#include "harness/io/hdf5_tensors.h"
#include "harness/io/input_error.h"

namespace cpharness::io {

void read_in_a_child_first(const std::string& path, const std::function<void()>& read) {
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(path, ec);
  // Generous: a sound file reads at hundreds of MB/s; a damaged one that loops never ends.
  const auto limit = std::chrono::seconds(60 + (ec ? 0 : int64_t(bytes >> 24)));
  const pid_t parent = ::getpid();
  pid_t pid = -1;
  {
    // Forked with the HDF5 lock held: no other thread is inside the library, so the child's copy of it is whole.
    const auto lock = detail::hold_hdf5_lock();
    pid = ::fork();
    if (pid == 0) {
      detail::renew_hdf5_lock_in_child();  // the copy is held by a thread the child does not have
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(0);
      // The parent's handlers write its reports: the child takes the default action instead, except for a signal
      // the process ignores (nohup, a background job), which it keeps ignoring, or a sound file would be "damaged".
      for (int s : {SIGTERM, SIGINT, SIGHUP}) {
        struct sigaction now {};
        if (::sigaction(s, nullptr, &now) == 0 && now.sa_handler != SIG_IGN) ::signal(s, SIG_DFL);
      }
      at::set_num_threads(1);  // the parent's thread pool is not in the child: ops run on this thread
      // What the library or glibc prints as the damage kills the child ("double free or corruption") is not this
      // run's to show: the parent names the file in its own error. (A crash in the parent's read would still print.)
      if (const int null = ::open("/dev/null", O_WRONLY); null >= 0) ::dup2(null, STDERR_FILENO);
      try {
        read();
      } catch (...) {
      }
      ::_exit(0);
    }
  }
  if (pid < 0) return;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      throw InputError(path, "", "reading it did not finish in " + std::to_string(limit.count()) +
                                     " s: the HDF5 structures of the file are damaged");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (WIFSIGNALED(status))
    throw InputError(path, "", std::string("is damaged: reading it crashed the HDF5 library (") +
                                   ::strsignal(WTERMSIG(status)) + "); no part of it was used");
}

}  // namespace cpharness::io
