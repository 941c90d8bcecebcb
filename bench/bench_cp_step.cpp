// Step time of a tiny model at long sequence: cp 1 (one process, one intra-op thread) against cp N under
// mpirun (one process per rank, one thread each). Prints wall time and, per rank, compute time (thread CPU
// time outside communication) and the wall time spent in communication or waiting for peers. The sum of
// compute over ranks against cp 1 shows wasted work, and the spread across ranks the load imbalance that
// contiguous sharding causes on causal layers.
//
//   build/bench/bench_cp_step --seq 4096                                  # cp 1
//   mpirun -np 2 --allow-run-as-root --oversubscribe build/bench/bench_cp_step --seq 4096   # cp 2
//   ... --sharding zigzag --mode stream                                   # load-balanced shards, streaming ring
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "harness/cp/cp_step.h"
#include "harness/cp/launcher.h"
#include "harness/model/init.h"

using namespace cpharness;

int main(int argc, char** argv) {
  int64_t seq = 4096, steps = 2;
  std::string preset = "tiny-e4b";
  auto sharding = cp::Sharding::kContiguous;
  cp::RingOptions ring_options;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--seq") seq = std::stoll(argv[i + 1]);
    else if (a == "--steps") steps = std::stoll(argv[i + 1]);
    else if (a == "--preset") preset = argv[i + 1];
    else if (a == "--sharding") {
      const auto parsed = cp::sharding_from_string(argv[i + 1]);
      if (!parsed) {
        fmt::print(stderr, "bench_cp_step: --sharding: expected contiguous or zigzag, got '{}'\n", argv[i + 1]);
        return 2;
      }
      sharding = *parsed;
    } else if (a == "--mode") {
      ring_options.mode = std::string(argv[i + 1]) == "stream" ? cp::RingMode::kStream : cp::RingMode::kCollect;
    }
  }
  torch::set_num_threads(1);
  const bool under_mpi = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr;
  auto config = model::preset_config(preset);
  train::BatchSpec spec;
  spec.seq_len = seq;
  spec.vocab_size = config.vocab_size;
  auto batch = train::make_batch(spec);

  auto body = [&](cp::Comm& comm) {
    model::Gemma4Model m(config);
    model::init_weights(m, 1);
    cp::RingAttention ring(comm, ring_options);
    for (int64_t s = 0; s < steps; ++s) {
      for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
      ring.reset_comm_seconds();
      comm.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      const double cpu0 = cp::thread_cpu_seconds();
      cp::CpStepOptions options;
      options.sharding = sharding;
      auto r = cp::cp_forward_backward(comm, m, ring, batch, uint64_t(s + 1), options);
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // Compute = this thread's CPU time minus the CPU it burnt inside communication (MPI polls while waiting).
      // CPU time, not wall time: the ranks share this machine's cores, so wall time would count preemption.
      const double compute = cp::thread_cpu_seconds() - cpu0 - ring.comm_cpu_seconds();
      auto times = torch::zeros({comm.size(), 2}, torch::kFloat64);
      times[comm.rank()][0] = compute;
      times[comm.rank()][1] = ring.comm_seconds();
      comm.all_reduce(times);
      comm.barrier();
      if (comm.rank() == 0) {
        double total_compute = 0, max_compute = 0, min_compute = 1e300;
        for (int r = 0; r < comm.size(); ++r) {
          const double c = times[r][0].item<double>();
          total_compute += c, max_compute = std::max(max_compute, c), min_compute = std::min(min_compute, c);
          fmt::print("  step {} rank {}: compute {:.3f}s CPU, in comm or waiting {:.3f}s wall\n", s, r, c, times[r][1].item<double>());
        }
        fmt::print("{} S={} cp={} {} {} step {}: wall {:.3f}s, loss {:.5f}, total compute over ranks {:.3f}s, "
                   "imbalance max/min compute {:.2f}\n",
                   preset, seq, comm.size(), cp::to_string(sharding), cp::to_string(ring_options.mode), s, wall, r.loss, total_compute, max_compute / std::max(min_compute, 1e-9));
      }
    }
  };
  if (under_mpi) {
    auto comm = cp::make_mpi_comm(std::chrono::minutes(30));
    body(*comm);
  } else {
    cp::run_local(1, body, std::chrono::minutes(30));
  }
  return 0;
}
