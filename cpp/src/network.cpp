// Genome plan -> tensors and forward pass (see network.h).
#include "network.h"

#include <torch/cuda.h>

#include "dicebox/errors.h"

namespace dicebox {

torch::Tensor apply_activation(Activation a, const torch::Tensor& x) {
  switch (a) {
    case Activation::Elu: return torch::elu(x);
    case Activation::Exponential: return torch::exp(x);
    case Activation::HardSigmoid: return torch::hardsigmoid(x);
    case Activation::Linear: return x;
    case Activation::Relu: return torch::relu(x);
    case Activation::Selu: return torch::selu(x);
    case Activation::Sigmoid: return torch::sigmoid(x);
    case Activation::Softmax: return torch::softmax(x, 1);
    case Activation::Softplus: return torch::softplus(x);
    case Activation::Softsign: return x / (x.abs() + 1);
    case Activation::Swish: return torch::silu(x);
    case Activation::Tanh: return torch::tanh(x);
  }
  return x;
}

Network::Network(std::vector<ModuleSpec> plan, uint64_t seed)
    : plan_(std::move(plan)), generator_(at::make_generator<at::CPUGeneratorImpl>(seed)) {
  torch::NoGradGuard no_grad;
  for (const auto& spec : plan_) {
    Step step{spec, {}, {}};
    // PyTorch's default initialisation for Linear and Conv2d (kaiming_uniform with a=sqrt(5)
    // for weights, the same bound for biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    auto init = [&](std::vector<int64_t> shape, int64_t fan_in) {
      double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      return torch::empty(shape, torch::kFloat32).uniform_(-bound, bound, generator_);
    };
    if (spec.kind == ModuleSpec::Kind::Linear) {
      step.weight = init({spec.out, spec.in}, spec.in);
      step.bias = init({spec.out}, spec.in);
    } else if (spec.kind == ModuleSpec::Kind::Conv2d) {
      int64_t fan_in = spec.in * spec.kernel[0] * spec.kernel[1];
      step.weight = init({spec.out, spec.in, spec.kernel[0], spec.kernel[1]}, fan_in)
                        .contiguous(at::MemoryFormat::ChannelsLast);
      step.bias = init({spec.out}, fan_in);
      channels_last_ = true;
    }
    if (step.weight.defined()) {
      step.weight.set_requires_grad(true);
      step.bias.set_requires_grad(true);
    }
    steps_.push_back(std::move(step));
  }
}

torch::Device resolve_device(const std::string& name) {
  const bool cuda = torch::cuda::is_available();
  if (name == "cpu") return torch::kCPU;
  if (name == "auto") return cuda ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  if (name == "cuda") {
    if (!cuda) throw InvalidArgument("device: 'cuda' was asked for, but this LibTorch build has no CUDA or no GPU is visible");
    return torch::kCUDA;
  }
  throw InvalidArgument("device: unknown device '" + name + "' (accepted: auto, cpu, cuda)");
}

void Network::to(torch::Device device) {
  torch::NoGradGuard no_grad;
  for (auto& s : steps_)
    if (s.weight.defined()) {
      s.weight = s.weight.to(device).detach().set_requires_grad(true);
      s.bias = s.bias.to(device).detach().set_requires_grad(true);
    }
  device_ = device;
}

torch::Tensor Network::forward(const torch::Tensor& input) {
  torch::Tensor x = input.to(device_);
  // Not x.contiguous(ChannelsLast): with one channel that returns x with NCHW strides,
  // and the first convolution and pooling would then pick the slower NCHW kernels.
  if (channels_last_) x = torch::empty_like(x, at::MemoryFormat::ChannelsLast).copy_(x);
  for (auto& s : steps_) {
    const ModuleSpec& m = s.spec;
    switch (m.kind) {
      case ModuleSpec::Kind::ZeroPad2d:
        x = torch::constant_pad_nd(x, {m.pad[0], m.pad[1], m.pad[2], m.pad[3]}, 0);
        break;
      case ModuleSpec::Kind::Conv2d:
        x = torch::conv2d(x, s.weight, s.bias, {m.stride[0], m.stride[1]}, {m.padding[0], m.padding[1]});
        break;
      case ModuleSpec::Kind::MaxPool2d:
        x = torch::max_pool2d(x, {m.kernel[0], m.kernel[1]}, {m.stride[0], m.stride[1]});
        break;
      case ModuleSpec::Kind::Dropout:
        if (training_ && m.rate > 0) {
          // The mask comes from the network's own CPU generator on every device, so a run
          // is reproducible from its seed and its checkpoint.
          // Same memory format as x: a mask in another layout would push every later
          // elementwise op and the pooling backward into layout conversions.
          auto mask = torch::empty_like(x, x.options().device(torch::kCPU), at::MemoryFormat::Preserve)
                          .bernoulli_(1.0 - m.rate, generator_)
                          .to(device_);
          x = x * mask * (1.0 / (1.0 - m.rate));
        }
        break;
      case ModuleSpec::Kind::Flatten:
        x = x.flatten(1);
        break;
      case ModuleSpec::Kind::Linear:
        x = torch::linear(x, s.weight, s.bias);
        break;
      case ModuleSpec::Kind::Activation:
        x = apply_activation(m.activation, x);
        break;
    }
  }
  return x;
}

std::vector<torch::Tensor> Network::parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& s : steps_)
    if (s.weight.defined()) {
      out.push_back(s.weight);
      out.push_back(s.bias);
    }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> Network::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < steps_.size(); ++i)
    if (steps_[i].weight.defined()) {
      out.emplace_back(std::to_string(i) + ".weight", steps_[i].weight);
      out.emplace_back(std::to_string(i) + ".bias", steps_[i].bias);
    }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> Network::clone_parameters() const {
  auto out = named_parameters();
  for (auto& [name, t] : out) t = t.detach().clone();
  return out;
}

void Network::load(const std::vector<std::pair<std::string, torch::Tensor>>& values, const std::string& what) {
  torch::NoGradGuard no_grad;
  auto mine = named_parameters();
  for (auto& [name, param] : mine) {
    const torch::Tensor* found = nullptr;
    for (const auto& [n, t] : values)
      if (n == name) found = &t;
    if (!found) throw InvalidArgument(what + ": has no tensor " + name);
    if (found->sizes() != param.sizes())
      throw InvalidArgument(what + ": tensor " + name + " has shape " + c10::str(found->sizes()) +
                            ", the network needs " + c10::str(param.sizes()));
    param.copy_(*found);
  }
}

}  // namespace dicebox
