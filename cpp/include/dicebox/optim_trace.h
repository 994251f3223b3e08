// A torch-free entry point into the optimizers, so the Python tests can compare every
// update against torch.optim through the bindings without the bindings including torch.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dicebox {

// Runs optimizer `name` (as parse_optimizer accepts it) with learning rate `lr` on one
// float32 parameter of n = init.size() values starting at `init`. Step s uses the gradient
// grads[s*n, s*n + n). Returns the parameter after every step, flattened [steps, n].
// Throws InvalidArgument for an unknown name, a bad lr, steps < 0 or
// grads.size() != steps * n.
std::vector<float> optimizer_trace(const std::string& name, double lr,
                                   const std::vector<float>& init,
                                   const std::vector<float>& grads, int64_t steps);

}  // namespace dicebox
