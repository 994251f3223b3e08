// The seven optimizers, written as one small family over LibTorch tensors.
//
// LibTorch's C++ API lacks Adadelta, Adamax and NAdam, and its own optimizers keep state
// in per-class structs that would each need their own checkpoint code. Here every
// optimizer keeps named state tensors per parameter plus a step count, so checkpoints save
// and restore all seven the same way. Each update follows torch.optim's single-tensor
// implementation with its default hyper-parameters (checked against it in the tests).
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dicebox/genome.h"

namespace dicebox {

class Optimizer {
 public:
  Optimizer(std::vector<torch::Tensor> params, double lr);
  virtual ~Optimizer() = default;

  // One update from the gradients in params[i].grad(); parameters without a gradient are skipped.
  void step();
  void zero_grad();

  double learning_rate() const { return lr_; }
  int64_t steps() const { return steps_; }
  const std::vector<torch::Tensor>& params() const { return params_; }

  // State for checkpoints: "{param index}.{name}" -> tensor, and the step count.
  std::map<std::string, torch::Tensor> state_dict() const;
  void load_state_dict(const std::map<std::string, torch::Tensor>& state, int64_t steps);

 protected:
  // Updates params_[i] in place from `grad`; `state` holds this parameter's named tensors,
  // created lazily (zeros_like) on the first step. `step` counts from 1.
  virtual void update(torch::Tensor& param, const torch::Tensor& grad,
                      std::map<std::string, torch::Tensor>& state, int64_t step) = 0;
  // Zero-initialised state tensor `name` for `param`, created on first use.
  static torch::Tensor& state_of(std::map<std::string, torch::Tensor>& state,
                                 const std::string& name, const torch::Tensor& param);

  std::vector<torch::Tensor> params_;
  std::vector<std::map<std::string, torch::Tensor>> state_;
  double lr_;
  int64_t steps_ = 0;
};

std::unique_ptr<Optimizer> make_optimizer(OptimizerName name, std::vector<torch::Tensor> params,
                                          double lr);

}  // namespace dicebox
