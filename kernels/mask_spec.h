// What decides whether query token q may attend key token k: per-token metadata in global token index and
// the geometry of one attention layer. Shared by the model's eager attention, the block-mask builders and
// the ring; it knows nothing of any model.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <optional>

namespace cpharness::kernels {

// Per-token metadata for the whole (global) sequence or for one contiguous slice of it. Each tensor is
// [B, S] and may be undefined when the feature is absent.
struct TokenMetadata {
  torch::Tensor document_ids;      // int64, packed-document id, 1-based; 0 = pad. Undefined: one document.
  torch::Tensor padding;           // bool, true = padding token (never a key). Undefined: no padding.
  torch::Tensor vision_group_ids;  // int64, contiguous vision run id >= 0; -1 = text. Undefined: no vision.

  // The slice [start, start + length) on the sequence dimension, keeping undefined tensors undefined.
  TokenMetadata slice(int64_t start, int64_t length) const;
};

// The geometry of one attention layer.
struct LayerGeometry {
  bool causal = true;
  std::optional<int64_t> window;      // sliding window W: key allowed when q - k < W. nullopt: full layer.
  // Same vision group sees itself both ways. Models set it on the layers their rule names (Gemma4: sliding layers;
  // transformers 5.9 .. 5.12 also full ones); without a window it reads causal OR same group.
  bool vision_bidirectional = false;
  // How a vision group meets the window. false: (causal OR same group) AND window, as transformers >= 5.13
  // (create_masks_for_vision_model) and gemma4-spec 3.4. true: (causal AND window) OR same group, as 5.5 .. 5.12
  // built it, a group seeing itself at any distance.
  bool vision_group_past_window = false;

  bool operator==(const LayerGeometry& o) const {
    return causal == o.causal && window == o.window && vision_bidirectional == o.vision_bidirectional &&
           vision_group_past_window == o.vision_group_past_window;
  }
};

// A contiguous range of global token indices.
struct TokenRange {
  int64_t start = 0;
  int64_t length = 0;
  int64_t end() const { return start + length; }
};

}  // namespace cpharness::kernels
