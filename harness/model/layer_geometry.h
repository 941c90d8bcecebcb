// The attention geometry of one decoder layer (causal; sliding window or full; vision groups bidirectional where the
// configuration's VisionMask opens them), the one place the model and the checks derive it from the configuration.
#pragma once
#include "harness/model/config.h"
#include "kernels/mask_spec.h"

namespace cpharness::model {

inline kernels::LayerGeometry layer_geometry(const ModelConfig& c, int64_t layer) {
  kernels::LayerGeometry g{true, c.layer_window(layer), c.layer_vision_bidirectional(layer)};
  // Only a window can be seen past: a full layer's group term is the same under every rule.
  g.vision_group_past_window = g.vision_bidirectional && g.window && c.vision_mask != VisionMask::kGroupInsideWindow;
  return g;
}

}  // namespace cpharness::model
