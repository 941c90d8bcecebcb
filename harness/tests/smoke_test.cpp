#include <gtest/gtest.h>
TEST(HarnessSmoke, TorchLinks) { EXPECT_EQ(torch::ones({2}).sum().item<float>(), 2.0f); }
