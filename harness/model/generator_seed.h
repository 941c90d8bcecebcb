// libtorch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so seeds 0, 2^32 and 2^63 drew the
// same weights and batches. A case seed may be any 64-bit value: its high half is folded into the low one. Seeds
// below 2^32 are unchanged (every committed golden keeps its numbers).
#pragma once

#include <cstdint>

namespace cpharness::model {

constexpr uint64_t generator_seed(uint64_t seed) { return seed ^ (seed >> 32); }

}  // namespace cpharness::model
