// File names built from user-given text (case ids, check names): never a path. Every character outside
// [A-Za-z0-9._-] becomes '_', a leading '.' too (no "..", no hidden files), and the name is cut to 100 characters,
// so a file named after "../../escape" stays in the directory it is written to.
#pragma once
#include <string>

namespace cpharness::io {

inline std::string safe_file_name(const std::string& text) {
  std::string out;
  for (char ch : text.substr(0, 100)) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                    ch == '_' || (ch == '.' && !out.empty());
    out += ok ? ch : '_';
  }
  return out.empty() ? std::string("_") : out;
}

}  // namespace cpharness::io
