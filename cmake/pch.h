// Precompiled once and shared by every target: libtorch's headers dominate compile time.
#pragma once
#include <torch/torch.h>
