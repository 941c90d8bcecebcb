// Error text for people and reports: one line, no C++ backtrace, and never longer than a few hundred characters
// (a 10 MB key in a bad file is echoed as its first 300 characters and a count of the rest).
#pragma once
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

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

// A tensor shape as messages write it: "[2, 3]".
inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// A JSON value from an input file, for an error message: scalars as written (clipped), arrays and objects by kind
// and size only. Never dump(): it recurses once per nesting level, and a hostile file nested 100000 deep would
// overflow the stack.
template <class Json>
std::string describe_json(const Json& v) {
  if (v.is_array()) return "an array of " + std::to_string(v.size()) + " elements";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " keys";
  return clip(v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

}  // namespace cpharness::io
