// Paths named inside an input file (a case's checkpoint or config.json) are read relative to that file's folder,
// as a user writing "../golden/ckpt" beside the case expects, whatever the working directory.
#pragma once
#include <filesystem>
#include <string>

namespace cpharness::io {

inline std::string resolve_beside(const std::string& file, const std::string& named) {
  const std::filesystem::path p(named);
  if (p.empty() || p.is_absolute()) return named;
  return (std::filesystem::path(file).parent_path() / p).lexically_normal().string();
}

}  // namespace cpharness::io
