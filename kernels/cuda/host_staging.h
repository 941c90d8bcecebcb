// Host-side staging for the raw CUDA attention API, with libtorch on the CPU only: device buffers, a BlockMask
// uploaded as a BlockMaskView, contiguous tensors copied to and from the device. Used by the GPU tests and the
// benchmark, which link cudart directly (no torch_cuda). Every CUDA error throws std::runtime_error.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <vector>

#include "kernels/block_mask.h"
#include "kernels/cuda/block_sparse_attention.h"

namespace cpharness::kernels::cuda {

// Throws std::runtime_error naming `what` when `e` is not cudaSuccess.
void check_cuda(cudaError_t e, const char* what);

// The number of CUDA devices, 0 when none (or no driver); `why` gets the reason when 0.
int cuda_device_count(std::string* why = nullptr);

// One cudaMalloc'ed buffer, freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A CPU tensor copied to the device, contiguous, in its own dtype (bool as uint8).
DeviceBuffer upload(const torch::Tensor& t);
// A device buffer read back into a new CPU tensor of `sizes` and `dtype` (synchronises the device).
torch::Tensor download(const DeviceBuffer& buffer, c10::IntArrayRef sizes, torch::ScalarType dtype);
// Writes a CPU tensor into an existing device buffer of the same byte size.
void upload_into(const DeviceBuffer& buffer, const torch::Tensor& t);

DType dtype_of(torch::ScalarType t);  // float, half, bfloat16; throws otherwise
torch::ScalarType scalar_type_of(DType t);

// A contiguous [B, H, S, D] view of a device buffer.
Tensor4 contiguous4(const DeviceBuffer& buffer, DType dtype, int64_t H, int64_t S, int64_t D);
// A contiguous [B, H, S] fp32 view.
Tensor3 contiguous3(const DeviceBuffer& buffer, int64_t H, int64_t S);

// A BlockMask's lists, geometry and metadata on the device, and the view the kernels take.
struct DeviceBlockMask {
  BlockMaskView view;
  std::vector<DeviceBuffer> buffers;  // owned storage behind the view's pointers
};
DeviceBlockMask upload_block_mask(const BlockMask& mask);

}  // namespace cpharness::kernels::cuda
