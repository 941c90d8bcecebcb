#include "kernels/dense_mask.h"

#include <gtest/gtest.h>

namespace cpharness::kernels {
namespace {

TEST(DenseMask, SlidingWindowKeepsWKeysIncludingSelf) {
  // W = 3: query 5 sees keys 3, 4, 5 and nothing earlier (q - k < W, strict).
  auto m = dense_mask(TokenMetadata{}, LayerGeometry{true, 3, false}, 1, 8);
  EXPECT_TRUE(m[0][5][3].item<bool>());
  EXPECT_TRUE(m[0][5][5].item<bool>());
  EXPECT_FALSE(m[0][5][2].item<bool>());
  EXPECT_FALSE(m[0][5][6].item<bool>());
  EXPECT_EQ(m[0][5].sum().item<int64_t>(), 3);
}

}  // namespace
}  // namespace cpharness::kernels
