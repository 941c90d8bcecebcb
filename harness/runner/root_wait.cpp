#include "harness/runner/root_wait.h"

#include <torch/torch.h>

#include <algorithm>

namespace cpharness::runner {
namespace {

// One message, two int64s: what it is, and rank 0's value when it is the final one.
constexpr int64_t kStillWorking = 1;
constexpr int64_t kFinal = 0;

// Broadcasts `message` from rank 0 with `wait` as the deadline, the world's own timeout restored after.
void broadcast_within(cp::Comm& world, torch::Tensor& message, std::chrono::milliseconds wait) {
  const auto saved = world.timeout();
  world.set_timeout(wait);
  try {
    world.broadcast(message, 0);
  } catch (...) {
    world.set_timeout(saved);
    throw;
  }
  world.set_timeout(saved);
}

}  // namespace

RootHeartbeat::RootHeartbeat(cp::Comm& world, std::chrono::milliseconds wait)
    : world_(world), every_(std::max(wait / 4, std::chrono::milliseconds(1))), last_(std::chrono::steady_clock::now()) {}

void RootHeartbeat::beat() {
  const auto now = std::chrono::steady_clock::now();
  if (now - last_ < every_) return;
  auto message = torch::tensor({kStillWorking, int64_t(0)}, torch::kInt64);
  try {
    broadcast_within(world_, message, world_.timeout());
  } catch (const cp::CommError& e) {
    failed_peer_ = e.peer() >= 0 ? e.peer() : 1;
    throw;
  }
  last_ = std::chrono::steady_clock::now();
  ++sent_;
}

int64_t wait_for_root(cp::Comm& world, int64_t value, std::chrono::milliseconds wait) {
  for (;;) {
    auto message = torch::tensor({kFinal, value}, torch::kInt64);
    broadcast_within(world, message, wait);
    if (message[0].item<int64_t>() != kStillWorking) return message[1].item<int64_t>();
  }
}

}  // namespace cpharness::runner
