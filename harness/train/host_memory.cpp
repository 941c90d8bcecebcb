#include "harness/train/host_memory.h"

#include <c10/core/CPUAllocator.h>
#include <pthread.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace cpharness::train {
namespace {

struct ThreadBytes {
  std::atomic<int64_t> live{0};
};

// Each thread's counter, shared with the allocations it made (a storage may outlive its thread).
std::shared_ptr<ThreadBytes>& this_thread_bytes() {
  thread_local auto bytes = std::make_shared<ThreadBytes>();
  return bytes;
}

struct Allocation {
  size_t bytes;
  std::shared_ptr<ThreadBytes> owner;
  c10::DeleterFnPtr free;  // the wrapped allocator's deleter
};

std::mutex g_mutex;
std::unordered_map<void*, Allocation>* g_allocations = new std::unordered_map<void*, Allocation>;  // never freed:
                                                                                                  // storages die late
std::atomic<bool> g_enabled{false};
thread_local int t_scopes = 0;  // HostMemoryScopes alive on this thread
c10::DeleterFnPtr g_inner_raw_deleter = nullptr;  // the wrapped allocator's, for raw_deallocate of uncounted ones

void metered_delete(void* data) {
  Allocation a;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocations->find(data);
    if (it == g_allocations->end()) {  // not counted (made outside a scope), handed back through raw_deallocate
      if (g_inner_raw_deleter) g_inner_raw_deleter(data);
      return;
    }
    a = std::move(it->second);
    g_allocations->erase(it);
  }
  a.owner->live -= int64_t(a.bytes);
  a.free(data);
}

// Wraps the allocator it replaces. Its allocations keep data == context (raw_allocate and the mkldnn paths rely on
// that), so the map, not the context, remembers whom each belongs to.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner_->allocate(n);
    if (t_scopes == 0 || n == 0 || p.get() == nullptr || p.get() != p.get_context()) return p;  // not counted
    void* data = p.get();
    const auto device = p.device();
    const c10::DeleterFnPtr free = p.get_deleter();
    p.release_context();
    auto& owner = this_thread_bytes();
    owner->live += int64_t(n);
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      (*g_allocations)[data] = Allocation{n, owner, free};
    }
    return {data, data, &metered_delete, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &metered_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  c10::Allocator* inner_;
};

}  // namespace

void enable_host_memory_metering() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Never freed: libtorch keeps using it until the process ends.
    c10::Allocator* inner = c10::GetCPUAllocator();
    g_inner_raw_deleter = inner->raw_deleter();
    c10::SetCPUAllocator(new CountingAllocator(inner), /*priority=*/100);
    // A forked child (the HDF5 reads' probe) frees tensors through metered_delete: the map's lock must not be
    // copied held by a thread the child does not have. Taken around every fork, released on both sides.
    ::pthread_atfork([] { g_mutex.lock(); }, [] { g_mutex.unlock(); }, [] { g_mutex.unlock(); });
    g_enabled = true;
  });
}

bool host_memory_metering_enabled() { return g_enabled; }

HostMemoryScope::HostMemoryScope() { ++t_scopes; }
HostMemoryScope::~HostMemoryScope() { --t_scopes; }

int64_t host_bytes_live() { return g_enabled && t_scopes > 0 ? this_thread_bytes()->live.load() : -1; }

}  // namespace cpharness::train
