// JSON input files (cases, transformers config.json, a golden's stored config) read strictly. nlohmann keeps the
// last of two equal keys in one object without a word, so {"steps": 1, ..., "steps": 3} ran 3 steps: a file that
// says two things is refused, naming the key, rather than read as one of them. Parse errors (numbers out of range
// too) and nesting past kMaxJsonDepth are input errors as well.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <exception>
#include <istream>
#include <string>

namespace cpharness::io {

// The JSON value of `in` / `text`, else an InputError naming `file` and, for a key given twice, its path
// (`key_prefix` + "model.sliding_window", "per_layer_config[2].head_dim"); `what` names the document otherwise.
nlohmann::json parse_input_json(std::istream& in, const std::string& file, const std::string& what,
                                const std::string& key_prefix = "");
nlohmann::json parse_input_json(const std::string& text, const std::string& file, const std::string& what,
                                const std::string& key_prefix = "");

// A JSON integer `v` as int64: past 2^63 one arrives unsigned and would wrap to a negative value; it is an
// InputError(file, field, "... is out of range") instead.
int64_t json_int64(const nlohmann::json& v, const std::string& file, const std::string& field);

// A JSON library error without the library's "[json.exception.parse_error.101] " tag: what is wrong, and where.
std::string json_error_text(const std::exception& e);

}  // namespace cpharness::io
