// Where this process sits in a multi-rank job, from the launcher's environment. Free of libtorch: the `cpharness`
// launcher (cli/launcher_main.cpp) reads it before the libraries load, by the same rule as the ranks.
//
// Rank/world detection (detect_launch_env), first match wins:
//   mpirun (OpenMPI)  OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
//   torchrun          RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT)
//   srun (Slurm)      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
// MASTER_ADDR / MASTER_PORT are read under every launcher (default 127.0.0.1:29500: rendezvous binds to loopback
// unless told otherwise).
#pragma once

#include <functional>
#include <string>

namespace cpharness::cp {

struct LaunchEnv {
  enum class Source { None, Mpirun, Torchrun, Slurm };
  Source source = Source::None;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool agent_store = false;  // torchrun's agent already serves a TCPStore at MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE)

  bool launched() const { return source != Source::None; }
};
const char* launch_source_name(LaunchEnv::Source s);

// Reads the process environment (or `getenv_fn`, for tests). Throws std::runtime_error on malformed values
// (non-numeric, rank outside [0, world)).
LaunchEnv detect_launch_env();
LaunchEnv detect_launch_env(const std::function<const char*(const char*)>& getenv_fn);

}  // namespace cpharness::cp
