// io::parse_input_json: input JSON read strictly. A key given twice in one object is refused, named by its full
// path, wherever it sits (random documents, the duplicate planted at a random object and position); documents
// without one parse exactly as nlohmann parses them.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <random>
#include <sstream>

#include "harness/io/input_error.h"
#include "harness/io/json_input.h"

namespace cpharness::io {
namespace {

using json = nlohmann::json;

// A random document: objects with distinct keys from a small alphabet (so sibling and nested objects reuse names),
// arrays, and scalars.
json random_value(std::mt19937_64& rng, int depth) {
  const int kind = depth >= 4 ? 0 : int(rng() % 3);
  if (kind == 0) {
    switch (rng() % 4) {
      case 0: return int64_t(rng() % 1000) - 500;
      case 1: return double(rng() % 1000) / 7.0;
      case 2: return bool(rng() % 2);
      default: return std::string(1 + rng() % 3, char('a' + rng() % 3));
    }
  }
  if (kind == 1) {
    json a = json::array();
    for (size_t i = 0, n = rng() % 4; i < n; ++i) a.push_back(random_value(rng, depth + 1));
    return a;
  }
  json o = json::object();
  for (size_t i = 0, n = rng() % 4; i < n; ++i) o[std::string(1, char('p' + rng() % 5))] = random_value(rng, depth + 1);
  return o;
}

// Every non-empty object's path ("" for the root, "a.b[2]" inside).
void object_paths(const json& v, const std::string& path, std::vector<std::string>& out) {
  if (v.is_object()) {
    if (!v.empty()) out.push_back(path);
    for (auto it = v.begin(); it != v.end(); ++it) object_paths(it.value(), path + (path.empty() ? "" : ".") + it.key(), out);
  } else if (v.is_array()) {
    for (size_t i = 0; i < v.size(); ++i) object_paths(v[i], path + "[" + std::to_string(i) + "]", out);
  }
}

// `v` as text, with the object at `target` given one of its keys a second time (with another value), before or
// after the original.
std::string with_duplicate(const json& v, const std::string& path, const std::string& target, std::mt19937_64& rng,
                           std::string& duplicated_path) {
  if (v.is_array()) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i)
      s += (i ? ", " : "") + with_duplicate(v[i], path + "[" + std::to_string(i) + "]", target, rng, duplicated_path);
    return s + "]";
  }
  if (!v.is_object()) return v.dump();
  std::vector<std::string> pairs;
  for (auto it = v.begin(); it != v.end(); ++it) {
    const std::string child = path + (path.empty() ? "" : ".") + it.key();
    pairs.push_back(json(it.key()).dump() + ": " + with_duplicate(it.value(), child, target, rng, duplicated_path));
  }
  if (path == target) {
    auto it = v.begin();
    std::advance(it, rng() % v.size());
    duplicated_path = path + (path.empty() ? "" : ".") + it.key();
    pairs.insert(pairs.begin() + long(rng() % (pairs.size() + 1)), json(it.key()).dump() + ": 12345");
  }
  std::string s = "{";
  for (size_t i = 0; i < pairs.size(); ++i) s += (i ? ", " : "") + pairs[i];
  return s + "}";
}

TEST(JsonInput, AKeyGivenTwiceIsNamedByItsPath_500Documents) {
  std::mt19937_64 rng(20261206);
  int planted = 0;
  for (int trial = 0; trial < 500; ++trial) {
    SCOPED_TRACE(trial);
    json doc = json::object();
    doc["model"] = random_value(rng, 1);
    doc["data"] = random_value(rng, 1);
    const std::string text = doc.dump(rng() % 2 ? 2 : -1);
    EXPECT_EQ(parse_input_json(text, "c.json", "case"), json::parse(text));
    std::istringstream stream(text);
    EXPECT_EQ(parse_input_json(stream, "c.json", "case"), doc);

    std::vector<std::string> targets;
    object_paths(doc, "", targets);
    const auto target = targets[rng() % targets.size()];
    std::string expected;
    const auto bad = with_duplicate(doc, "", target, rng, expected);
    ASSERT_FALSE(expected.empty());
    ++planted;
    try {
      parse_input_json(bad, "c.json", "case", "prefix: ");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const InputError& e) {
      EXPECT_EQ(e.file(), "c.json");
      EXPECT_EQ(e.subject(), "prefix: " + expected) << bad;
      EXPECT_NE(e.reason().find("given twice"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(planted, 500);
}

TEST(JsonInput, EqualKeysInDifferentObjectsAreFine) {
  const auto j = parse_input_json(R"({"a": {"x": 1}, "b": {"x": 2}, "c": [{"x": 3}, {"x": 4}], "x": 5})", "f.json", "case");
  EXPECT_EQ(j["c"][1]["x"], 4);
}

TEST(JsonInput, MalformedTextOutOfRangeNumbersAndDeepNestingAreInputErrors) {
  for (const std::string text : {std::string("{\"a\": "), std::string("{\"a\": 1e400}"),
                                 std::string(100000, '[') + std::string(100000, ']')}) {
    try {
      parse_input_json(text, "f.json", "case");
      ADD_FAILURE() << "accepted " << text.substr(0, 20);
    } catch (const InputError& e) {
      EXPECT_EQ(e.file(), "f.json");
      EXPECT_EQ(e.subject(), "case");
    }
  }
}

}  // namespace
}  // namespace cpharness::io
