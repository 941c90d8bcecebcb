// The streaming ring's background communication: one thread that runs posted exchanges in posting order, so that the
// next K/V chunk travels while this rank computes on the current one. Every backend's blocking operations serve
// unchanged (local mailbox, MPI Isend/Irecv against the deadline, NCCL group calls): while an exchange is posted only
// this thread talks to the Comm, and since every rank posts the same sequence, the exchanges pair up in order. A
// failure (a timeout, a dead peer) is thrown from wait(), in the rank's own thread.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

namespace cpharness::cp {

class CommWorker {
 public:
  using Exchange = std::function<std::vector<at::Tensor>()>;

  CommWorker();
  ~CommWorker();  // runs what is still queued (each operation ends within the Comm's timeout), then joins
  CommWorker(const CommWorker&) = delete;
  CommWorker& operator=(const CommWorker&) = delete;

  // Queues `exchange` behind those posted before it; the future holds what it received, or its exception.
  std::future<std::vector<at::Tensor>> post(Exchange exchange);

 private:
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<std::vector<at::Tensor>()>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace cpharness::cp
