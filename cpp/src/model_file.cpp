// model.json and weights.safetensors as data (see model_file.h). Every number read from
// model.json is range-checked before it is converted: a JSON number may be any double,
// and casting one that does not fit the target type is undefined behaviour.
#include "model_file.h"

#include <cmath>
#include <limits>

#include "dicebox/errors.h"
#include "json_fields.h"

namespace dicebox {
namespace {

using json = nlohmann::json;
using json_fields::as_int;
using json_fields::as_number;

json record_to_json(const EpochRecord& r) {
  auto num = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  return {{"epoch", r.epoch},          {"loss", num(r.loss)},
          {"accuracy", r.accuracy},    {"val_loss", num(r.val_loss)},
          {"val_accuracy", num(r.val_accuracy)},
          {"samples_per_second", r.samples_per_second}, {"seconds", r.seconds}};
}

EpochRecord record_from_json(const json& j, const std::string& field) {
  auto number_or_null = [&](const char* key) {
    const json& v = j.at(key);
    return v.is_null() ? std::nan("") : as_number(v, field + "." + key);
  };
  EpochRecord r;
  r.epoch = as_int(j.at("epoch"), field + ".epoch");
  r.loss = number_or_null("loss");
  r.accuracy = as_number(j.at("accuracy"), field + ".accuracy");
  r.val_loss = number_or_null("val_loss");
  r.val_accuracy = number_or_null("val_accuracy");
  r.samples_per_second = as_number(j.at("samples_per_second"), field + ".samples_per_second");
  r.seconds = as_number(j.at("seconds"), field + ".seconds");
  return r;
}

// A per-channel normalisation value: finite and representable as float32.
std::vector<float> float_list(const json& value, const std::string& field) {
  if (!value.is_array()) throw InvalidArgument(field + ": expected a list of numbers, got " + value.dump());
  std::vector<float> out;
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string f = field + "[" + std::to_string(i) + "]";
    const double d = as_number(value[i], f);
    if (!std::isfinite(d) || std::abs(d) > std::numeric_limits<float>::max())
      throw InvalidArgument(f + ": " + value[i].dump() + " is not a finite float32");
    out.push_back(static_cast<float>(d));
  }
  return out;
}

}  // namespace

json history_to_json(const std::vector<EpochRecord>& history) {
  json a = json::array();
  for (const auto& r : history) a.push_back(record_to_json(r));
  return a;
}

std::vector<EpochRecord> history_from_json(const json& a) {
  if (!a.is_array()) throw InvalidArgument("history: expected a list, got " + a.dump());
  std::vector<EpochRecord> out;
  for (size_t i = 0; i < a.size(); ++i) out.push_back(record_from_json(a[i], "history[" + std::to_string(i) + "]"));
  return out;
}

ModelDescription parse_model_json(std::string_view text, const std::string& what) {
  ModelDescription out;
  ModelFields& m = out.fields;
  try {
    const json j = json::parse(text);
    if (!j.is_object() || j.value("format", json()) != "dicebox-model")
      throw IoError(what + ": not a dicebox model file");
    const int64_t version = as_int(j.at("version"), "version");
    if (version > kModelFormatVersion)
      throw IoError(what + ": format version " + std::to_string(version) + " is newer than this dicebox reads (" +
                    std::to_string(kModelFormatVersion) + ")");
    m.genome = Genome::from_json(j.at("genome").dump());
    m.categories = j.at("categories").get<std::vector<std::string>>();
    const json& shape = j.at("input_shape");
    if (!shape.is_array() || shape.size() != 3) throw IoError(what + ": input_shape must have 3 entries");
    m.shape = Shape{as_int(shape[0], "input_shape[0]"), as_int(shape[1], "input_shape[1]"),
                    as_int(shape[2], "input_shape[2]")};
    m.normalisation.mean = float_list(j.at("normalisation").at("mean"), "normalisation.mean");
    m.normalisation.std = float_list(j.at("normalisation").at("std"), "normalisation.std");
    if (static_cast<int64_t>(m.normalisation.mean.size()) != m.shape.channels ||
        static_cast<int64_t>(m.normalisation.std.size()) != m.shape.channels)
      throw IoError(what + ": normalisation does not match the channel count");
    for (float s : m.normalisation.std)
      if (!(s > 0)) throw IoError(what + ": normalisation std must be positive");
    m.history = history_from_json(j.value("history", json::array()));
    const json extra = j.value("extra", json::object());
    if (!extra.is_object()) throw IoError(what + ": extra must be a JSON object");
    m.extra = extra.dump();
    out.plan = plan_network(m.genome, m.shape, static_cast<int64_t>(m.categories.size()));
  } catch (const json::exception& e) {
    throw IoError(what + ": malformed (" + e.what() + ")");
  } catch (const InvalidArgument& e) {
    throw IoError(what + ": " + e.what());
  }
  return out;
}

std::string model_json_text(const ModelFields& m) {
  const json j = {{"format", "dicebox-model"},
                  {"version", kModelFormatVersion},
                  {"genome", json::parse(m.genome.to_json())},
                  {"categories", m.categories},
                  {"input_shape", {m.shape.channels, m.shape.height, m.shape.width}},
                  {"normalisation", {{"mean", m.normalisation.mean}, {"std", m.normalisation.std}}},
                  {"history", history_to_json(m.history)},
                  {"weights", kModelWeightsFile},
                  {"extra", json::parse(m.extra)}};
  return j.dump(2);
}

std::vector<ParameterSpec> plan_parameters(const std::vector<ModuleSpec>& plan) {
  std::vector<ParameterSpec> out;
  for (size_t i = 0; i < plan.size(); ++i) {
    const ModuleSpec& m = plan[i];
    const std::string prefix = std::to_string(i) + ".";
    if (m.kind == ModuleSpec::Kind::Linear) {
      out.push_back({prefix + "weight", {m.out, m.in}});
      out.push_back({prefix + "bias", {m.out}});
    } else if (m.kind == ModuleSpec::Kind::Conv2d) {
      out.push_back({prefix + "weight", {m.out, m.in, m.kernel[0], m.kernel[1]}});
      out.push_back({prefix + "bias", {m.out}});
    }
  }
  return out;
}

void check_weights(const TensorMap& tensors, const std::vector<ModuleSpec>& plan, const std::string& what) {
  for (const auto& [name, tensor] : tensors)
    if (tensor.dtype != DType::F32) throw IoError(what + ": tensor " + name + " is not float32");
  auto shape_text = [](const std::vector<int64_t>& shape) {
    std::string text = "[";
    for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + "]";
  };
  for (const auto& parameter : plan_parameters(plan)) {
    auto found = tensors.find(parameter.name);
    if (found == tensors.end()) throw IoError(what + ": has no tensor " + parameter.name);
    if (found->second.shape != parameter.shape)
      throw IoError(what + ": tensor " + parameter.name + " has shape " + shape_text(found->second.shape) +
                    ", the network needs " + shape_text(parameter.shape));
  }
}

}  // namespace dicebox
