// The cpharness verbs. Each returns the process exit code: 0 pass, 1 a check failed, 2 usage or input error.
#pragma once
#include <string>
#include <vector>

namespace cpharness::cli {

int run_command(const std::vector<std::string>& args);
int list_command(const std::vector<std::string>& args);
int selftest_command(const std::vector<std::string>& args);
int golden_command(const std::vector<std::string>& args);
int compare_command(const std::vector<std::string>& args);
int bisect_command(const std::vector<std::string>& args);
// Dispatches argv (without the program name); maps io::InputError and usage errors to exit code 2.
int dispatch(const std::vector<std::string>& args);

}  // namespace cpharness::cli
