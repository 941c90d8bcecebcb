// InputError: the error for bad user input (a missing, corrupt or inconsistent file, an unknown field).
// The CLI maps it to exit code 2 (usage/infra error). Its message always names the file, the thing inside
// it (field, tensor, dataset, group) and the reason: "FILE: WHAT: REASON" ("FILE: REASON" when WHAT is empty).
#pragma once

#include <stdexcept>
#include <string>

#include "harness/io/error_text.h"

namespace cpharness::io {

class InputError : public std::runtime_error {
 public:
  InputError(std::string file, std::string what, std::string reason)
      : std::runtime_error(format(file, what, reason)),
        file_(std::move(file)),
        subject_(std::move(what)),
        reason_(std::move(reason)) {}

  const std::string& file() const noexcept { return file_; }
  // The field, tensor, dataset or group the error is about; empty when it is about the whole file.
  const std::string& subject() const noexcept { return subject_; }
  const std::string& reason() const noexcept { return reason_; }

  // Each part is clipped to 300 characters: a hostile file cannot make a message (or a report) megabytes long.
  static std::string format(const std::string& file, const std::string& what, const std::string& reason) {
    std::string msg = file.empty() ? std::string("<no file>") : clip(file);
    if (!what.empty()) msg += ": " + clip(what);
    msg += ": " + clip(reason);
    return msg;
  }

 private:
  std::string file_;
  std::string subject_;
  std::string reason_;
};

}  // namespace cpharness::io
