#include "harness/cp/comm_worker.h"

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
  std::packaged_task<std::vector<at::Tensor>()> task(std::move(exchange));
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
