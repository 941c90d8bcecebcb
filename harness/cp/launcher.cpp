#include "harness/cp/launcher.h"
#include "harness/cp/stderr_scanner.h"
#include "harness/io/input_error.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <optional>
#include <regex>
#include <stdexcept>
#include <thread>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

extern char** environ;

#ifndef CPHARNESS_MPIEXEC
#define CPHARNESS_MPIEXEC "mpirun"
#endif

namespace cpharness::cp {

bool needs_relaunch(Backend backend, int nproc, const LaunchEnv& env) {
  return backend != Backend::Local && nproc > 1 && !env.launched();
}

std::vector<std::string> mpirun_command(int nproc, const std::string& exe, const std::vector<std::string>& args,
                                        const MpirunOptions& opt) {
  std::string mpirun = opt.mpirun;
  if (mpirun.empty()) {
    const char* v = std::getenv("CPHARNESS_MPIRUN");
    mpirun = (v && *v) ? v : CPHARNESS_MPIEXEC;
  }
  std::vector<std::string> cmd{mpirun, "-np", std::to_string(nproc), "--allow-run-as-root", "--oversubscribe",
                               "--bind-to", "none"};
  cmd.insert(cmd.end(), opt.extra_args.begin(), opt.extra_args.end());
  cmd.push_back(exe);
  cmd.insert(cmd.end(), args.begin(), args.end());
  return cmd;
}

std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) throw std::runtime_error("launcher: cannot read /proc/self/exe");
  return std::string(buf, static_cast<size_t>(n));
}

int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("launcher: socket() failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("launcher: cannot bind a loopback port");
  }
  const int port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

namespace {

// Where rank 0 of an --nproc job records its verdict (record_job_verdict); internal to the launcher and its ranks.
constexpr const char* kVerdictFileVar = "CPHARNESS_VERDICT_FILE";

// The environment of the job: this one, with mpirun allowed to run as root, no single-copy mechanism (it fails
// in containers), and a rendezvous address (loopback and a free port unless MASTER_ADDR/PORT are given).
std::vector<std::string> job_environment() {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv(*e);
    bool replaced = false;
    for (const char* k : {"OMPI_ALLOW_RUN_AS_ROOT=", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=",
                          "OMPI_MCA_btl_vader_single_copy_mechanism=", "MASTER_ADDR=", "MASTER_PORT=",
                          "CPHARNESS_VERDICT_FILE="})
      replaced = replaced || kv.rfind(k, 0) == 0;
    if (!replaced) env.push_back(kv);
  }
  env.push_back("OMPI_ALLOW_RUN_AS_ROOT=1");
  env.push_back("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1");
  env.push_back("OMPI_MCA_btl_vader_single_copy_mechanism=none");
  const char* addr = std::getenv("MASTER_ADDR");
  const char* port = std::getenv("MASTER_PORT");
  env.push_back(std::string("MASTER_ADDR=") + ((addr && *addr) ? addr : "127.0.0.1"));
  env.push_back("MASTER_PORT=" + ((port && *port) ? std::string(port) : std::to_string(free_loopback_port())));
  return env;
}

// Starts `cmd` in its own process group (a job timeout kills mpirun and everything it started) with its stderr
// on a non-blocking pipe; returns the child's pid and sets `stderr_fd`.
pid_t spawn_job(std::vector<std::string> cmd, std::vector<std::string> env, int& stderr_fd) {
  // Built before fork: no allocation between fork and exec.
  std::vector<char*> envp, argv;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  for (auto& s : cmd) argv.push_back(s.data());
  argv.push_back(nullptr);
  int pipefd[2];
  if (::pipe(pipefd) != 0) throw std::runtime_error("launcher: pipe() failed");
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  const pid_t launcher = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("launcher: fork() failed");
  if (pid == 0) {
    ::setpgid(0, 0);
    // The launcher killed outright (SIGKILL, OOM) cannot end the job itself: mpirun gets SIGTERM then and stops
    // its ranks (which also watch their parent: end_with_parent), instead of running on unowned.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != launcher) ::_exit(127);  // it died before the line above
    ::signal(SIGPIPE, SIG_DFL);  // this process ignores it (main); mpirun gets the default back
    ::dup2(pipefd[1], 2);
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    ::execvpe(argv[0], argv.data(), envp.data());
    const char msg[] = "cpharness: launcher: cannot execute mpirun\n";
    (void)!::write(2, msg, sizeof(msg) - 1);
    ::_exit(127);
  }
  ::close(pipefd[1]);
  ::fcntl(pipefd[0], F_SETFL, ::fcntl(pipefd[0], F_GETFL) | O_NONBLOCK);
  stderr_fd = pipefd[0];
  return pid;
}

