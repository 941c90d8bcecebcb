#include "harness/cp/launch_env.h"

#include <cerrno>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace cpharness::cp {

const char* launch_source_name(LaunchEnv::Source s) {
  switch (s) {
    case LaunchEnv::Source::None: return "none";
    case LaunchEnv::Source::Mpirun: return "mpirun";
    case LaunchEnv::Source::Torchrun: return "torchrun";
    case LaunchEnv::Source::Slurm: return "slurm";
  }
  return "?";
}

namespace {

int parse_int(const char* name, const char* v) {
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || x < 0 || x > 1000000000)
    throw std::runtime_error(std::string("launcher: environment variable ") + name + "='" + v +
                             "' is not a non-negative integer");
  return static_cast<int>(x);
}

}  // namespace

LaunchEnv detect_launch_env() {
  return detect_launch_env([](const char* k) -> const char* { return std::getenv(k); });
}

LaunchEnv detect_launch_env(const std::function<const char*(const char*)>& getenv_fn) {
  LaunchEnv e;
  auto get = [&](const char* k) -> const char* {
    const char* v = getenv_fn(k);
    return (v && *v) ? v : nullptr;
  };
  struct Triple {
    LaunchEnv::Source src;
    const char *rank, *size, *local;
  };
  const Triple sources[] = {
      {LaunchEnv::Source::Mpirun, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
      {LaunchEnv::Source::Torchrun, "RANK", "WORLD_SIZE", "LOCAL_RANK"},
      {LaunchEnv::Source::Slurm, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"},
  };
  for (const auto& s : sources) {
    const char* r = get(s.rank);
    const char* n = get(s.size);
    if (!r || !n) continue;
    e.source = s.src;
    e.rank = parse_int(s.rank, r);
    e.world_size = parse_int(s.size, n);
    const char* l = get(s.local);
    e.local_rank = l ? parse_int(s.local, l) : 0;
    if (e.world_size < 1 || e.rank >= e.world_size)
      throw std::runtime_error(std::string("launcher: ") + s.rank + "=" + r + " is outside [0, " + s.size + "=" + n +
                               ")");
    break;
  }
  if (const char* a = get("MASTER_ADDR")) e.master_addr = a;
  if (const char* p = get("MASTER_PORT")) {
    e.master_port = parse_int("MASTER_PORT", p);
    if (e.master_port < 1 || e.master_port > 65535)
      throw std::runtime_error(std::string("launcher: MASTER_PORT=") + p + " is not a TCP port");
  }
  if (const char* s = get("TORCHELASTIC_USE_AGENT_STORE")) e.agent_store = std::string(s) == "True" || std::string(s) == "1";
  return e;
}

}  // namespace cpharness::cp
