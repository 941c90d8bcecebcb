#include "harness/cp/comm_worker.h"

#include "harness/train/device.h"

namespace cpharness::cp {

CommWorker::CommWorker() : thread_([this] { run(); }) {}

CommWorker::~CommWorker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::future<std::vector<at::Tensor>> CommWorker::post(Exchange exchange) {
  // The exchange runs on the poster's stream (ranks as threads on one GPU each have their own), so that it follows
  // the work that produced what it sends, and what it receives precedes the poster's later work.
  std::packaged_task<std::vector<at::Tensor>()> task([stream = train::ThreadStream(), exchange = std::move(exchange)] {
    const auto on_poster_stream = stream.use();
    return exchange();
  });
  auto done = task.get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_all();
  return done;
}

void CommWorker::run() {
  for (;;) {
    std::packaged_task<std::vector<at::Tensor>()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();  // an exception is stored in the task's future
  }
}

}  // namespace cpharness::cp