// The job's stderr as it arrives: echoed, kept (a bounded tail) and scanned line by line for the failing rank.
struct StderrRelay {
  int fd;
  StderrScanner scan;
  std::string pending, tail;
  // Reads what is there; true at EOF.
  bool drain() {
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n <= 0) return n == 0;
      (void)!::write(2, buf, static_cast<size_t>(n));
      pending.append(buf, static_cast<size_t>(n));
      tail.append(buf, static_cast<size_t>(n));
      if (tail.size() > (128u << 10)) tail.erase(0, tail.size() - (64u << 10));
      size_t nl;
      while ((nl = pending.find('\n')) != std::string::npos) {
        scan.line(pending.substr(0, nl));
        pending.erase(0, nl + 1);
      }
    }
  }
  void finish() {
    if (!pending.empty()) scan.line(pending);
    if (tail.size() > (64u << 10)) tail.erase(0, tail.size() - (64u << 10));
  }
};

const char* sigabbrev(int sig) {
  switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
    default: return "a signal";
  }
}

// A signal that asks the launching process to stop (what CI and `timeout` send): passed on to the whole job.
volatile sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

// Installs the forwarding handlers for the life of one job, and restores the previous ones.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) {
      // A signal ignored when the process started stays ignored (POSIX: nohup, a shell's background job): the
      // job inherits that, and it is not a stop.
      if (::sigaction(kSignals[i], nullptr, &old_[i]) == 0 && old_[i].sa_handler == SIG_IGN) continue;
      installed_[i] = ::sigaction(kSignals[i], &sa, nullptr) == 0;
    }
  }
  ~StopSignals() {
    for (size_t i = 0; i < kSignals.size(); ++i)
      if (installed_[i]) ::sigaction(kSignals[i], &old_[i], nullptr);
  }

 private:
  static constexpr std::array<int, 3> kSignals{SIGTERM, SIGINT, SIGHUP};
  std::array<struct sigaction, 3> old_{};
  std::array<bool, 3> installed_{};
};

int read_verdict_file(const std::string& path);  // below: the verdict rank 0 recorded, -1 none (yet)

// The job's heartbeat: the verdict file's mtime, which rank 0 moves every 250 ms (start_job_heartbeat).
std::optional<timespec> heartbeat_of(const std::string& verdict_file) {
  struct stat st {};
  if (verdict_file.empty() || ::stat(verdict_file.c_str(), &st) != 0) return std::nullopt;
  return st.st_mtim;
}

// What the launcher watches while the job runs (in) and why it ended it (out).
struct JobWatch {
  std::chrono::milliseconds job_timeout{0}, after_verdict{0}, silence_limit{0};
  std::string verdict_file;
  bool killed = false;     // ended by this launcher for one of: job_timeout passed, or
  bool lingered = false;   // still there after_verdict past rank 0's verdict
  bool silent = false;     // no heartbeat for silence_limit before any verdict
  int stop_signal = 0;     // a stop signal this launcher received and passed on
};

