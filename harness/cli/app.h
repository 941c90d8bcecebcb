// The cpharness command line: one parser (CLI11) for every verb, so `--help` of each is generated the same way.
#pragma once
#include <string>
#include <vector>

namespace cpharness::cli {

// Parses argv (without the program name) and calls the verb. Usage errors exit 2 (bisect: 125); an
// io::InputError exits 2 naming the file, field and reason.
int run_cli(const std::vector<std::string>& args);

}  // namespace cpharness::cli
