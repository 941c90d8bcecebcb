#include <gtest/gtest.h>
TEST(HarnessSmoke, TorchLinks) { EXPECT_EQ(torch::ones({2}).sum().item<float>(), 2.0f); }

// One intra-op thread for the whole test binary: ranks run as threads, and small ops only slow down with more
// threads on a 2-core machine.
static const bool kOneIntraOpThread = [] {
  torch::set_num_threads(1);
  return true;
}();