// Waits for the job, relaying its stderr; when a limit of `w` is passed: SIGTERM to its group, SIGKILL 2 s later.
// Returns the wait status.
int wait_for_job(pid_t pid, StderrRelay& relay, JobWatch& w) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  std::optional<Clock::time_point> verdict_seen;
  auto last_beat = heartbeat_of(w.verdict_file);
  auto quiet_since = t0, last_turn = t0;
  int status = 0;
  bool exited = false, eof = false;
  Clock::time_point kill_at{};
  while (!exited) {
    if (g_stop_signal && !w.stop_signal) {  // forward it to mpirun and every rank (their own process group)
      w.stop_signal = g_stop_signal;
      ::kill(-pid, w.stop_signal);
      kill_at = Clock::now() + std::chrono::seconds(3);
    } else if (w.stop_signal && Clock::now() > kill_at) {
      ::kill(-pid, SIGKILL);
      kill_at = Clock::now() + std::chrono::seconds(1);
    }
    pollfd p{relay.fd, POLLIN, 0};
    if (!eof) {
      ::poll(&p, 1, 50);
      eof = relay.drain();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (::waitpid(pid, &status, WNOHANG) == pid) exited = true;
    const auto now = Clock::now();
    // A turn of this loop takes ~50 ms: a longer gap is time this launcher was stopped (Ctrl-Z, a paused
    // container), in which the job was stopped too or unobserved; it is not the job's silence.
    if (now - last_turn > std::chrono::seconds(1)) quiet_since += now - last_turn;
    last_turn = now;
    if (const auto beat = heartbeat_of(w.verdict_file);
        beat && (!last_beat || beat->tv_sec != last_beat->tv_sec || beat->tv_nsec != last_beat->tv_nsec)) {
      last_beat = beat;
      quiet_since = now;
    }
    if (!verdict_seen && !w.verdict_file.empty() && read_verdict_file(w.verdict_file) >= 0) verdict_seen = now;
    if (!exited && !w.killed) {
      if (w.after_verdict.count() > 0 && verdict_seen && now - *verdict_seen > w.after_verdict) w.lingered = true;
      if (w.silence_limit.count() > 0 && !verdict_seen && now - quiet_since > w.silence_limit) w.silent = true;
    }
    const bool over_time = w.job_timeout.count() > 0 && now - t0 > w.job_timeout;
    if (!exited && (over_time || w.lingered || w.silent)) {
      if (!w.killed) {
        w.killed = true;
        ::kill(-pid, SIGTERM);
        kill_at = Clock::now() + std::chrono::seconds(2);
      } else if (Clock::now() > kill_at) {
        ::kill(-pid, SIGKILL);
      }
    }
  }
  if (!eof) relay.drain();  // what is already buffered; children left behind cannot keep us waiting
  relay.finish();
  return status;
}

// Whether execvp would find `name`: a path that is an executable file, or a name found so on PATH.
bool executable_found(const std::string& name) {
  auto runnable = [](const std::string& p) { return ::access(p.c_str(), X_OK) == 0 && !std::filesystem::is_directory(p); };
  if (name.empty()) return false;
  if (name.find('/') != std::string::npos) return runnable(name);
  const char* path = std::getenv("PATH");
  std::string dirs = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";
  for (size_t start = 0;;) {
    const size_t end = dirs.find(':', start);
    const std::string dir = dirs.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (runnable((dir.empty() ? "." : dir) + "/" + name)) return true;
    if (end == std::string::npos) return false;
    start = end + 1;
  }
}

// Where rank 0 records its verdict for this job (require_verdict): an empty file made before the launch, so no
// other job's can be taken for it.
std::string make_verdict_file() {
  const char* dir = std::getenv("TMPDIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/cpharness-verdict-XXXXXX";
  const int fd = ::mkstemp(path.data());
  if (fd < 0)
    throw io::InputError("environment", dir && *dir ? "TMPDIR" : "/tmp",
                         "cannot create the job's verdict file " + path + ": " + std::strerror(errno));
  ::close(fd);
  return path;
}

// A fresh directory for the job's shared-memory files: in /dev/shm (memory, as OpenMPI's default) where it can be
// made, else in TMPDIR; none (OpenMPI's default) when neither can.
std::string make_shared_memory_dir() {
  const char* tmp = std::getenv("TMPDIR");
  for (const std::string dir : {std::string("/dev/shm"), std::string(tmp && *tmp ? tmp : "/tmp")}) {
    std::string path = dir + "/cpharness-shm-XXXXXX";
    if (::mkdtemp(path.data())) return path;
  }
  return {};
}

// The exit code rank 0 recorded there, or -1 when it recorded none.
int read_verdict_file(const std::string& path) {
  char buf[16] = {};
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  const ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n < 2 || buf[n - 1] != '\n' || buf[0] < '0' || buf[0] > '9') return -1;
  return std::atoi(buf);
}

