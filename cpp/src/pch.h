// Precompiled header for the core: LibTorch's headers dominate compile time.
#pragma once
#include <torch/torch.h>
