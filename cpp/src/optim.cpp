// The seven optimizers: the shared step/checkpoint machinery and one update() each.
//
// Every update repeats torch.optim's single-tensor (foreach=False) code with its default
// hyper-parameters, op for op and with the scalar arithmetic in double in the same order,
// so that results agree with PyTorch to the last bit on the same machine, not merely
// approximately. Keep it that way when editing: rewriting `a / b * c` as `a * (c / b)`, or
// pow(x, 0.5) as sqrt(x), is enough to break the comparison tests.
#include "optim.h"

#include <charconv>
#include <cmath>
#include <optional>
#include <sstream>
#include <utility>

#include "dicebox/errors.h"
#include "dicebox/optim_trace.h"

namespace dicebox {
namespace {

// NAdam's running product of momentum coefficients is one float32 scalar per parameter,
// kept on the CPU like torch.optim keeps it, unlike every other state tensor, which has
// the parameter's shape.
const std::string kMuProduct = "mu_product";

std::string format_number(double value) {
  std::ostringstream out;
  out.precision(17);
  out << value;
  return out.str();
}

// "{index}.{name}" -> (index, name); nullopt when the key has another form.
std::optional<std::pair<size_t, std::string>> split_state_key(const std::string& key) {
  const auto dot = key.find('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == key.size()) return std::nullopt;
  size_t index = 0;
  const auto [end, ec] = std::from_chars(key.data(), key.data() + dot, index);
  if (ec != std::errc() || end != key.data() + dot) return std::nullopt;
  return std::make_pair(index, key.substr(dot + 1));
}

class Sgd final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>&, int64_t) override {
    param.add_(grad, -lr_);
  }
};

class Adam final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>& state, int64_t step) override {
    constexpr double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    auto& exp_avg = state_of(state, "exp_avg", param);
    auto& exp_avg_sq = state_of(state, "exp_avg_sq", param);
    exp_avg.lerp_(grad, 1 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double t = static_cast<double>(step);
    const double bias_correction1 = 1 - std::pow(beta1, t);
    const double bias_correction2 = 1 - std::pow(beta2, t);
    const double step_size = lr_ / bias_correction1;
    // torch writes bias_correction2**0.5, which is pow(), not sqrt().
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    const auto denom = exp_avg_sq.sqrt().div(bias_correction2_sqrt).add_(eps);
    param.addcdiv_(exp_avg, denom, -step_size);
  }
};

class Adamax final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>& state, int64_t step) override {
    constexpr double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    auto& exp_avg = state_of(state, "exp_avg", param);
    auto& exp_inf = state_of(state, "exp_inf", param);
    exp_avg.lerp_(grad, 1 - beta1);
    exp_inf.mul_(beta2);
    torch::maximum_out(exp_inf, exp_inf, grad.abs().add_(eps));
    const double bias_correction = 1 - std::pow(beta1, static_cast<double>(step));
    const double clr = lr_ / bias_correction;
    param.addcdiv_(exp_avg, exp_inf, -clr);
  }
};

class Nadam final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>& state, int64_t step) override {
    constexpr double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, momentum_decay = 4e-3;
    auto& exp_avg = state_of(state, "exp_avg", param);
    auto& exp_avg_sq = state_of(state, "exp_avg_sq", param);
    auto mu_product_it = state.find(kMuProduct);
    if (mu_product_it == state.end()) {
      mu_product_it = state.emplace(kMuProduct, torch::ones({}, torch::kFloat32)).first;
    }
    auto& mu_product = mu_product_it->second;

    const double t = static_cast<double>(step);
    const double bias_correction2 = 1 - std::pow(beta2, t);
    const double mu = beta1 * (1.0 - 0.5 * std::pow(0.96, t * momentum_decay));
    const double mu_next = beta1 * (1.0 - 0.5 * std::pow(0.96, (t + 1) * momentum_decay));
    // A float32 multiply, as torch does it on its float32 state tensor; the products
    // below then read it back as a double.
    mu_product.mul_(mu);
    const double mu_product_value = mu_product.item<double>();
    const double mu_product_next = mu_product_value * mu_next;

