// Fuzz target: genome JSON (Genome::from_json) and the network plan it builds
// (plan_network, plan_to_json). Input: four bytes choosing the input shape and class
// count, then the genome text. A genome that parses must round-trip through its canonical
// JSON to an equal genome with the same text; a plan must chain its shapes, end in a
// linear layer with one output per class, and serialise to a JSON list of its length.
#include <nlohmann/json.hpp>
#include <string_view>

#include "dicebox/errors.h"
#include "dicebox/genome.h"
#include "fuzz_support.h"

using namespace dicebox;
using fuzz::require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::InputReader in(data, size);
  const Shape input{1 + in.byte() % 4, 1 + in.byte(), 1 + in.byte()};
  const int64_t classes = 1 + in.byte() % 16;  // 1 is refused: at least 2 are needed
  const auto text_bytes = in.rest();
  const std::string_view text(reinterpret_cast<const char*>(text_bytes.data()), text_bytes.size());

  Genome genome;
  try {
    genome = Genome::from_json(text);
  } catch (const InvalidArgument&) {
    return 0;
  }
  const std::string canonical = genome.to_json();
  const Genome again = Genome::from_json(canonical);
  require(again == genome, "canonical JSON parses to a different genome");
  require(again.to_json() == canonical, "canonical JSON is not stable");

  std::vector<ModuleSpec> plan;
  try {
    plan = plan_network(genome, input, classes);
  } catch (const InvalidArgument&) {
    return 0;
  }
  require(!plan.empty(), "empty plan");
  const ModuleSpec& output = plan.back();
  require(output.kind == ModuleSpec::Kind::Linear && output.out == classes, "plan does not end in the output layer");
  require(output.output == (Shape{classes, 1, 1}), "output layer shape");
  Shape previous = input;
  for (const ModuleSpec& m : plan) {
    require(m.output.channels >= 1 && m.output.height >= 1 && m.output.width >= 1, "a map shrank below 1x1");
    require(m.output.pixels() <= GenomeLimits::max_feature_values, "feature map over the limit");
    if (m.kind == ModuleSpec::Kind::Conv2d || m.kind == ModuleSpec::Kind::Linear)
      require(m.in == (m.kind == ModuleSpec::Kind::Linear ? previous.pixels() : previous.channels),
              "a layer's input does not match the previous output");
    previous = m.output;
  }
  const auto plan_json = nlohmann::json::parse(plan_to_json(plan));
  require(plan_json.is_array() && plan_json.size() == plan.size(), "plan JSON does not list every module");
  return 0;
}
