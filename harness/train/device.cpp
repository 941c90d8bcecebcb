#include "harness/train/device.h"

#include <regex>
#include <stdexcept>

#ifdef CPHARNESS_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAEvent.h>
#include <cuda_runtime_api.h>
#endif

namespace cpharness::train {

torch::Device parse_device(const std::string& name) {
  static const std::regex form("cpu|cuda(:[0-9]{1,3})?");
  if (!std::regex_match(name, form))
    throw std::invalid_argument("device must be \"cpu\", \"cuda\" or \"cuda:N\", got '" + name.substr(0, 64) + "'");
  return torch::Device(name);
}

std::string cuda_unavailable_reason() {
#ifdef CPHARNESS_HAVE_CUDA
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return std::string("no CUDA device (") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) + ")";
  }
  return n > 0 ? "" : "no CUDA device on this machine";
#else
  return "this cpharness was built without CUDA (configure with -DCPHARNESS_CUDA=ON)";
#endif
}

bool cuda_available() {
  static const bool available = cuda_unavailable_reason().empty();
  return available;
}

Batch to_device(const Batch& b, const torch::Device& device) {
  auto to = [&](const torch::Tensor& t) { return t.defined() ? t.to(device) : t; };
  return {to(b.input_ids), to(b.labels), to(b.position_ids),
          {to(b.meta.document_ids), to(b.meta.padding), to(b.meta.vision_group_ids)}};
}

void synchronize(const torch::Device& device) {
#ifdef CPHARNESS_HAVE_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#endif
}

void reset_peak_memory(const torch::Device& device) {
#ifdef CPHARNESS_HAVE_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.has_index() ? device.index() : 0);
#endif
}

std::optional<DeviceMemory> peak_memory(const torch::Device& device) {
#ifdef CPHARNESS_HAVE_CUDA
  if (device.is_cuda()) {
    using c10::CachingAllocator::StatType;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.has_index() ? device.index() : 0);
    const auto all = size_t(StatType::AGGREGATE);
    return DeviceMemory{stats.allocated_bytes[all].peak, stats.reserved_bytes[all].peak};
  }
#endif
  return std::nullopt;
}

void release_cached_memory(const torch::Device& device) {
#ifdef CPHARNESS_HAVE_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

std::string device_name(const torch::Device& device) {
#ifdef CPHARNESS_HAVE_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device.has_index() ? device.index() : 0) == cudaSuccess) return prop.name;
  }
#endif
  return device.str();
}

#ifdef CPHARNESS_HAVE_CUDA
struct OwnStream::Impl {
  explicit Impl(const torch::Device& device)
      : guard(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.has_index() ? device.index() : 0)) {}
  c10::cuda::CUDAStreamGuard guard;  // sets the stream (and its device) current; restores both when destroyed
};

OwnStream::OwnStream(const torch::Device& device) {
  if (device.is_cuda()) impl_ = std::make_unique<Impl>(device);
}

ThreadStream::ThreadStream() {
  if (cuda_available()) stream_ = std::make_shared<c10::cuda::CUDAStream>(c10::cuda::getCurrentCUDAStream());
}

std::shared_ptr<void> ThreadStream::use() const {
  if (!stream_) return nullptr;
  return std::make_shared<c10::cuda::CUDAStreamGuard>(*static_cast<const c10::cuda::CUDAStream*>(stream_.get()));
}

std::shared_ptr<const StreamHandoff> StreamHandoff::mark(const std::vector<at::Tensor>& sent) {
  for (const auto& t : sent) {
    if (!t.defined() || !t.is_cuda()) continue;
    auto h = std::make_shared<StreamHandoff>();
    auto event = std::make_shared<at::cuda::CUDAEvent>();
    event->record(c10::cuda::getCurrentCUDAStream(t.device().index()));
    h->event_ = event;
    return h;
  }
  return nullptr;
}

void StreamHandoff::accept(const std::vector<at::Tensor>& received) const {
  if (!event_) return;
  auto& event = *static_cast<at::cuda::CUDAEvent*>(event_.get());
  for (const auto& t : received) {
    if (!t.defined() || !t.is_cuda()) continue;
    const auto stream = c10::cuda::getCurrentCUDAStream(t.device().index());
    event.block(stream);
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
  }
}
#else
struct OwnStream::Impl {};
OwnStream::OwnStream(const torch::Device&) {}
ThreadStream::ThreadStream() = default;
std::shared_ptr<void> ThreadStream::use() const { return nullptr; }
std::shared_ptr<const StreamHandoff> StreamHandoff::mark(const std::vector<at::Tensor>&) { return nullptr; }
void StreamHandoff::accept(const std::vector<at::Tensor>&) const {}
#endif
OwnStream::~OwnStream() = default;

}  // namespace cpharness::train
