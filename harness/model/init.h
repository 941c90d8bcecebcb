// Seeded deterministic initialisation: every tensor is drawn from its own generator seeded by (seed, name), so
// the weights are identical on every rank, in every process and whatever the order of construction.
#pragma once
#include <cstdint>

#include "harness/model/gemma4.h"

namespace cpharness::model {

// Linear weights ~ N(0, 1/fan_in) (activations stay O(1) at tiny widths, so masks and gradients matter);
// embed_tokens ~ N(0, 1/H) (scaled by sqrt(H) on lookup, tied to the LM head); the per-layer table ~ N(0, 1); norm weights 1 + 0.1·N(0, 1) (so a norm that ignores or offsets its weight shows);
// q_norm/k_norm weights d^(-1/4)·(1 + 0.1·N(0, 1)) (attention scale is 1.0: O(1) scores keep the tiny models well
// conditioned); layer_scalar 1 + 0.1·N(0, 1) (so code that assumes 1.0 shows).
void init_weights(Gemma4Model& model, uint64_t seed);

}  // namespace cpharness::model
