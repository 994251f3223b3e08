// The genome: a network description (layers, activations, optimizer and learning rate)
// with its JSON form and its validation. Validation that needs the input shape (feature
// maps, kernels) lives in plan_network(). Every error message names the field.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dicebox/dataset.h"

namespace dicebox {

enum class LayerType { Dense, Dropout, Conv2d, MaxPool2d };
enum class Activation {
  Elu, Exponential, HardSigmoid, Linear, Relu, Selu, Sigmoid, Softmax, Softplus, Softsign,
  Swish, Tanh
};
enum class OptimizerName { Adadelta, Adagrad, Adam, Adamax, Nadam, Rmsprop, Sgd };
enum class Padding { Same, Valid };

// Bounds that keep one genome trainable on a single machine.
struct GenomeLimits {
  static constexpr int64_t max_layers = 64;
  static constexpr int64_t max_size = 65536;     // dense units
  static constexpr int64_t max_filters = 4096;   // conv filters
  static constexpr int64_t max_kernel = 64;      // kernel and stride, each side
  static constexpr double max_learning_rate = 10.0;
  static constexpr int64_t max_feature_values = int64_t{1} << 26;  // per image: input and after any layer
  static constexpr int64_t max_classes = 65536;  // output units, as many as a dense layer may have
};

struct Layer {
  LayerType type = LayerType::Dense;
  int64_t size = 0;                         // dense
  double rate = 0.0;                        // dropout, in [0, 1)
  int64_t filters = 0;                      // conv2d
  std::array<int64_t, 2> kernel{0, 0};      // conv2d, maxpool2d: [height, width]
  std::array<int64_t, 2> stride{0, 0};      // conv2d: default [1, 1]; maxpool2d: default kernel
  Padding padding = Padding::Same;          // conv2d
  Activation activation = Activation::Relu; // dense, conv2d
  bool operator==(const Layer&) const = default;
};

struct Genome {
  OptimizerName optimizer = OptimizerName::Adam;
  double learning_rate = 0.001;
  std::vector<Layer> layers;

  // Parses and validates; unknown fields and values are refused by name.
  static Genome from_json(std::string_view text);
  // Canonical JSON: fixed key order, defaults written out, no whitespace. Two genomes
  // that build the same network have the same canonical form.
  std::string to_json() const;
  // Shape-independent checks (sizes, rates, layer order). Throws InvalidArgument.
  void validate() const;
  bool operator==(const Genome&) const = default;
};

std::string_view name_of(LayerType);
std::string_view name_of(Activation);
std::string_view name_of(OptimizerName);
std::string_view name_of(Padding);
// Parsers throw InvalidArgument naming `field` and listing the accepted values.
LayerType parse_layer_type(std::string_view text, std::string_view field);
Activation parse_activation(std::string_view text, std::string_view field);
OptimizerName parse_optimizer(std::string_view text, std::string_view field);
const std::vector<Activation>& all_activations();
const std::vector<OptimizerName>& all_optimizers();

// One module of the network as PyTorch's nn.Sequential would hold it. Index i in the plan
// is index i in the Sequential, so parameters are named "{i}.weight" and "{i}.bias".
struct ModuleSpec {
  enum class Kind { ZeroPad2d, Conv2d, MaxPool2d, Dropout, Flatten, Linear, Activation };
  Kind kind = Kind::Flatten;
  int64_t in = 0, out = 0;                  // conv2d channels, linear features
  std::array<int64_t, 2> kernel{0, 0};
  std::array<int64_t, 2> stride{0, 0};
  std::array<int64_t, 2> padding{0, 0};     // conv2d symmetric padding [h, w]
  std::array<int64_t, 4> pad{0, 0, 0, 0};   // zeropad2d: left, right, top, bottom
  double rate = 0.0;
  Activation activation = Activation::Linear;
  Shape output;                             // shape after this module (flat: channels=features)
  int64_t layer = -1;                       // genome layer it comes from; -1 for implied ones
};

// The network a genome builds for `input` images and `classes` outputs: the implied
// flatten and output layer included. Throws InvalidArgument naming the field when a
// kernel is larger than the feature map that reaches it, or a map would shrink below 1x1,
// and when the input or the class count exceeds GenomeLimits (both may come from files).
std::vector<ModuleSpec> plan_network(const Genome& genome, Shape input, int64_t classes);
// The plan as JSON (for to_torch on the Python side).
std::string plan_to_json(const std::vector<ModuleSpec>& plan);

}  // namespace dicebox
