// The network a genome builds: the plan's modules applied with LibTorch's functional ops.
// Parameters are plain tensors named as nn.Sequential would name them ("{i}.weight"), and
// the network owns its random generator (initialisation, dropout), so concurrent trainings
// in one process never share random state and a run is reproducible from its seed.
#pragma once
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dicebox/genome.h"

namespace dicebox {

class Network {
 public:
  Network(std::vector<ModuleSpec> plan, uint64_t seed);

  // Logits [N, classes] for normalised float32 images [N, C, H, W].
  torch::Tensor forward(const torch::Tensor& x);
  void set_training(bool on) { training_ = on; }
  // Moves the parameters (CPU or CUDA). Inputs are moved to this device in forward().
  void to(torch::Device device);
  torch::Device device() const { return device_; }

  const std::vector<ModuleSpec>& plan() const { return plan_; }
  std::vector<torch::Tensor> parameters() const;
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;
  // Copies values in place (keeps the tensors the optimizer holds). Names and shapes must
  // match; `what` names the source in the error.
  void load(const std::vector<std::pair<std::string, torch::Tensor>>& values, const std::string& what);
  std::vector<std::pair<std::string, torch::Tensor>> clone_parameters() const;

  at::Generator& generator() { return generator_; }

 private:
  struct Step {
    ModuleSpec spec;
    torch::Tensor weight, bias;
  };
  std::vector<ModuleSpec> plan_;
  std::vector<Step> steps_;
  at::Generator generator_;
  bool training_ = true;
  torch::Device device_ = torch::kCPU;
  // Convolutions run on channels-last (NHWC) tensors: oneDNN's CPU kernels are about 30%
  // faster that way than on NCHW. Values and names are unchanged; only the layout differs.
  bool channels_last_ = false;
};

// "cpu", "cuda", or "auto" (CUDA when this LibTorch build has it and a GPU is visible).
torch::Device resolve_device(const std::string& name);

torch::Tensor apply_activation(Activation activation, const torch::Tensor& x);

}  // namespace dicebox
