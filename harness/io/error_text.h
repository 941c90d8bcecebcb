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

// `text` as one line (control characters such as a newline in a file name written as \n, \x01), cut after `max`
// characters.
inline std::string clip(const std::string& text, size_t max = 300) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  size_t used = 0;
  for (; used < text.size() && out.size() < max; ++used) {
    const unsigned char ch = static_cast<unsigned char>(text[used]);
    if (ch == '\n') out += "\\n";
    else if (ch == '\r') out += "\\r";
    else if (ch == '\t') out += "\\t";
    else if (ch < 0x20 || ch == 0x7f) out += std::string("\\x") + hex[ch >> 4] + hex[ch & 15];
    else out += char(ch);
  }
  if (used < text.size()) out += "... (" + std::to_string(text.size() - used) + " more characters)";
  return out;
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