// Exit 0 / 1 / 3 (the ranks agreed on the verdict) or 2 (a rank failed, hung, the launch failed or the job timed
// out), with the reason. `verdict`: what rank 0 recorded (-1 none), when one is required.
void judge_job(LaunchResult& res, const StderrScanner& scan, bool timed_out, std::chrono::milliseconds job_timeout,
               int stop_signal, bool require_verdict, int verdict, const std::string& mpirun) {
  const auto* culprit = scan.culprit();
  res.failed_rank = culprit ? culprit->rank : -1;
  if (stop_signal) {
    res.exit_code = 2;
    res.failed_rank = -1;
    res.message = std::string("cpharness: run stopped: the launching process received ") + sigabbrev(stop_signal) +
                  "; it was passed on to mpirun and every rank, which were reaped (exit 2)";
  } else if (timed_out) {
    res.exit_code = 2;
    res.message = "cpharness: run failed: the job exceeded its " + std::to_string(job_timeout.count()) +
                  " ms limit and was killed (exit 2)";
  } else if (require_verdict && (res.mpirun_status == 0 || res.mpirun_status == 1 || res.mpirun_status == 3) &&
             verdict != res.mpirun_status) {
    // mpirun's status alone is no verdict: /bin/true, a launch that failed before any rank ran, mpirun stopped
    // on its own all end 0 or 1.
    res.exit_code = 2;
    const std::string recorded = verdict < 0 ? std::string("rank 0 recorded no verdict")
                                             : "rank 0 recorded exit " + std::to_string(verdict);
    res.message = "cpharness: run failed: the launcher " + mpirun + " exited with status " +
                  std::to_string(res.mpirun_status) + " but " + recorded +
                  (culprit ? "; rank " + std::to_string(culprit->rank) + " failed or hung; evidence: " + culprit->line
                           : std::string(" (the ranks did not run to the end: a failed launch, or mpirun stopped on its own)")) +
                  " (exit 2)";
  } else if (require_verdict && res.mpirun_status == 2 && verdict == 2 && !scan.rank_failure()) {
    res.exit_code = 2;  // every rank refused the run (bad input): no rank failed, rank 0's error report says why
    res.failed_rank = -1;
    res.message = "cpharness: run refused: every rank ended with exit 2 (rank 0's error report says why)";
  } else if (res.mpirun_status == 0) {
    res.exit_code = 0;
  } else if ((res.mpirun_status == 1 || res.mpirun_status == 3) && !scan.hard_failure()) {
    res.exit_code = res.mpirun_status;  // ranks agreed: a check failed (1), or no check ran (3, every case skipped)
  } else {
    res.exit_code = 2;
    std::string why = culprit ? "rank " + std::to_string(culprit->rank) + " failed or hung; evidence: " + culprit->line
                              : std::string("a rank failed (mpirun named no rank)");
    res.message = "cpharness: run failed: " + why + " (mpirun status " + std::to_string(res.mpirun_status) + ", exit 2)";
  }
}

}  // namespace

