// Genome parsing, canonical form, validation messages and the network plan.
#include <gtest/gtest.h>

#include "dicebox/errors.h"
#include "dicebox/genome.h"

using namespace dicebox;

namespace {

std::string error_of(const std::string& text) {
  try {
    Genome::from_json(text);
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

const char* kCnn = R"({"optimizer": {"name": "adam", "learning_rate": 0.001},
 "layers": [
   {"type": "conv2d", "filters": 32, "kernel": [3, 3], "stride": [1, 1], "padding": "same", "activation": "relu"},
   {"type": "maxpool2d", "kernel": [2, 2]},
   {"type": "dropout", "rate": 0.25},
   {"type": "dense", "size": 128, "activation": "relu"}]})";

}  // namespace

TEST(Genome, ParsesTheInterfaceExample) {
  Genome g = Genome::from_json(kCnn);
  EXPECT_EQ(g.optimizer, OptimizerName::Adam);
  ASSERT_EQ(g.layers.size(), 4u);
  EXPECT_EQ(g.layers[0].type, LayerType::Conv2d);
  EXPECT_EQ(g.layers[0].filters, 32);
  EXPECT_EQ(g.layers[1].stride, (std::array<int64_t, 2>{2, 2}));  // pooling stride defaults to the kernel
  EXPECT_DOUBLE_EQ(g.layers[2].rate, 0.25);
  EXPECT_EQ(g.layers[3].size, 128);
}

TEST(Genome, CanonicalJsonRoundTripsAndFillsDefaults) {
  Genome a = Genome::from_json(R"({"optimizer": "sgd", "layers": [{"type": "dense", "size": 10}]})");
  Genome b = Genome::from_json(a.to_json());
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.to_json(), b.to_json());
  EXPECT_NE(a.to_json().find("\"activation\":\"relu\""), std::string::npos);
  EXPECT_NE(a.to_json().find("\"learning_rate\":0.001"), std::string::npos);
}

TEST(Genome, SameNetworkWrittenTwoWaysHasOneCanonicalForm) {
  Genome a = Genome::from_json(R"({"optimizer": {"name": "adam"}, "layers": [{"type": "conv2d", "filters": 4, "kernel": 3}]})");
  Genome b = Genome::from_json(R"({"layers": [{"kernel": [3, 3], "filters": 4, "type": "conv2d", "stride": [1,1], "padding": "same", "activation": "relu"}], "optimizer": {"learning_rate": 0.001, "name": "adam"}})");
  EXPECT_EQ(a.to_json(), b.to_json());
}

TEST(Genome, ErrorsNameTheField) {
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": -3}]})").find("layers[0].size"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 8}, {"type": "lstm"}]})").find("layers[1].type"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 8, "activation": "gelu"}]})").find("layers[0].activation"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adamw", "layers": []})").find("optimizer"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": {"name": "adam", "learning_rate": -1}, "layers": []})").find("optimizer.learning_rate"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "dropout", "rate": 1.5}]})").find("layers[0].rate"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "conv2d", "filters": 0, "kernel": 3}]})").find("layers[0].filters"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 8, "units": 3}]})").find("layers[0].units"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam"})").find("layers"), std::string::npos);
  EXPECT_NE(error_of("{not json").find("not valid JSON"), std::string::npos);
}

TEST(Genome, ListsAcceptedValuesForUnknownNames) {
  std::string e = error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 8, "activation": "gelu"}]})");
  EXPECT_NE(e.find("hard_sigmoid"), std::string::npos);
  EXPECT_NE(e.find("swish"), std::string::npos);
}

TEST(Genome, RefusesConvAfterDense) {
  std::string e = error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 8}, {"type": "conv2d", "filters": 4, "kernel": 3}]})");
  EXPECT_NE(e.find("layers[1].type"), std::string::npos);
  EXPECT_NE(e.find("dense"), std::string::npos);
}

TEST(Genome, RefusesTooManyLayersAndNonIntegers) {
  std::string many = R"({"optimizer": "adam", "layers": [)";
  for (int i = 0; i < 65; ++i) many += std::string(i ? "," : "") + R"({"type": "dropout", "rate": 0.1})";
  many += "]}";
  EXPECT_NE(error_of(many).find("layers"), std::string::npos);
  EXPECT_NE(error_of(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 2.5}]})").find("layers[0].size"), std::string::npos);
}

TEST(Genome, AllTwelveActivationsAndSevenOptimizersParse) {
  EXPECT_EQ(all_activations().size(), 12u);
  EXPECT_EQ(all_optimizers().size(), 7u);
  for (auto a : all_activations())
    EXPECT_EQ(parse_activation(name_of(a), "x"), a);
  for (auto o : all_optimizers())
    EXPECT_EQ(parse_optimizer(name_of(o), "x"), o);
}