    exp_avg.lerp_(grad, 1 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    auto denom = exp_avg_sq.div(bias_correction2).sqrt();
    denom.add_(eps);
    param.addcdiv_(grad, denom, -lr_ * (1.0 - mu) / (1.0 - mu_product_value));
    param.addcdiv_(exp_avg, denom, (-lr_ * mu_next) / (1.0 - mu_product_next));
  }
};

class Adagrad final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>& state, int64_t) override {
    // With lr_decay 0, torch's clr = lr / (1 + (step - 1) * lr_decay) is lr exactly.
    constexpr double eps = 1e-10;
    auto& sum = state_of(state, "sum", param);
    sum.addcmul_(grad, grad, 1);
    const auto denom = sum.sqrt().add_(eps);
    param.addcdiv_(grad, denom, -lr_);
  }
};

class Adadelta final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>& state, int64_t) override {
    constexpr double rho = 0.9, eps = 1e-6;
    auto& square_avg = state_of(state, "square_avg", param);
    auto& acc_delta = state_of(state, "acc_delta", param);
    square_avg.mul_(rho).addcmul_(grad, grad, 1 - rho);
    const auto root_square_avg = square_avg.add(eps).sqrt_();
    auto delta = acc_delta.add(eps).sqrt_();
    delta.div_(root_square_avg).mul_(grad);
    acc_delta.mul_(rho).addcmul_(delta, delta, 1 - rho);
    param.add_(delta, -lr_);
  }
};

class Rmsprop final : public Optimizer {
 public:
  using Optimizer::Optimizer;

 protected:
  void update(torch::Tensor& param, const torch::Tensor& grad,
              std::map<std::string, torch::Tensor>& state, int64_t) override {
    constexpr double alpha = 0.99, eps = 1e-8;
    auto& square_avg = state_of(state, "square_avg", param);
    square_avg.mul_(alpha).addcmul_(grad, grad, 1 - alpha);
    const auto avg = square_avg.sqrt().add_(eps);
    param.addcdiv_(grad, avg, -lr_);
  }
};

}  // namespace

Optimizer::Optimizer(std::vector<torch::Tensor> params, double lr)
    : params_(std::move(params)), state_(params_.size()), lr_(lr) {
  if (!std::isfinite(lr) || lr <= 0) {
    throw InvalidArgument("optimizer.learning_rate: must be a finite number > 0, got " +
                          format_number(lr));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!params_[i].defined()) {
      throw InvalidArgument("optimizer.params: parameter " + std::to_string(i) +
                            " is undefined");
    }
  }
}

void Optimizer::step() {
  torch::NoGradGuard no_grad;
  ++steps_;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& grad = params_[i].grad();
    if (!grad.defined()) continue;
    update(params_[i], grad, state_[i], steps_);
  }
}

// Like torch.optim's default (set_to_none=True): a parameter that gets no gradient before
// the next step() is then skipped, not moved by its momentum.
void Optimizer::zero_grad() {
  for (auto& param : params_) param.mutable_grad().reset();
}

std::map<std::string, torch::Tensor> Optimizer::state_dict() const {
  // Copies, so a checkpoint written later is not changed by the steps taken meanwhile.
  std::map<std::string, torch::Tensor> out;
  for (size_t i = 0; i < state_.size(); ++i) {
    for (const auto& [name, tensor] : state_[i]) {
      out.emplace(std::to_string(i) + "." + name, tensor.detach().clone());
    }
  }
  return out;
}