LaunchResult relaunch_under_mpirun(int nproc, const std::string& exe, const std::vector<std::string>& args,
                                   const MpirunOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  LaunchResult res;
  StderrRelay relay{-1, StderrScanner(nproc), {}, {}};
  StopSignals forward;  // before the job starts, so no signal is missed
  auto env = job_environment();
  const auto cmd = mpirun_command(nproc, exe, args, opt);
  if (!executable_found(cmd.front())) {  // else the job "fails" with mpirun's 127 and names nothing
    const char* from_env = std::getenv("CPHARNESS_MPIRUN");
    const bool named_by_env = opt.mpirun.empty() && from_env && *from_env;
    throw io::InputError("environment", named_by_env ? "CPHARNESS_MPIRUN" : "mpirun",
                         "'" + cmd.front() + "' is not an executable file" +
                             (cmd.front().find('/') == std::string::npos ? " on PATH" : ""));
  }
  struct RemovedOnReturn {  // on every way out, a spawn that throws included; a stop signal still waits for the job
    std::string path;
    ~RemovedOnReturn() {
      std::error_code ec;
      if (!path.empty()) std::filesystem::remove_all(path, ec);
    }
  };
  const RemovedOnReturn verdict{opt.require_verdict ? make_verdict_file() : std::string()};
  const std::string& verdict_file = verdict.path;
  if (!verdict_file.empty()) env.push_back(std::string(kVerdictFileVar) + "=" + verdict_file);
  // OpenMPI's shared-memory files (4 MiB a rank in /dev/shm) outlive a job whose mpirun is killed: they go to a
  // directory of this job's, removed with it (unless the user chose the directory).
  const char* backing = std::getenv("OMPI_MCA_btl_vader_backing_directory");
  const RemovedOnReturn shm{backing && *backing ? std::string() : make_shared_memory_dir()};
  if (!shm.path.empty()) env.push_back("OMPI_MCA_btl_vader_backing_directory=" + shm.path);
  const pid_t pid = spawn_job(cmd, std::move(env), relay.fd);
  JobWatch watch;
  watch.job_timeout = opt.job_timeout;
  watch.after_verdict = opt.after_verdict;
  watch.silence_limit = opt.silence_limit;
  watch.verdict_file = verdict_file;
  const int status = wait_for_job(pid, relay, watch);
  // mpirun is gone; a rank it could not end (one frozen by SIGSTOP keeps a pending SIGTERM) may still be in its
  // process group: nothing of the job outlives the launcher.
  ::kill(-pid, SIGKILL);
  ::close(relay.fd);
  res.stderr_tail = std::move(relay.tail);
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.mpirun_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  const int recorded = verdict_file.empty() ? -1 : read_verdict_file(verdict_file);
  const bool timed_out = watch.killed && !watch.lingered && !watch.silent;  // job_timeout
  judge_job(res, relay.scan, timed_out, opt.job_timeout, watch.stop_signal, opt.require_verdict, recorded, cmd.front());
  if (watch.lingered && !watch.stop_signal) {
    res.exit_code = 2;
    res.message = "cpharness: run failed: " + cmd.front() + " did not end within " +
                  std::to_string(opt.after_verdict.count()) + " ms of rank 0 recording its verdict (stopped or " +
                  "wedged in the job's shutdown) and was killed (exit 2)";
  }
  if (watch.silent && !watch.stop_signal) {
    res.exit_code = 2;
    res.failed_rank = -1;
    res.message = "cpharness: run failed: no sign of life from rank 0 for " +
                  std::to_string(opt.silence_limit.count()) + " ms and no verdict: " + cmd.front() +
                  " stopped or wedged before the ranks ran, or the whole job frozen; it was killed (exit 2)";
  }
  res.stop_signal = watch.stop_signal;
  if (!res.message.empty()) std::cerr << res.message << std::endl;
  return res;
}

