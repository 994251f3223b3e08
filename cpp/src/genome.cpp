// Genome parsing, canonical JSON, validation and the network plan (genome -> the list of
// modules PyTorch's nn.Sequential would hold).
#include "dicebox/genome.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "dicebox/errors.h"
#include "json_fields.h"

namespace dicebox {
namespace {

using json = nlohmann::json;
using namespace json_fields;

template <typename Enum>
struct Names {
  std::vector<std::pair<Enum, std::string_view>> entries;

  std::string_view name(Enum value) const {
    for (const auto& [e, n] : entries)
      if (e == value) return n;
    return "?";
  }
  Enum parse(std::string_view text, std::string_view field, std::string_view what) const {
    for (const auto& [e, n] : entries)
      if (n == text) return e;
    std::string accepted;
    for (const auto& [e, n] : entries) accepted += (accepted.empty() ? "" : ", ") + std::string(n);
    throw InvalidArgument(std::string(field) + ": unknown " + std::string(what) + " '" +
                          std::string(text) + "' (accepted: " + accepted + ")");
  }
};

const Names<LayerType> kLayerTypes{{{LayerType::Dense, "dense"},
                                    {LayerType::Dropout, "dropout"},
                                    {LayerType::Conv2d, "conv2d"},
                                    {LayerType::MaxPool2d, "maxpool2d"}}};
const Names<Activation> kActivations{{{Activation::Elu, "elu"},
                                      {Activation::Exponential, "exponential"},
                                      {Activation::HardSigmoid, "hard_sigmoid"},
                                      {Activation::Linear, "linear"},
                                      {Activation::Relu, "relu"},
                                      {Activation::Selu, "selu"},
                                      {Activation::Sigmoid, "sigmoid"},
                                      {Activation::Softmax, "softmax"},
                                      {Activation::Softplus, "softplus"},
                                      {Activation::Softsign, "softsign"},
                                      {Activation::Swish, "swish"},
                                      {Activation::Tanh, "tanh"}}};
const Names<OptimizerName> kOptimizers{{{OptimizerName::Adadelta, "adadelta"},
                                        {OptimizerName::Adagrad, "adagrad"},
                                        {OptimizerName::Adam, "adam"},
                                        {OptimizerName::Adamax, "adamax"},
                                        {OptimizerName::Nadam, "nadam"},
                                        {OptimizerName::Rmsprop, "rmsprop"},
                                        {OptimizerName::Sgd, "sgd"}}};
const Names<Padding> kPaddings{{{Padding::Same, "same"}, {Padding::Valid, "valid"}}};

// A pair [h, w]; a single integer n means [n, n].
std::array<int64_t, 2> as_pair(const json& value, const std::string& field) {
  if (value.is_number()) {
    int64_t n = as_int(value, field);
    return {n, n};
  }
  if (!value.is_array() || value.size() != 2)
    throw InvalidArgument(field + ": expected [height, width], got " + value.dump());
  return {as_int(value[0], field + "[0]"), as_int(value[1], field + "[1]")};
}

void check_range(int64_t v, int64_t lo, int64_t hi, const std::string& field) {
  if (v < lo || v > hi)
    throw InvalidArgument(field + ": " + std::to_string(v) + " is outside " + std::to_string(lo) +
                          ".." + std::to_string(hi));
}

ModuleSpec module_of(ModuleSpec::Kind kind) {
  ModuleSpec m;
  m.kind = kind;
  return m;
}

std::string layer_field(size_t i) { return "layers[" + std::to_string(i) + "]"; }

Layer parse_layer(const json& j, size_t index) {
  const std::string f = layer_field(index);
  if (!j.is_object()) throw InvalidArgument(f + ": expected an object, got " + j.dump());
  Layer layer;
  layer.type = parse_layer_type(as_string(require(j, f, "type"), f + ".type"), f + ".type");
  switch (layer.type) {
    case LayerType::Dense:
      reject_unknown_keys(j, f, {"type", "size", "activation"});
      layer.size = as_int(require(j, f, "size"), f + ".size");
      if (j.contains("activation"))
        layer.activation = parse_activation(as_string(j["activation"], f + ".activation"), f + ".activation");
      break;
    case LayerType::Dropout:
      reject_unknown_keys(j, f, {"type", "rate"});
      layer.rate = as_number(require(j, f, "rate"), f + ".rate");
      break;
    case LayerType::Conv2d:
      reject_unknown_keys(j, f, {"type", "filters", "kernel", "stride", "padding", "activation"});
      layer.filters = as_int(require(j, f, "filters"), f + ".filters");
      layer.kernel = as_pair(require(j, f, "kernel"), f + ".kernel");
      layer.stride = j.contains("stride") ? as_pair(j["stride"], f + ".stride") : std::array<int64_t, 2>{1, 1};
      if (j.contains("padding"))
        layer.padding = kPaddings.parse(as_string(j["padding"], f + ".padding"), f + ".padding", "padding");
      if (j.contains("activation"))
        layer.activation = parse_activation(as_string(j["activation"], f + ".activation"), f + ".activation");
      break;
    case LayerType::MaxPool2d:
      reject_unknown_keys(j, f, {"type", "kernel", "stride"});
      layer.kernel = as_pair(require(j, f, "kernel"), f + ".kernel");
      layer.stride = j.contains("stride") ? as_pair(j["stride"], f + ".stride") : layer.kernel;
      break;
  }
  return layer;
}

json layer_to_json(const Layer& l) {
  json j;
  j["type"] = name_of(l.type);
  switch (l.type) {
    case LayerType::Dense:
      j["size"] = l.size;
      j["activation"] = name_of(l.activation);
      break;
    case LayerType::Dropout:
      j["rate"] = l.rate;
      break;
    case LayerType::Conv2d:
      j["filters"] = l.filters;
      j["kernel"] = {l.kernel[0], l.kernel[1]};
      j["stride"] = {l.stride[0], l.stride[1]};
      j["padding"] = name_of(l.padding);
      j["activation"] = name_of(l.activation);
      break;
    case LayerType::MaxPool2d:
      j["kernel"] = {l.kernel[0], l.kernel[1]};
      j["stride"] = {l.stride[0], l.stride[1]};
      break;
  }
  return j;
}

}  // namespace

std::string_view name_of(LayerType v) { return kLayerTypes.name(v); }
std::string_view name_of(Activation v) { return kActivations.name(v); }
std::string_view name_of(OptimizerName v) { return kOptimizers.name(v); }
std::string_view name_of(Padding v) { return kPaddings.name(v); }
LayerType parse_layer_type(std::string_view t, std::string_view f) { return kLayerTypes.parse(t, f, "layer type"); }
Activation parse_activation(std::string_view t, std::string_view f) { return kActivations.parse(t, f, "activation"); }
OptimizerName parse_optimizer(std::string_view t, std::string_view f) { return kOptimizers.parse(t, f, "optimizer"); }

const std::vector<Activation>& all_activations() {
  static const std::vector<Activation> all = [] {
    std::vector<Activation> v;
    for (const auto& [e, n] : kActivations.entries) v.push_back(e);
    return v;
  }();
  return all;
}

const std::vector<OptimizerName>& all_optimizers() {
  static const std::vector<OptimizerName> all = [] {
    std::vector<OptimizerName> v;
    for (const auto& [e, n] : kOptimizers.entries) v.push_back(e);
    return v;
  }();
  return all;
}

Genome Genome::from_json(std::string_view text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number beyond a double
    throw InvalidArgument(std::string("genome: not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) throw InvalidArgument("genome: expected an object, got " + j.dump());
  reject_unknown_keys(j, "genome", {"optimizer", "layers"});
  Genome g;
  const json& opt = require(j, "genome", "optimizer");
  if (opt.is_string()) {  // shorthand: "adam" with the default learning rate
    g.optimizer = parse_optimizer(opt.get<std::string>(), "optimizer");
  } else {
    if (!opt.is_object()) throw InvalidArgument("optimizer: expected an object, got " + opt.dump());
    reject_unknown_keys(opt, "optimizer", {"name", "learning_rate"});
    g.optimizer = parse_optimizer(as_string(require(opt, "optimizer", "name"), "optimizer.name"), "optimizer.name");
    if (opt.contains("learning_rate"))
      g.learning_rate = as_number(opt["learning_rate"], "optimizer.learning_rate");
  }
  const json& layers = require(j, "genome", "layers");
  if (!layers.is_array()) throw InvalidArgument("layers: expected a list, got " + layers.dump());
  if (static_cast<int64_t>(layers.size()) > GenomeLimits::max_layers)
    throw InvalidArgument("layers: " + std::to_string(layers.size()) + " layers, at most " +
                          std::to_string(GenomeLimits::max_layers) + " allowed");
  for (size_t i = 0; i < layers.size(); ++i) g.layers.push_back(parse_layer(layers[i], i));
  g.validate();
  return g;
}

std::string Genome::to_json() const {
  json j;
  j["optimizer"] = {{"name", name_of(optimizer)}, {"learning_rate", learning_rate}};
  j["layers"] = json::array();
  for (const auto& l : layers) j["layers"].push_back(layer_to_json(l));
  return j.dump();
}

void Genome::validate() const {
  if (!std::isfinite(learning_rate) || learning_rate <= 0 || learning_rate > GenomeLimits::max_learning_rate) {
    std::ostringstream s;
    s << "optimizer.learning_rate: " << learning_rate << " is outside (0, " << GenomeLimits::max_learning_rate << "]";
    throw InvalidArgument(s.str());
  }
  if (static_cast<int64_t>(layers.size()) > GenomeLimits::max_layers)
    throw InvalidArgument("layers: at most " + std::to_string(GenomeLimits::max_layers) + " allowed");
  bool seen_dense = false;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& l = layers[i];
    const std::string f = layer_field(i);
    switch (l.type) {
      case LayerType::Dense:
        check_range(l.size, 1, GenomeLimits::max_size, f + ".size");
        seen_dense = true;
        break;
      case LayerType::Dropout:
        if (!std::isfinite(l.rate) || l.rate < 0 || l.rate >= 1) {
          std::ostringstream s;
          s << f << ".rate: " << l.rate << " is outside [0, 1)";
          throw InvalidArgument(s.str());
        }
        break;
      case LayerType::Conv2d:
      case LayerType::MaxPool2d:
        if (seen_dense)
          throw InvalidArgument(f + ".type: " + std::string(name_of(l.type)) +
                                " cannot follow a dense layer (dense layers work on flattened features)");
        if (l.type == LayerType::Conv2d) check_range(l.filters, 1, GenomeLimits::max_filters, f + ".filters");
        for (int d = 0; d < 2; ++d) {
          check_range(l.kernel[d], 1, GenomeLimits::max_kernel, f + ".kernel[" + std::to_string(d) + "]");
          check_range(l.stride[d], 1, GenomeLimits::max_kernel, f + ".stride[" + std::to_string(d) + "]");
        }
        break;
    }
  }
}

std::vector<ModuleSpec> plan_network(const Genome& genome, Shape input, int64_t classes) {
  genome.validate();
  if (input.channels < 1 || input.height < 1 || input.width < 1)
    throw InvalidArgument("input shape: every dimension must be >= 1");
  // Bounded before any arithmetic on them: a model file's input shape and category count
  // are untrusted, and an int64_t product that overflows is undefined behaviour. Each side
  // is at most the limit, so height * width stays below 2^53.
  constexpr int64_t max_values = GenomeLimits::max_feature_values;
  if (input.channels > max_values || input.height > max_values || input.width > max_values ||
      input.height * input.width > max_values / input.channels)
    throw InvalidArgument("input shape: " + std::to_string(input.channels) + "x" + std::to_string(input.height) + "x" +
                          std::to_string(input.width) + " is more than the limit of " + std::to_string(max_values) +
                          " values per image");
  if (classes < 2) throw InvalidArgument("categories: at least 2 are needed, got " + std::to_string(classes));
  if (classes > GenomeLimits::max_classes)
    throw InvalidArgument("categories: " + std::to_string(classes) + " is more than the limit of " +
                          std::to_string(GenomeLimits::max_classes));
  using Kind = ModuleSpec::Kind;
  std::vector<ModuleSpec> plan;
  Shape cur = input;
  bool flat = false;
  auto push = [&](ModuleSpec m, int64_t layer) {
    m.layer = layer;
    m.output = cur;
    plan.push_back(m);
  };
  auto activation = [&](Activation a, int64_t layer) {
    if (a == Activation::Linear) return;  // identity: no module
    ModuleSpec m = module_of(Kind::Activation);
    m.activation = a;
    push(m, layer);
  };
  auto flatten = [&] {
    if (flat) return;
    cur = Shape{cur.pixels(), 1, 1};
    flat = true;
    push(module_of(Kind::Flatten), -1);
  };
  for (size_t i = 0; i < genome.layers.size(); ++i) {
    const Layer& l = genome.layers[i];
    const auto li = static_cast<int64_t>(i);
    const std::string f = layer_field(i);
    auto map_text = [&] { return std::to_string(cur.height) + "x" + std::to_string(cur.width); };
    switch (l.type) {
      case LayerType::Dense: {
        flatten();
        ModuleSpec m = module_of(Kind::Linear);
        m.in = cur.channels;
        m.out = l.size;
        cur = Shape{l.size, 1, 1};
        push(m, li);
        activation(l.activation, li);
        break;
      }
      case LayerType::Dropout: {
        ModuleSpec m = module_of(Kind::Dropout);
        m.rate = l.rate;
        push(m, li);
        break;
      }
      case LayerType::Conv2d: {
        std::array<int64_t, 2> size{cur.height, cur.width}, out{}, total{};
        if (l.kernel[0] > size[0] || l.kernel[1] > size[1])
          throw InvalidArgument(f + ".kernel: " + std::to_string(l.kernel[0]) + "x" + std::to_string(l.kernel[1]) +
                                " is larger than the " + map_text() + " feature map that reaches it");
        for (int d = 0; d < 2; ++d) {
          if (l.padding == Padding::Valid) {
            out[d] = (size[d] - l.kernel[d]) / l.stride[d] + 1;
          } else {
            // TensorFlow's "same": output ceil(size / stride), padding split with the extra on the far side.
            out[d] = (size[d] + l.stride[d] - 1) / l.stride[d];
            total[d] = std::max<int64_t>((out[d] - 1) * l.stride[d] + l.kernel[d] - size[d], 0);
          }
        }
        ModuleSpec conv = module_of(Kind::Conv2d);
        conv.in = cur.channels;
        conv.out = l.filters;
        conv.kernel = l.kernel;
        conv.stride = l.stride;
        if (total[0] % 2 == 0 && total[1] % 2 == 0) {
          conv.padding = {total[0] / 2, total[1] / 2};
        } else {
          ModuleSpec pad = module_of(Kind::ZeroPad2d);
          pad.pad = {total[1] / 2, total[1] - total[1] / 2, total[0] / 2, total[0] - total[0] / 2};
          cur = Shape{cur.channels, cur.height + total[0], cur.width + total[1]};
          push(pad, li);
        }
        cur = Shape{l.filters, out[0], out[1]};
        push(conv, li);
        activation(l.activation, li);
        break;
      }
      case LayerType::MaxPool2d: {
        if (l.kernel[0] > cur.height || l.kernel[1] > cur.width)
          throw InvalidArgument(f + ".kernel: " + std::to_string(l.kernel[0]) + "x" + std::to_string(l.kernel[1]) +
                                " is larger than the " + map_text() + " feature map that reaches it");
        ModuleSpec m = module_of(Kind::MaxPool2d);
        m.kernel = l.kernel;
        m.stride = l.stride;
        cur = Shape{cur.channels, (cur.height - l.kernel[0]) / l.stride[0] + 1,
                    (cur.width - l.kernel[1]) / l.stride[1] + 1};
        push(m, li);
        break;
      }
    }
    if (cur.pixels() > GenomeLimits::max_feature_values)
      throw InvalidArgument(f + ": the feature map after this layer holds " + std::to_string(cur.pixels()) +
                            " values per image, more than the limit of " + std::to_string(GenomeLimits::max_feature_values));
  }
  flatten();
  ModuleSpec out = module_of(Kind::Linear);
  out.in = cur.channels;
  out.out = classes;
  cur = Shape{classes, 1, 1};
  push(out, -1);
  return plan;
}

std::string plan_to_json(const std::vector<ModuleSpec>& plan) {
  json a = json::array();
  for (const auto& m : plan) {
    json j;
    switch (m.kind) {
      case ModuleSpec::Kind::ZeroPad2d:
        j = {{"module", "ZeroPad2d"}, {"pad", m.pad}};
        break;
      case ModuleSpec::Kind::Conv2d:
        j = {{"module", "Conv2d"}, {"in", m.in}, {"out", m.out}, {"kernel", m.kernel},
             {"stride", m.stride}, {"padding", m.padding}};
        break;
      case ModuleSpec::Kind::MaxPool2d:
        j = {{"module", "MaxPool2d"}, {"kernel", m.kernel}, {"stride", m.stride}};
        break;
      case ModuleSpec::Kind::Dropout:
        j = {{"module", "Dropout"}, {"rate", m.rate}};
        break;
      case ModuleSpec::Kind::Flatten:
        j = {{"module", "Flatten"}};
        break;
      case ModuleSpec::Kind::Linear:
        j = {{"module", "Linear"}, {"in", m.in}, {"out", m.out}};
        break;
      case ModuleSpec::Kind::Activation:
        j = {{"module", "Activation"}, {"activation", name_of(m.activation)}};
        break;
    }
    j["layer"] = m.layer;
    j["output"] = {m.output.channels, m.output.height, m.output.width};
    a.push_back(j);
  }
  return a.dump();
}

}  // namespace dicebox