void Optimizer::load_state_dict(const std::map<std::string, torch::Tensor>& state,
                                int64_t steps) {
  if (steps < 0) {
    throw InvalidArgument("optimizer.steps: must be >= 0, got " + std::to_string(steps));
  }
  // Everything is checked before anything is replaced, so a refused checkpoint leaves the
  // optimizer as it was.
  std::vector<std::map<std::string, torch::Tensor>> loaded(params_.size());
  for (const auto& [key, tensor] : state) {
    const auto parsed = split_state_key(key);
    if (!parsed || parsed->first >= params_.size()) {
      throw InvalidArgument("optimizer.state: key '" + key +
                            "' is not '{parameter index}.{name}' for one of the " +
                            std::to_string(params_.size()) + " parameters");
    }
    const auto& [index, name] = *parsed;
    if (!tensor.defined()) {
      throw InvalidArgument("optimizer.state: '" + key + "' is undefined");
    }
    const auto& param = params_[index];
    const bool scalar = name == kMuProduct;
    if (scalar ? tensor.dim() != 0 : tensor.sizes() != param.sizes()) {
      std::ostringstream message;
      message << "optimizer.state: '" << key << "' has shape " << tensor.sizes()
              << ", expected " << (scalar ? torch::IntArrayRef{} : param.sizes());
      throw InvalidArgument(message.str());
    }
    loaded[index].emplace(
        name, scalar ? tensor.detach().to(torch::kCPU, torch::kFloat32, false, true)
                     : tensor.detach().to(param.device(), param.scalar_type(), false, true));
  }
  state_ = std::move(loaded);
  steps_ = steps;
}

torch::Tensor& Optimizer::state_of(std::map<std::string, torch::Tensor>& state,
                                   const std::string& name, const torch::Tensor& param) {
  auto it = state.find(name);
  if (it == state.end()) it = state.emplace(name, torch::zeros_like(param)).first;
  return it->second;
}

std::unique_ptr<Optimizer> make_optimizer(OptimizerName name, std::vector<torch::Tensor> params,
                                          double lr) {
  switch (name) {
    case OptimizerName::Adadelta: return std::make_unique<Adadelta>(std::move(params), lr);
    case OptimizerName::Adagrad: return std::make_unique<Adagrad>(std::move(params), lr);
    case OptimizerName::Adam: return std::make_unique<Adam>(std::move(params), lr);
    case OptimizerName::Adamax: return std::make_unique<Adamax>(std::move(params), lr);
    case OptimizerName::Nadam: return std::make_unique<Nadam>(std::move(params), lr);
    case OptimizerName::Rmsprop: return std::make_unique<Rmsprop>(std::move(params), lr);
    case OptimizerName::Sgd: return std::make_unique<Sgd>(std::move(params), lr);
  }
  throw InvalidArgument("optimizer: unknown optimizer " +
                        std::to_string(static_cast<int>(name)));
}

std::vector<float> optimizer_trace(const std::string& name, double lr,
                                   const std::vector<float>& init,
                                   const std::vector<float>& grads, int64_t steps) {
  const auto n = static_cast<int64_t>(init.size());
  if (steps < 0) {
    throw InvalidArgument("optimizer_trace.steps: must be >= 0, got " + std::to_string(steps));
  }
  // Compared by division: steps * n could overflow for a bad `steps`.
  const auto total = static_cast<int64_t>(grads.size());
  if (n == 0 ? total != 0 : (total % n != 0 || total / n != steps)) {
    throw InvalidArgument("optimizer_trace.grads: expected steps * n = " +
                          std::to_string(steps) + " * " + std::to_string(n) +
                          " values, got " + std::to_string(total));
  }
  const auto kind = parse_optimizer(name, "optimizer");
  // from_blob only borrows the caller's memory (and wants it non-const): clone at once.
  auto param = torch::from_blob(const_cast<float*>(init.data()), {n}, torch::kFloat32)
                   .clone()
                   .requires_grad_(true);
  auto optimizer = make_optimizer(kind, {param}, lr);

  std::vector<float> trace;
  trace.reserve(grads.size());
  for (int64_t s = 0; s < steps; ++s) {
    param.mutable_grad() =
        torch::from_blob(const_cast<float*>(grads.data() + s * n), {n}, torch::kFloat32)
            .clone();
    optimizer->step();
    const float* values = param.data_ptr<float>();
    trace.insert(trace.end(), values, values + n);
  }
  return trace;
}

}  // namespace dicebox
