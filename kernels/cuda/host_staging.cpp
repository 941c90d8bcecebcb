#include "kernels/cuda/host_staging.h"

#include "kernels/cuda/block_mask_view.h"

#include <stdexcept>
#include <string>

namespace cpharness::kernels::cuda {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

int cuda_device_count(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (why) *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why) *why = "cudaGetDeviceCount found no CUDA device";
  return n;
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes > 0) check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc");
}
DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
  o.ptr_ = nullptr;
  o.bytes_ = 0;
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

namespace {
torch::Tensor host_bytes(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU).contiguous();
  return c.scalar_type() == torch::kBool ? c.to(torch::kUInt8) : c;
}
}  // namespace

DeviceBuffer upload(const torch::Tensor& t) {
  auto c = host_bytes(t);
  DeviceBuffer d(size_t(c.numel()) * c.element_size());
  if (d.bytes() > 0) check_cuda(cudaMemcpy(d.get(), c.data_ptr(), d.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  return d;
}

void upload_into(const DeviceBuffer& buffer, const torch::Tensor& t) {
  auto c = host_bytes(t);
  const size_t bytes = size_t(c.numel()) * c.element_size();
  if (bytes != buffer.bytes()) throw std::runtime_error("upload_into: size mismatch");
  if (bytes > 0) check_cuda(cudaMemcpy(buffer.get(), c.data_ptr(), bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
}

torch::Tensor download(const DeviceBuffer& buffer, c10::IntArrayRef sizes, torch::ScalarType dtype) {
  auto t = torch::empty(sizes, torch::TensorOptions().dtype(dtype));
  const size_t bytes = size_t(t.numel()) * t.element_size();
  if (bytes > buffer.bytes()) throw std::runtime_error("download: buffer too small");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (bytes > 0) check_cuda(cudaMemcpy(t.data_ptr(), buffer.get(), bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  return t;
}

DType dtype_of(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return DType::kFloat32;
    case torch::kFloat16: return DType::kFloat16;
    case torch::kBFloat16: return DType::kBFloat16;
    default: throw std::runtime_error(std::string("CUDA attention: unsupported dtype ") + c10::toString(t));
  }
}

torch::ScalarType scalar_type_of(DType t) {
  switch (t) {
    case DType::kFloat16: return torch::kFloat16;
    case DType::kBFloat16: return torch::kBFloat16;
    default: return torch::kFloat32;
  }
}

Tensor4 contiguous4(const DeviceBuffer& buffer, DType dtype, int64_t H, int64_t S, int64_t D) {
  return {buffer.get(), dtype, H * S * D, S * D, D};
}

Tensor3 contiguous3(const DeviceBuffer& buffer, int64_t H, int64_t S) {
  return {static_cast<float*>(buffer.get()), H * S, S, 1};
}

DeviceBlockMask upload_block_mask(const BlockMask& m) {
  DeviceBlockMask d;
  auto put = [&](const torch::Tensor& t) -> const void* {
    if (!t.defined() || t.numel() == 0) return nullptr;
    d.buffers.push_back(upload(t));
    return d.buffers.back().get();
  };
  auto list = [&](const torch::Tensor& num, const torch::Tensor& idx) {
    TORCH_CHECK(num.scalar_type() == torch::kInt32 && idx.scalar_type() == torch::kInt32, "block lists must be int32");
    BlockList l;
    l.num = static_cast<const int32_t*>(put(num));
    l.indices = static_cast<const int32_t*>(put(idx));
    l.width = int32_t(idx.dim() == 3 ? idx.size(2) : 0);
    return l;
  };
  // Metadata rows: exactly the mask's batch rows (a mask with metadata has one row per batch element).
  auto meta = [&](const torch::Tensor& t, torch::ScalarType dtype) -> const void* {
    if (!t.defined()) return nullptr;
    return put(t.narrow(0, 0, m.batch).to(dtype));
  };
  d.view = block_mask_view(m, list, meta);
  return d;
}

}  // namespace cpharness::kernels::cuda
