// Peak K/V chunk memory and communication of one attention layer's ring, collect vs stream, at cp 2, 4 and 8 (ranks
// as threads, or one process per rank under mpirun). Prints, per mode and cp: the most K/V chunks a rank held at
// once and their bytes (K and V of one chunk: 2 x B x Hkv x S_loc x D x dtype), the time ranks were blocked on
// exchanges, and the wall time of forward + backward. One full causal layer of the given shape, fp32.
//
//   build/bench/bench_ring_stream                          # S 4096, Hq 8, Hkv 2, D 256, cp 2 4 8, ranks as threads
//   build/bench/bench_ring_stream --seq 8192 --dim 512
//   mpirun -np 4 --allow-run-as-root --oversubscribe build/bench/bench_ring_stream   # cp = world size
#include <fmt/format.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>

#include "harness/cp/ring_attention.h"

using namespace cpharness;

namespace {

struct Figures {
  int64_t peak_chunks = 0;
  double blocked_s = 0, wall_s = 0;
};

Figures one_rank(cp::Comm& comm, cp::RingMode mode, int64_t seq, int64_t hq, int64_t hkv, int64_t dim) {
  const int n = comm.size(), r = comm.rank();
  const int64_t local = seq / n;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(uint64_t(11 + r));
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  auto q = torch::randn({1, hq, local, dim}, gen, f32).requires_grad_();
  auto k = torch::randn({1, hkv, local, dim}, gen, f32).requires_grad_();
  auto v = torch::randn({1, hkv, local, dim}, gen, f32).requires_grad_();
  cp::RingOptions options;
  options.mode = mode;
  cp::RingAttention ring(comm, options);
  ring.begin_batch(1, local);
  comm.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  auto out = ring.attend({q, k, v, kernels::LayerGeometry{}, 1.0 / std::sqrt(double(dim)), 0}, kernels::TokenMetadata{});
  out.sum().backward();
  Figures f;
  f.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  f.blocked_s = ring.comm_seconds();
  for (auto& e : ring.trace()) f.peak_chunks = std::max(f.peak_chunks, e.peak_chunks);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t seq = 4096, hq = 8, hkv = 2, dim = 256;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int64_t value = std::stoll(argv[i + 1]);
    if (a == "--seq") seq = value;
    else if (a == "--heads") hq = value;
    else if (a == "--kv-heads") hkv = value;
    else if (a == "--dim") dim = value;
  }
  torch::set_num_threads(1);
  const bool under_mpi = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr;
  std::unique_ptr<cp::Comm> world = under_mpi ? cp::make_mpi_comm(std::chrono::minutes(30)) : nullptr;
  const std::vector<int> sizes = under_mpi ? std::vector<int>{world->size()} : std::vector<int>{2, 4, 8};
  if (!world || world->rank() == 0)
    fmt::print("one causal layer, S {}, Hq {}, Hkv {}, D {}, fp32, {}\n", seq, hq, hkv, dim,
               under_mpi ? "one process per rank (mpi)" : "ranks as threads (local)");
  for (int n : sizes)
    for (auto mode : {cp::RingMode::kCollect, cp::RingMode::kStream}) {
      std::vector<Figures> per_rank(static_cast<size_t>(n));
      std::mutex mu;
      auto body = [&](cp::Comm& comm) {
        auto f = one_rank(comm, mode, seq, hq, hkv, dim);
        std::lock_guard<std::mutex> lock(mu);
        per_rank[size_t(comm.rank())] = f;
      };
      if (world) {
        body(*world);
        auto t = torch::zeros({n, 3}, torch::kFloat64);
        const auto& f = per_rank[size_t(world->rank())];
        t[world->rank()][0] = double(f.peak_chunks), t[world->rank()][1] = f.blocked_s, t[world->rank()][2] = f.wall_s;
        world->all_reduce(t);
        for (int r = 0; r < n; ++r)
          per_rank[size_t(r)] = {int64_t(t[r][0].item<double>()), t[r][1].item<double>(), t[r][2].item<double>()};
        if (world->rank() != 0) continue;
      } else {
        cp::run_local(n, body, std::chrono::minutes(30));
      }
      int64_t peak = 0;
      double blocked = 0, wall = 0;
      for (auto& f : per_rank) peak = std::max(peak, f.peak_chunks), blocked = std::max(blocked, f.blocked_s), wall = std::max(wall, f.wall_s);
      const int64_t chunk_bytes = 2 * hkv * (seq / n) * dim * 4;
      fmt::print("cp {} {:7}: peak {} chunks = {:.1f} MiB of K/V per rank per layer; blocked on exchanges (max over ranks) "
                 "{:.3f}s; forward+backward wall {:.3f}s\n",
                 n, cp::to_string(mode), peak, double(peak * chunk_bytes) / (1 << 20), blocked, wall);
    }
  return 0;
}
