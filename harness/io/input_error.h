// Bad user input (a malformed case or config, a corrupt checkpoint or golden): the CLI maps it to exit code 2.
#pragma once
#include <stdexcept>
#include <string>

namespace cpharness::io {

class InputError : public std::runtime_error {
 public:
  // "FILE: WHAT: REASON", e.g. "cases/a.json: model.preset: unknown preset 'e3b'".
  InputError(const std::string& file, const std::string& what, const std::string& reason)
      : std::runtime_error(file + ": " + what + ": " + reason) {}
  explicit InputError(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace cpharness::io
