// Fuzz target: a model directory's two files as Model::load reads them, through the same
// torch-free code (cpp/src/model_file.h): model.json parsed and validated, then the
// tensors of weights.safetensors checked against the network its genome plans. Input: the
// two files as fuzz_support.h's split_two_files packs them. A model.json that parses must
// plan one output per category, hold one normalisation value per channel, and write back
// (model_json_text) to text that parses to the same text again.
#include <string_view>

#include "dicebox/errors.h"
#include "dicebox/safetensors.h"
#include "fuzz_support.h"
#include "model_file.h"

using namespace dicebox;
using fuzz::require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [model_json, weights] = fuzz::split_two_files(data, size);
  ModelDescription description;
  try {
    description = parse_model_json(
        std::string_view(reinterpret_cast<const char*>(model_json.data()), model_json.size()), "model.json");
  } catch (const IoError&) {
    return 0;
  }
  const ModelFields& fields = description.fields;
  require(!description.plan.empty(), "empty plan");
  require(description.plan.back().out == static_cast<int64_t>(fields.categories.size()),
          "the output layer does not have one unit per category");
  require(static_cast<int64_t>(fields.normalisation.mean.size()) == fields.shape.channels &&
              static_cast<int64_t>(fields.normalisation.std.size()) == fields.shape.channels,
          "normalisation does not have one value per channel");
  for (float s : fields.normalisation.std) require(s > 0, "normalisation std is not positive");

  const std::string text = model_json_text(fields);
  const ModelDescription again = parse_model_json(text, "written model.json");
  require(model_json_text(again.fields) == text, "written model.json parses to a different model");
  require(again.fields.genome == fields.genome, "written model.json has another genome");

  TensorMap tensors;
  try {
    tensors = parse_safetensors(weights.data(), weights.size(), "weights.safetensors");
    check_weights(tensors, description.plan, "weights.safetensors");
  } catch (const IoError&) {
    return 0;
  }
  for (const auto& parameter : plan_parameters(description.plan)) {
    const auto found = tensors.find(parameter.name);
    require(found != tensors.end() && found->second.shape == parameter.shape && found->second.dtype == DType::F32,
            "accepted weights miss a parameter of the plan");
  }
  return 0;
}