TEST(Plan, ImpliesFlattenAndOutputLayer) {
  auto plan = plan_network(Genome::from_json(kCnn), Shape{1, 28, 28}, 10);
  // conv, relu, pool, dropout, flatten, linear, relu, output linear
  ASSERT_EQ(plan.size(), 8u);
  EXPECT_EQ(plan[0].kind, ModuleSpec::Kind::Conv2d);
  EXPECT_EQ(plan[0].padding, (std::array<int64_t, 2>{1, 1}));
  EXPECT_EQ(plan[2].output, (Shape{32, 14, 14}));
  EXPECT_EQ(plan[4].kind, ModuleSpec::Kind::Flatten);
  EXPECT_EQ(plan[5].in, 32 * 14 * 14);
  EXPECT_EQ(plan.back().kind, ModuleSpec::Kind::Linear);
  EXPECT_EQ(plan.back().out, 10);
  EXPECT_EQ(plan.back().layer, -1);
}

TEST(Plan, EmptyGenomeIsALinearClassifier) {
  auto plan = plan_network(Genome::from_json(R"({"optimizer": "sgd", "layers": []})"), Shape{3, 4, 5}, 2);
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[1].in, 60);
}

TEST(Plan, EvenSamePaddingUsesAnExplicitPad) {
  auto plan = plan_network(Genome::from_json(R"({"optimizer": "adam", "layers": [{"type": "conv2d", "filters": 2, "kernel": [2, 4]}]})"),
                           Shape{1, 8, 8}, 3);
  ASSERT_EQ(plan[0].kind, ModuleSpec::Kind::ZeroPad2d);
  EXPECT_EQ(plan[0].pad, (std::array<int64_t, 4>{1, 2, 0, 1}));
  EXPECT_EQ(plan[1].output, (Shape{2, 8, 8}));
}

TEST(Plan, StridedSameConvGivesCeilSize) {
  auto plan = plan_network(Genome::from_json(R"({"optimizer": "adam", "layers": [{"type": "conv2d", "filters": 2, "kernel": 3, "stride": 2}]})"),
                           Shape{1, 7, 7}, 3);
  EXPECT_EQ(plan[0].output, (Shape{2, 4, 4}));
}

TEST(Plan, KernelLargerThanTheMapIsRefusedByName) {
  Genome g = Genome::from_json(R"({"optimizer": "adam", "layers": [
      {"type": "conv2d", "filters": 2, "kernel": 3, "padding": "valid"},
      {"type": "maxpool2d", "kernel": 2},
      {"type": "conv2d", "filters": 2, "kernel": 5}]})");
  try {
    plan_network(g, Shape{1, 8, 8}, 2);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("layers[2].kernel"), std::string::npos) << m;
    EXPECT_NE(m.find("3x3"), std::string::npos) << m;
  }
}

TEST(Plan, PoolingBelowOnePixelIsRefused) {
  Genome g = Genome::from_json(R"({"optimizer": "adam", "layers": [{"type": "maxpool2d", "kernel": 2}, {"type": "maxpool2d", "kernel": 2}]})");
  EXPECT_THROW(plan_network(g, Shape{1, 3, 3}, 2), InvalidArgument);
  EXPECT_NO_THROW(plan_network(g, Shape{1, 4, 4}, 2));
}

TEST(Plan, NeedsTwoCategories) {
  EXPECT_THROW(plan_network(Genome::from_json(kCnn), Shape{1, 28, 28}, 1), InvalidArgument);
}

TEST(Plan, LinearActivationAddsNoModule) {
  auto plan = plan_network(Genome::from_json(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 4, "activation": "linear"}]})"),
                           Shape{1, 2, 2}, 2);
  EXPECT_EQ(plan.size(), 3u);  // flatten, linear, output
}

TEST(Genome, NumbersBeyondADoubleAreInvalidArguments) {
  // nlohmann reports these as out_of_range, not parse_error; both must reach the caller as
  // InvalidArgument (a 4xx), not as a JSON library exception.
  EXPECT_NE(error_of(R"({"optimizer": {"name": "adam", "learning_rate": 1e999}, "layers": []})"), "");
}

TEST(Plan, InputShapeAndClassCountAreBounded) {
  const Genome g = Genome::from_json(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 4}]})");
  const int64_t huge = int64_t{1} << 40;
  // Products of these sides overflow int64_t: they must be refused before any arithmetic.
  EXPECT_THROW(plan_network(g, Shape{huge, huge, huge}, 2), InvalidArgument);
  EXPECT_THROW(plan_network(g, Shape{1, GenomeLimits::max_feature_values, 2}, 2), InvalidArgument);
  EXPECT_NO_THROW(plan_network(g, Shape{1, GenomeLimits::max_feature_values, 1}, 2));
  EXPECT_THROW(plan_network(g, Shape{1, 2, 2}, GenomeLimits::max_classes + 1), InvalidArgument);
  EXPECT_NO_THROW(plan_network(g, Shape{1, 2, 2}, GenomeLimits::max_classes));
}
