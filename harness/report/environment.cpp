#include "harness/report/environment.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch/headeronly/version.h"

namespace cpharness::report {

Report new_report(const std::string& device, std::optional<std::string> comm_backend) {
  Report r;
  r.timestamp = utc_timestamp_now();
  r.environment.torch = fmt::format("{}.{}.{}", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
  r.environment.device = device;
  r.environment.comm_backend = std::move(comm_backend);
  r.environment.determinism = {{"intra_op_threads", at::get_num_threads()},
                               {"deterministic_algorithms", at::globalContext().deterministicAlgorithms()}};
  return r;
}

}  // namespace cpharness::report
