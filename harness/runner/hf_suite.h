// hf-parity over goldens exported from transformers: one report case per golden, hf.parity at every cp size,
// and for a cache-gated export made without a cache (5.5.0/5.5.1 use_cache=False) kvshare.bug_detected against
// the correct, sharing run.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "harness/report/report.h"

namespace cpharness::runner {

struct HfParityOptions {
  std::vector<std::string> paths;  // GOLDEN.h5 files and directories of them
  std::vector<int> cp_sizes = {1, 2, 4};
  std::optional<bool> holder;      // force the KV-share holder on or off (default: what HF did)
};

// The *.h5 files of `paths` (directories expanded, sorted); an io::InputError for a missing path or an empty
// directory.
std::vector<std::string> hf_golden_files(const std::vector<std::string>& paths);

report::Report run_hf_parity(const HfParityOptions& options);

}  // namespace cpharness::runner
