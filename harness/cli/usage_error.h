// A command line that cannot be carried out as given (exit 2, with the verb's usage).
#pragma once
#include <stdexcept>

namespace cpharness::cli {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace cpharness::cli
