// Tests of the seven optimizers: every step against numbers produced by torch.optim,
// checkpoint round trips, parameters without a gradient, and refused arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "dicebox/errors.h"
#include "dicebox/optim_trace.h"
#include "optim.h"

namespace dicebox {
namespace {

const std::vector<OptimizerName> kAllOptimizers = {
    OptimizerName::Adadelta, OptimizerName::Adagrad, OptimizerName::Adam,
    OptimizerName::Adamax,   OptimizerName::Nadam,   OptimizerName::Rmsprop,
    OptimizerName::Sgd};

// The golden values below come from torch 2.13.0 on CPU, by this snippet:
//
//   import torch
//   init = [0.5, -1.0, 2.0, -0.25]
//   lrs = {"SGD": 0.1, "Adam": 0.05, "Adamax": 0.1, "NAdam": 0.1, "Adagrad": 0.1,
//          "Adadelta": 1.0, "RMSprop": 0.01}
//   for cls, lr in lrs.items():
//       p = torch.tensor(init, requires_grad=True)
//       opt = getattr(torch.optim, cls)([p], lr=lr, foreach=False)
//       for s in range(10):
//           p.grad = torch.tensor([((s * 7 + j * 3) % 11 - 5) * 0.25 for j in range(4)])
//           opt.step()
//           print(", ".join(f"{v:.9g}f" for v in p.tolist()))
//
// The gradients are multiples of 0.25 (zeros included), exact in float32 on both sides.
const std::vector<float> kGoldenInit = {0.5f, -1.0f, 2.0f, -0.25f};
constexpr int64_t kGoldenSteps = 10;

std::vector<float> golden_grads() {
  std::vector<float> grads;
  for (int64_t s = 0; s < kGoldenSteps; ++s) {
    for (int64_t j = 0; j < 4; ++j) {
      grads.push_back(static_cast<float>((s * 7 + j * 3) % 11 - 5) * 0.25f);
    }
  }
  return grads;
}

struct Golden {
  std::string name;
  double lr;
  std::vector<float> trace;  // parameter after each step, [10, 4]
};

std::vector<Golden> goldens() {
  return {
      {"sgd", 0.1,
       {0.625f, -0.949999988f, 1.97500002f, -0.349999994f,
        0.574999988f, -1.07500005f, 2.04999995f, -0.349999994f,
        0.625f, -1.10000002f, 1.94999993f, -0.25f,
        0.5f, -1.02499998f, 1.94999993f, -0.324999988f,
        0.474999994f, -1.125f, 2.04999995f, -0.299999982f,
        0.550000012f, -1.125f, 1.9749999f, -0.174999982f,
        0.450000018f, -1.02499998f, 1.99999988f, -0.224999979f,
        0.450000018f, -1.10000002f, 2.125f, -0.174999982f,
        0.550000012f, -1.07500005f, 2.07500005f, -0.299999982f,
        0.475000024f, -0.950000048f, 2.125f, -0.324999988f}},
      {"adam", 0.05,
       {0.550000012f, -0.949999988f, 1.95000005f, -0.299999982f,
        0.567280293f, -0.972110748f, 1.97470951f, -0.333502889f,
        0.590930343f, -0.994749606f, 1.96148956f, -0.329209507f,
        0.58644402f, -0.997040629f, 1.95066059f, -0.339727372f,
        0.579129219f, -1.01339507f, 1.96030915f, -0.344296813f,
        0.582769811f, -1.02749038f, 1.95687604f, -0.331448704f,
        0.574561357f, -1.02628267f, 1.95742333f, -0.326568663f,
        0.567325115f, -1.03360868f, 1.97196269f, -0.316648006f,
        0.57123661f, -1.03735042f, 1.97910583f, -0.321266413f,
        0.567602336f, -1.02848005f, 1.99059403f, -0.327783287f}},
      {"adamax", 0.1,
       {0.600000024f, -0.899999976f, 1.89999998f, -0.349999994f,
        0.626342177f, -0.93368417f, 1.93684208f, -0.397415847f,
        0.657770336f, -0.962347507f, 1.91737711f, -0.390404791f,
        0.650936961f, -0.96521455f, 1.90355837f, -0.407257944f,
        0.64087832f, -0.986977875f, 1.91754401f, -0.413891315f,
        0.645789325f, -1.00411367f, 1.91253328f, -0.396715075f,
        0.634382486f, -1.00256741f, 1.91328061f, -0.390492141f,
        0.624969065f, -1.0118897f, 1.93133068f, -0.378319353f,
        0.630209446f, -1.01641023f, 1.93991303f, -0.38447848f,
        0.625382185f, -1.00485659f, 1.95333862f, -0.392770946f}},
      {"nadam", 0.1,
       {0.60564518f, -0.89435482f, 1.89435482f, -0.35564518f,
        0.572674453f, -0.98904413f, 1.99150169f, -0.361952275f,
        0.615185797f, -1.01393747f, 1.90596271f, -0.286767304f,
        0.538498282f, -0.959581137f, 1.90254509f, -0.343804479f,
        0.519471347f, -1.03319788f, 1.98340142f, -0.326178014f,
        0.570411026f, -1.0391711f, 1.92493486f, -0.237826511f,
        0.502849519f, -0.96932894f, 1.94542921f, -0.270165503f,
        0.499132067f, -1.0253036f, 2.04155874f, -0.229115352f,
        0.567276955f, -1.00904083f, 2.00886273f, -0.314113796f,
        0.515203655f, -0.919462383f, 2.05329895f, -0.335230887f}},
      {"adagrad", 0.1,
       {0.600000024f, -0.899999976f, 1.89999998f, -0.349999994f,
        0.562860966f, -0.992847621f, 1.99486828f, -0.349999994f,
        0.597676516f, -1.01110506f, 1.91642177f, -0.279289305f,
        0.532023311f, -0.963066638f, 1.91642177f, -0.326141447f,
        0.519004405f, -1.01700258f, 1.9781431f, -0.310711116f,
        0.555384755f, -1.01700258f, 1.9361347f, -0.249626398f,
        0.511741161f, -0.969531298f, 1.95000219f, -0.273362041f,
        0.511741161f, -1.00307226f, 2.00698256f, -0.250268042f,
        0.551741183f, -0.991961122f, 1.98476028f, -0.300268054f,
        0.52300638f, -0.943396807f, 2.00645328f, -0.310218424f}},
      {"adadelta", 1.0,
       {0.503162265f, -0.996837795f, 1.99683797f, -0.253162265f,
        0.501424789f, -1.001019f, 2.00110173f, -0.253162265f,
        0.503203094f, -1.00218701f, 1.99621499f, -0.249922335f,
        0.499742746f, -0.999091804f, 1.99621499f, -0.252631605f,
        0.498876572f, -1.00293577f, 2.00107956f, -0.251608521f,
        0.501297295f, -1.00293577f, 1.99710846f, -0.247727513f,
        0.498216599f, -0.999075294f, 1.99857247f, -0.249582991f,
        0.498216599f, -1.00216973f, 2.00426555f, -0.247706726f,
        0.501334667f, -1.00105321f, 2.0015924f, -0.251692116f,
        0.498852253f, -0.996459126f, 2.0042789f, -0.252632439f}},
      {"rmsprop", 0.01,
       {0.599999964f, -0.900000036f, 1.9000001f, -0.349999994f,
        0.562699795f, -0.992911816f, 1.99491584f, -0.349999994f,
        0.597802341f, -1.0112704f, 1.91630304f, -0.278934896f,
        0.531655669f, -0.962841511f, 1.91630304f, -0.326154232f,
        0.518475652f, -1.01727962f, 1.97848892f, -0.310529441f,
        0.555405676f, -1.01727962f, 1.936046f, -0.248773515f,
        0.511051774f, -0.969095826f, 1.95012331f, -0.272868842f,
        0.511051774f, -1.00323379f, 2.00787497f, -0.249332428f,
        0.551937878f, -0.991871178f, 1.98525941f, -0.300235033f,
        0.522485793f, -0.942285836f, 2.00742364f, -0.310413688f}},
  };
}

class GoldenTest : public ::testing::TestWithParam<Golden> {};

TEST_P(GoldenTest, MatchesTorchOptimAtEveryStep) {
  const auto& golden = GetParam();
  const auto trace =
      optimizer_trace(golden.name, golden.lr, kGoldenInit, golden_grads(), kGoldenSteps);
  ASSERT_EQ(trace.size(), golden.trace.size());
  for (size_t k = 0; k < trace.size(); ++k) {
    EXPECT_NEAR(trace[k], golden.trace[k], 1e-5) << "step " << k / 4 + 1 << ", value " << k % 4;
  }
}

INSTANTIATE_TEST_SUITE_P(AllSeven, GoldenTest, ::testing::ValuesIn(goldens()),
                         [](const auto& info) { return info.param.name; });

// Two parameters of different shapes and a fixed random gradient for each step.
struct Problem {
  std::vector<torch::Tensor> start;
  std::vector<std::vector<torch::Tensor>> grads;  // [step][parameter]

