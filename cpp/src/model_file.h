// A model directory's files as data, without torch: model.json parsed and validated
// (genome, categories, input shape, normalisation, history) and the tensors of
// weights.safetensors checked against the network the genome plans. Model::load and
// Model::save use it, and so does the model-file fuzz target.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "dicebox/genome.h"
#include "dicebox/model.h"
#include "dicebox/safetensors.h"

namespace dicebox {

inline constexpr int kModelFormatVersion = 1;
inline constexpr const char* kModelWeightsFile = "weights.safetensors";
inline constexpr const char* kModelJsonFile = "model.json";

// What model.json holds: everything of a model but its weights.
struct ModelFields {
  Genome genome;
  std::vector<std::string> categories;
  Shape shape;
  Normalisation normalisation;
  std::vector<EpochRecord> history;
  std::string extra = "{}";  // a JSON object
};

// model.json parsed and checked, and the plan of the network its genome builds for its
// input shape and categories.
struct ModelDescription {
  ModelFields fields;
  std::vector<ModuleSpec> plan;
};

// Parses model.json's text; `what` names the file in errors. Throws IoError saying what
// is wrong, for any text that is not a model this dicebox can build.
ModelDescription parse_model_json(std::string_view text, const std::string& what);
// The text of model.json for `fields`: what Model::save writes and parse_model_json reads.
std::string model_json_text(const ModelFields& fields);

// A parameter tensor of a plan's network, named as nn.Sequential names it ("{i}.weight").
struct ParameterSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<ParameterSpec> plan_parameters(const std::vector<ModuleSpec>& plan);
// Checks that every tensor is float32 and that every parameter of `plan` is there with its
// shape (other tensors are ignored). Throws IoError naming `what`.
void check_weights(const TensorMap& tensors, const std::vector<ModuleSpec>& plan, const std::string& what);

// The training history as model.json and checkpoints store it (non-finite values as null).
nlohmann::json history_to_json(const std::vector<EpochRecord>& history);
// Throws nlohmann::json::exception or InvalidArgument on a malformed history.
std::vector<EpochRecord> history_from_json(const nlohmann::json& array);

}  // namespace dicebox
