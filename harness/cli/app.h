// The cpharness command line: one parser (CLI11) for every verb, so `--help` of each is generated the same way.
#pragma once
#include <string>
#include <vector>

namespace cpharness::cli {

// Parses argv (without the program name) and calls the verb. Usage errors exit 2 (bisect: 125); an
// io::InputError exits 2 naming the file, field and reason.
int run_cli(const std::vector<std::string>& args);

// A usage error found before the arguments are parsed (an environment variable main() reads): says `why`, withdraws
// an older run's reports where this command would write its own, and returns the exit code (2; bisect: 125).
int refuse_before_parsing(const std::vector<std::string>& args, const std::string& why);

}  // namespace cpharness::cli
