// Host memory attributed to the thread that allocated it: the CPU allocator, wrapped, counts the tensor allocations
// a thread makes inside a HostMemoryScope against that thread's counter until the storage is freed (by whichever
// thread). Threads outside a scope (rank threads, the rest of the process) allocate as before, untouched: counting
// takes a lock per allocation. A CPU run's memory figures come from here (the CUDA caching allocator has its own,
// train/device.h).
//
// What it is for: an activation-memory regression that moves no number (design.md: upstream's activation
// checkpointing silently skipping attention, +16 % memory on E4B, same loss) is visible only as bytes. The bytes a
// forward leaves alive for its backward (saved activations) are a deterministic function of the model, the batch
// and libtorch's autograd; allocator scratch and thread scheduling do not enter them.
#pragma once
#include <cstdint>

namespace cpharness::train {

// Installs the counting allocator as libtorch's CPU allocator (once; later calls do nothing). Storage allocated
// before is not counted. Call before threads start allocating (cpharness and the tests call it first thing).
void enable_host_memory_metering();
bool host_memory_metering_enabled();

// While alive, the calling thread's allocations are counted (scopes nest).
class HostMemoryScope {
 public:
  HostMemoryScope();
  ~HostMemoryScope();
  HostMemoryScope(const HostMemoryScope&) = delete;
  HostMemoryScope& operator=(const HostMemoryScope&) = delete;
};

// Bytes the calling thread allocated inside its scopes and not yet freed; -1 when metering is off or the thread is
// in no scope.
int64_t host_bytes_live();

}  // namespace cpharness::train
