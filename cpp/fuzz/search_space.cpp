// Fuzz target: evolution search spaces as they arrive in requests (SearchSpace::from_json),
// and a genome drawn from each (random_genome). Input: four bytes choosing the input shape,
// class count and seed, then the space's JSON text. A space that parses must round-trip
// through to_json; a drawn genome must be valid for the input (plan_network accepts it)
// and within the space's layer bounds.
#include <string_view>

#include "dicebox/errors.h"
#include "dicebox/evolution.h"
#include "fuzz_support.h"

using namespace dicebox;
using fuzz::require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::InputReader in(data, size);
  const Shape input{1 + in.byte() % 3, 1 + in.byte() % 32, 1 + in.byte() % 32};
  const int64_t classes = 2 + in.byte() % 10;
  const uint64_t seed = in.byte();
  const auto text_bytes = in.rest();
  const std::string_view text(reinterpret_cast<const char*>(text_bytes.data()), text_bytes.size());

  SearchSpace space;
  try {
    space = SearchSpace::from_json(text);
  } catch (const InvalidArgument&) {
    return 0;
  }
  const std::string canonical = space.to_json();
  require(SearchSpace::from_json(canonical).to_json() == canonical, "canonical space JSON is not stable");

  const Genome genome = random_genome(space, input, classes, seed);
  require(static_cast<int64_t>(genome.layers.size()) <= space.max_layers, "a drawn genome has too many layers");
  plan_network(genome, input, classes);  // throws, uncaught, if the genome is invalid
  require(Genome::from_json(genome.to_json()) == genome, "a drawn genome does not round-trip");
  return 0;
}
