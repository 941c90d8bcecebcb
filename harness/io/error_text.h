// Error text for people and reports: one line, no C++ backtrace, and never longer than a few hundred characters
// (a 10 MB key in a bad file is echoed as its first 300 characters and a count of the rest).
#pragma once
#include <c10/util/Exception.h>

#include <exception>
#include <string>

namespace cpharness::io {

inline std::string clip(const std::string& text, size_t max = 300) {
  if (text.size() <= max) return text;
  return text.substr(0, max) + "... (" + std::to_string(text.size() - max) + " more characters)";
}

// The exception's message: libtorch's without its backtrace, the first line only, clipped.
inline std::string one_line(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string text = c10_error ? c10_error->what_without_backtrace() : e.what();
  const auto eol = text.find('\n');
  if (eol != std::string::npos) text.resize(eol);
  return clip(text);
}

}  // namespace cpharness::io
