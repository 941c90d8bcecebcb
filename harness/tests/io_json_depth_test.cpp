// io::json_depth: the nesting of a parsed input value, measured without recursion (a copy of a value nested
// 100000 deep overflows the stack; measuring it must not).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "harness/io/json_depth.h"

namespace cpharness::io {
namespace {

using json = nlohmann::json;

TEST(JsonDepth, CountsEveryLevelOfArraysAndObjects) {
  EXPECT_EQ(json_depth(json::parse("1")), 0);
  EXPECT_EQ(json_depth(json::parse("[]")), 1);
  EXPECT_EQ(json_depth(json::parse(R"({"a": [1, {"b": [2]}], "c": 3})")), 4);
  EXPECT_NO_THROW(require_json_depth(json::parse(std::string(kMaxJsonDepth, '[') + std::string(kMaxJsonDepth, ']')), "f.json", "case"));
}

TEST(JsonDepth, AValueNested100000DeepIsRefusedWithoutRecursing) {
  const int depth = 100000;
  const auto deep = json::parse("{\"model\": " + std::string(depth, '[') + std::string(depth, ']') + "}");
  EXPECT_EQ(json_depth(deep), kMaxJsonDepth + 1);  // counted no further than needed
  EXPECT_EQ(json_depth(deep, depth + 10), depth + 1);
  try {
    require_json_depth(deep, "deep.json", "case");
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), "deep.json");
    EXPECT_NE(std::string(e.what()).find("nested more than 64 levels deep"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace cpharness::io