void start_job_heartbeat() {
  const char* path = std::getenv(kVerdictFileVar);
  if (!path || !*path) return;
  std::thread([file = std::string(path)] {
    for (;;) {  // until the process ends; a file gone (the launcher ended) makes each touch a harmless failure
      ::utimensat(AT_FDCWD, file.c_str(), nullptr, 0);
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
  }).detach();
}

bool record_job_verdict(int exit_code) {
  const char* path = std::getenv(kVerdictFileVar);
  if (!path || !*path) return true;
  const std::string text = std::to_string(exit_code) + "\n";
  const int fd = ::open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
  bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == ssize_t(text.size());
  if (fd >= 0) ok = ::close(fd) == 0 && ok;
  if (!ok) std::cerr << "cpharness: rank 0: cannot record the verdict in " << path << ": " << std::strerror(errno) << "\n";
  return ok;
}

std::vector<uint8_t> store_rendezvous(const LaunchEnv& env, const std::string& key, const std::vector<uint8_t>& value,
                                      std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const std::string where = "rank " + std::to_string(env.rank) + " rendezvous at " + env.master_addr + ":" +
                            std::to_string(env.master_port) + " (key " + key + "): ";
  const std::string ack = key + "/acks";
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(env.master_port);
    o.isServer = env.rank == 0 && !env.agent_store;
    o.waitWorkers = false;
    o.timeout = timeout;
    c10d::TCPStore store(env.master_addr, o);
    if (env.rank == 0) {
      store.set(key, value);
      int64_t acks = 0;
      while ((acks = store.add(ack, 0)) < env.world_size - 1) {
        if (std::chrono::steady_clock::now() >= deadline)
          throw CommError(where + "timed out: " + std::to_string(acks) + " of " + std::to_string(env.world_size - 1) +
                              " ranks took the value",
                          "rendezvous", env.rank);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      return value;
    }
    store.wait({key}, timeout);
    auto got = store.get(key);
    store.add(ack, 1);
    return got;
  } catch (const CommError&) {
    throw;
  } catch (const std::exception& e) {
    std::string w = e.what();
    if (const auto nl = w.find('\n'); nl != std::string::npos) w.resize(nl);  // drop c10's backtrace
    throw CommError(where + w, "rendezvous", env.rank, env.rank == 0 ? -1 : 0);
  }
}

void end_with_parent(int rank) {
  const pid_t parent = ::getppid();
  std::thread([parent, rank] {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      if (::getppid() == parent) continue;
      const std::string line = "cpharness: rank " + std::to_string(rank) + ": mpirun (pid " + std::to_string(parent) +
                               ") is gone: ending this rank (exit 2)\n";
      (void)!::write(2, line.data(), line.size());
      std::_Exit(2);
    }
  }).detach();
}

[[noreturn]] void fail_rank(Comm* comm, int rank, const std::string& what) {
  std::string line = "cpharness: rank " + std::to_string(rank) + ": " + what;
  for (auto& c : line)
    if (c == '\n') c = ' ';
  std::cerr << line << std::endl;
  if (comm) comm->terminate_job(2, what);
  std::_Exit(2);
}

namespace {
std::mutex g_hung_mu;
std::function<void(int, const std::string&)> g_hung_handler;
}  // namespace

void on_hung_local_rank(std::function<void(int rank, const std::string& message)> handler) {
  std::lock_guard<std::mutex> lk(g_hung_mu);
  g_hung_handler = std::move(handler);
}

void end_for_hung_local_rank(int rank, const std::string& message) {
  std::function<void(int, const std::string&)> handler;
  {
    std::lock_guard<std::mutex> lk(g_hung_mu);
    handler = g_hung_handler;
  }
  if (handler) handler(rank, message);
  else std::cerr << "cpharness: " << message << " (exit 2)" << std::endl;
  std::cout.flush();
  std::cerr.flush();
  std::_Exit(2);
}

int guarded_rank_main(Comm* comm, int rank, const std::function<int()>& body) {
  try {
    return body();
  } catch (const CommError& e) {
    std::string what = std::string("CommError: ") + e.what();
    if (e.peer() >= 0 && e.peer() != rank) what += " [culprit: rank " + std::to_string(e.peer()) + "]";
    fail_rank(comm, rank, what);
  } catch (const std::exception& e) {
    fail_rank(comm, rank, e.what());
  } catch (...) {
    fail_rank(comm, rank, "unknown exception");
  }
}

}  // namespace cpharness::cp