  explicit Problem(int64_t steps) {
    torch::manual_seed(7);
    start = {torch::randn({3, 2}), torch::randn({2})};
    for (int64_t s = 0; s < steps; ++s) {
      grads.push_back({torch::randn({3, 2}), torch::randn({2})});
    }
  }

  std::vector<torch::Tensor> fresh_params() const {
    std::vector<torch::Tensor> params;
    for (const auto& p : start) params.push_back(p.clone().requires_grad_(true));
    return params;
  }
};

void run_steps(Optimizer& optimizer, const Problem& problem, int64_t from, int64_t to) {
  for (int64_t s = from; s < to; ++s) {
    for (size_t i = 0; i < optimizer.params().size(); ++i) {
      auto param = optimizer.params()[i];
      param.mutable_grad() = problem.grads[s][i].clone();
    }
    optimizer.step();
  }
}

TEST(Optimizer, StateDictRoundTripContinuesLikeAnUninterruptedRun) {
  const Problem problem(10);
  for (const auto name : kAllOptimizers) {
    SCOPED_TRACE(std::string(name_of(name)));
    auto uninterrupted = make_optimizer(name, problem.fresh_params(), 0.05);
    run_steps(*uninterrupted, problem, 0, 10);

    auto first = make_optimizer(name, problem.fresh_params(), 0.05);
    run_steps(*first, problem, 0, 4);
    const auto state = first->state_dict();
    std::vector<torch::Tensor> restored;
    for (const auto& p : first->params()) {
      restored.push_back(p.detach().clone().requires_grad_(true));
    }
    auto second = make_optimizer(name, restored, 0.05);
    second->load_state_dict(state, first->steps());
    EXPECT_EQ(second->steps(), 4);
    run_steps(*second, problem, 4, 10);

    for (size_t i = 0; i < restored.size(); ++i) {
      EXPECT_TRUE(torch::equal(second->params()[i], uninterrupted->params()[i])) << "param " << i;
    }
  }
}

TEST(Optimizer, StateDictHoldsCopiesKeyedByParameterIndex) {
  const Problem problem(2);
  auto optimizer = make_optimizer(OptimizerName::Adam, problem.fresh_params(), 0.1);
  run_steps(*optimizer, problem, 0, 1);
  auto state = optimizer->state_dict();
  std::vector<std::string> keys;
  for (const auto& [key, tensor] : state) keys.push_back(key);
  EXPECT_EQ(keys, (std::vector<std::string>{"0.exp_avg", "0.exp_avg_sq", "1.exp_avg",
                                            "1.exp_avg_sq"}));
  EXPECT_EQ(state.at("0.exp_avg").sizes(), torch::IntArrayRef({3, 2}));

  // Changing the returned tensors must not reach the optimizer.
  const auto before = optimizer->state_dict();
  for (auto& [key, tensor] : state) tensor.fill_(100);
  for (const auto& [key, tensor] : optimizer->state_dict()) {
    EXPECT_TRUE(torch::equal(tensor, before.at(key))) << key;
  }
}

TEST(Optimizer, NadamKeepsMuProductAsScalarFloat32State) {
  const Problem problem(3);
  auto optimizer = make_optimizer(OptimizerName::Nadam, problem.fresh_params(), 0.1);
  run_steps(*optimizer, problem, 0, 3);
  const auto state = optimizer->state_dict();
  ASSERT_TRUE(state.count("0.mu_product"));
  ASSERT_TRUE(state.count("1.mu_product"));
  const auto& mu_product = state.at("0.mu_product");
  EXPECT_EQ(mu_product.dim(), 0);
  EXPECT_EQ(mu_product.scalar_type(), torch::kFloat32);
  // mu_t = 0.9 * (1 - 0.5 * 0.96^(0.004 t)); after three steps the product of mu_1..mu_3.
  double expected = 1.0;
  for (int t = 1; t <= 3; ++t) expected *= 0.9 * (1.0 - 0.5 * std::pow(0.96, t * 4e-3));
  EXPECT_NEAR(mu_product.item<double>(), expected, 1e-6);
}

TEST(Optimizer, ParametersWithoutGradientAreUntouched) {
  for (const auto name : kAllOptimizers) {
    SCOPED_TRACE(std::string(name_of(name)));
    auto with_grad = torch::tensor({1.0f, -2.0f}).requires_grad_(true);
    auto without_grad = torch::tensor({3.0f, 4.0f, 5.0f}).requires_grad_(true);
    const auto untouched = without_grad.detach().clone();
    auto optimizer = make_optimizer(name, {with_grad, without_grad}, 0.5);
    for (int s = 0; s < 3; ++s) {
      with_grad.mutable_grad() = torch::tensor({0.5f, -1.0f});
      optimizer->step();
    }
    EXPECT_EQ(optimizer->steps(), 3);
    EXPECT_TRUE(torch::equal(without_grad, untouched));
    EXPECT_FALSE(torch::equal(with_grad, torch::tensor({1.0f, -2.0f})));
    for (const auto& [key, tensor] : optimizer->state_dict()) {
      EXPECT_EQ(key.rfind("0.", 0), 0u) << key << " is state for the parameter without grad";
    }
  }
}

TEST(Optimizer, ZeroGradDropsGradientsSoTheNextStepSkipsEverything) {
  const Problem problem(1);
  auto optimizer = make_optimizer(OptimizerName::Adam, problem.fresh_params(), 0.1);
  run_steps(*optimizer, problem, 0, 1);
  const auto after_one = optimizer->params()[0].detach().clone();
  optimizer->zero_grad();
  for (const auto& p : optimizer->params()) EXPECT_FALSE(p.grad().defined());
  // Adam's momentum would move the parameter on a zero gradient; no gradient means no move.
  optimizer->step();
  EXPECT_TRUE(torch::equal(optimizer->params()[0], after_one));
  EXPECT_EQ(optimizer->steps(), 2);
}

TEST(Optimizer, StepCountsOncePerStepAndSeparatesParameterState) {
  // Two parameters in one optimizer move exactly as each would alone.
  const Problem problem(5);
  for (const auto name : kAllOptimizers) {
    SCOPED_TRACE(std::string(name_of(name)));
    auto together = make_optimizer(name, problem.fresh_params(), 0.1);
    run_steps(*together, problem, 0, 5);
    EXPECT_EQ(together->steps(), 5);
    for (size_t i = 0; i < problem.start.size(); ++i) {
      auto alone = make_optimizer(name, {problem.start[i].clone().requires_grad_(true)}, 0.1);
      for (int64_t s = 0; s < 5; ++s) {
        alone->params()[0].mutable_grad() = problem.grads[s][i].clone();
        alone->step();
      }
      EXPECT_TRUE(torch::equal(alone->params()[0], together->params()[i])) << "param " << i;
    }
  }
}

void expect_invalid(const std::function<void()>& action, const std::string& field) {
  try {
    action();
    ADD_FAILURE() << "expected InvalidArgument naming " << field;
  } catch (const InvalidArgument& error) {
    EXPECT_NE(std::string(error.what()).find(field), std::string::npos) << error.what();
  }
}

TEST(Optimizer, RefusesLearningRatesThatAreNotFinitePositive) {
  const double inf = std::numeric_limits<double>::infinity();
  for (const double lr : {0.0, -0.001, -inf, inf, std::nan("")}) {
    SCOPED_TRACE(lr);
    for (const auto name : kAllOptimizers) {
      expect_invalid([&] { make_optimizer(name, {torch::zeros({2})}, lr); },
                     "optimizer.learning_rate");
    }
    expect_invalid([&] { optimizer_trace("adam", lr, {1.0f}, {1.0f}, 1); },
                   "optimizer.learning_rate");
  }
}

TEST(Optimizer, LoadStateDictRefusesMismatchesAndKeepsItsState) {
  const Problem problem(2);
  auto optimizer = make_optimizer(OptimizerName::Nadam, problem.fresh_params(), 0.1);
  run_steps(*optimizer, problem, 0, 2);
  const auto good = optimizer->state_dict();

  auto with = [&](const std::string& key, torch::Tensor tensor) {
    auto state = good;
    state[key] = tensor;
    return state;
  };
  expect_invalid([&] { optimizer->load_state_dict(with("0.exp_avg", torch::zeros({2, 3})), 2); },
                 "optimizer.state");
  expect_invalid([&] { optimizer->load_state_dict(with("1.exp_avg_sq", torch::zeros({3})), 2); },
                 "optimizer.state");
  expect_invalid([&] { optimizer->load_state_dict(with("0.mu_product", torch::ones({1})), 2); },
                 "optimizer.state");
  for (const std::string key : {"2.exp_avg", "x.exp_avg", "exp_avg", "0.", "-1.exp_avg"}) {
    expect_invalid([&] { optimizer->load_state_dict(with(key, torch::zeros({2})), 2); },
                   "optimizer.state");
  }
  expect_invalid([&] { optimizer->load_state_dict(good, -1); }, "optimizer.steps");

  EXPECT_EQ(optimizer->steps(), 2);
  const auto kept = optimizer->state_dict();
  ASSERT_EQ(kept.size(), good.size());
  for (const auto& [key, tensor] : good) EXPECT_TRUE(torch::equal(kept.at(key), tensor)) << key;
}

TEST(OptimizerTrace, RefusesBadArgumentsAndHandlesNoSteps) {
  expect_invalid([] { optimizer_trace("adamw", 0.1, {1.0f}, {1.0f}, 1); }, "optimizer");
  expect_invalid([] { optimizer_trace("sgd", 0.1, {1.0f, 2.0f}, {1.0f, 2.0f, 3.0f}, 2); },
                 "optimizer_trace.grads");
  expect_invalid([] { optimizer_trace("sgd", 0.1, {1.0f}, {}, -1); }, "optimizer_trace.steps");
  EXPECT_TRUE(optimizer_trace("sgd", 0.1, {1.0f, 2.0f}, {}, 0).empty());
  // Plain SGD is easy to check by hand: p - lr * g at each step.
  EXPECT_EQ(optimizer_trace("sgd", 0.5, {1.0f, 2.0f}, {2.0f, -2.0f, 1.0f, 0.0f}, 2),
            (std::vector<float>{0.0f, 3.0f, -0.5f, 3.0f}));
}

}  // namespace
}  // namespace dicebox
