// The evolution operators: the search space (presets, JSON, validation), random genomes,
// crossover, mutation, repair and breeding. Torch-free: genomes are checked with
// plan_network() and every draw comes from SplitMix64 streams derived from the seed, so
// results are the same on every platform and standard library.
#include "dicebox/evolution.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "dicebox/errors.h"
#include "json_fields.h"
#include "dicebox/random.h"

namespace dicebox {
namespace {

using json = nlohmann::json;
using namespace json_fields;

// Stream constants: each operator draws from its own stream of the caller's seed, so one
// operator's draws never shift another's.
constexpr uint64_t kRandomGenomeStream = 0x65766f2d72616e64ULL;  // "evo-rand"
constexpr uint64_t kCrossoverStream = 0x65766f2d63726f73ULL;     // "evo-cros"
constexpr uint64_t kMutateStream = 0x65766f2d6d757461ULL;        // "evo-muta"
constexpr uint64_t kSelectStream = 0x65766f2d73656c65ULL;        // "evo-sele"
constexpr uint64_t kBreedStream = 0x65766f2d62726565ULL;         // "evo-bree"

// How often breed() draws a child again when it duplicates a member of the new generation.
constexpr int kDuplicateRebreeds = 8;

// How many genomes random_genome() draws before it settles for shrinking the cheapest. In
// the default space most draws are within the budget, so this is rarely exhausted, and it
// keeps the drawn distribution (rather than repair's shrunk networks) the common case.
constexpr int kBudgetDraws = 32;

// ---- JSON and validation helpers for the search space (field reads: json_fields.h) ---

std::string space_field(std::string_view key) { return "space." + std::string(key); }

std::string number_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// A JSON list whose elements `parse(element, "field[i]")` turns into values.
template <typename T, typename Parse>
std::vector<T> as_list(const json& value, const std::string& field, Parse parse) {
  if (!value.is_array()) throw InvalidArgument(field + ": expected a list, got " + value.dump());
  std::vector<T> out;
  for (size_t i = 0; i < value.size(); ++i) out.push_back(parse(value[i], field + "[" + std::to_string(i) + "]"));
  return out;
}

template <typename Enum>
json names_of(const std::vector<Enum>& values) {
  json a = json::array();
  for (Enum v : values) a.push_back(name_of(v));
  return a;
}

void check_range(int64_t v, int64_t lo, int64_t hi, std::string_view key) {
  if (v < lo || v > hi)
    throw InvalidArgument(space_field(key) + ": " + std::to_string(v) + " is outside " + std::to_string(lo) + ".." +
                          std::to_string(hi));
}

void check_order(double lo, double hi, std::string_view lo_key, std::string_view hi_key) {
  if (lo > hi)
    throw InvalidArgument(space_field(hi_key) + ": " + number_text(hi) + " is less than " + std::string(lo_key) +
                          " (" + number_text(lo) + ")");
}

template <typename T>
void check_not_empty(const std::vector<T>& values, std::string_view key) {
  if (values.empty()) throw InvalidArgument(space_field(key) + ": must not be empty");
}

void check_unit(double v, std::string_view field) {
  if (!(v >= 0.0 && v <= 1.0)) throw InvalidArgument(std::string(field) + ": " + number_text(v) + " is outside [0, 1]");
}

// ---- draws ---------------------------------------------------------------------------------

template <typename T>
const T& pick(SplitMix64& rng, const std::vector<T>& values) {
  return values[rng.below(values.size())];
}

double log_uniform(SplitMix64& rng, double lo, double hi) {
  if (lo >= hi) return lo;
  return std::clamp(std::exp(rng.uniform(std::log(lo), std::log(hi))), lo, hi);
}

// Log-uniform over the integers lo..hi: k is drawn with weight log((k + 1) / k).
int64_t log_uniform_int(SplitMix64& rng, int64_t lo, int64_t hi) {
  if (lo >= hi) return lo;
  const double x = std::exp(rng.uniform(std::log(static_cast<double>(lo)), std::log(static_cast<double>(hi) + 1.0)));
  return std::clamp(static_cast<int64_t>(std::floor(x)), lo, hi);
}

// ---- where a layer sits --------------------------------------------------------------------

// The feature map that reaches a layer ({features, 1, 1} once flat) and whether a dense
// layer came before it, after which only dense and dropout layers may follow.
struct Site {
  Shape map;
  bool flat = false;
};

bool kernel_fits(const Layer& layer, const Shape& map) {
  return layer.kernel[0] <= map.height && layer.kernel[1] <= map.width;
}

// The map after a conv or maxpool layer, computed as plan_network() does.
Shape spatial_output(const Layer& layer, const Shape& map) {
  std::array<int64_t, 2> size{map.height, map.width}, out{};
  for (int d = 0; d < 2; ++d) {
    const bool same = layer.type == LayerType::Conv2d && layer.padding == Padding::Same;
    out[d] = same ? (size[d] + layer.stride[d] - 1) / layer.stride[d] : (size[d] - layer.kernel[d]) / layer.stride[d] + 1;
  }
  return Shape{layer.type == LayerType::Conv2d ? layer.filters : map.channels, out[0], out[1]};
}

// Whether plan_network() accepts `layer` at `site`.
bool fits(const Layer& layer, const Site& site) {
  if (layer.type == LayerType::Dense || layer.type == LayerType::Dropout) return true;
  if (site.flat || !kernel_fits(layer, site.map)) return false;
  const Shape out = spatial_output(layer, site.map);
  return out.height * out.width <= GenomeLimits::max_feature_values / out.channels;
}

Site after(const Layer& layer, Site site) {
  switch (layer.type) {
    case LayerType::Dense:
      return Site{Shape{layer.size, 1, 1}, true};
    case LayerType::Dropout:
      return site;
    case LayerType::Conv2d:
    case LayerType::MaxPool2d:
      site.map = spatial_output(layer, site.map);
      return site;
  }
  return site;
}

// The site of every layer of a valid genome, plus the site after the last one.
std::vector<Site> sites_of(const Genome& genome, Shape input) {
  std::vector<Site> sites{Site{input}};
  for (const Layer& layer : genome.layers) sites.push_back(after(layer, sites.back()));
  return sites;
}

bool builds(const Genome& genome, Shape input, int64_t classes) {
  try {
    plan_network(genome, input, classes);
    return true;
  } catch (const InvalidArgument&) {
    return false;
  }
}

// Not a pile of dropouts: no two in a row, and not only dropouts. Valid either way, but
// such networks waste an evaluation, so the operators avoid them when they can.
bool tidy(const Genome& genome) {
  bool only_dropout = true;
  for (size_t i = 0; i < genome.layers.size(); ++i) {
    const bool dropout = genome.layers[i].type == LayerType::Dropout;
    if (dropout && i > 0 && genome.layers[i - 1].type == LayerType::Dropout) return false;
    only_dropout = only_dropout && dropout;
  }
  return genome.layers.empty() || !only_dropout;
}

// ---- the compute budget ----------------------------------------------------------------------

// How far a network is over the space's budget: each exceeded bound's overrun relative to
// that bound, summed, so both bounds weigh alike whatever their scale; 0 within the budget.
// Random draws and repair steps are ranked by it.
double overrun(const NetworkCost& cost, const SearchSpace& space) {
  double total = 0.0;
  for (auto [value, bound] :
       {std::pair{cost.parameters, space.max_parameters}, std::pair{cost.macs, space.max_macs}})
    if (bound > 0 && value > bound) total += static_cast<double>(value - bound) / static_cast<double>(bound);
  return total;
}

double overrun_of(const Genome& genome, const SearchSpace& space, Shape input, int64_t classes) {
  return overrun(network_cost(genome, input, classes), space);
}

// One step narrower, staying inside the space: a dense layer halves (not below min_size), a
// conv takes the next smaller count in `filters`. Either way the layer's own cost and the
// next weighted layer's input shrink, and the feature maps keep their height and width.
// None for other layer types or a layer already at the space's minimum.
std::optional<Layer> narrower(const Layer& layer, const SearchSpace& space) {
  Layer out = layer;
  if (layer.type == LayerType::Dense && layer.size > space.min_size) {
    out.size = std::max(layer.size / 2, space.min_size);
    return out;
  }
  if (layer.type == LayerType::Conv2d) {
    std::optional<int64_t> next;
    for (int64_t f : space.filters)
      if (f < layer.filters && (!next || f > *next)) next = f;
    if (!next) return std::nullopt;
    out.filters = *next;
    return out;
  }
  return std::nullopt;
}

// The budget half of repair() for a genome that builds: greedy steps, each the one that
// cuts the overrun most, narrowing before dropping (see repair() in evolution.h).
Genome fit_budget(Genome genome, const SearchSpace& space, Shape input, int64_t classes) {
  double over = overrun_of(genome, space, input, classes);
  while (over > 0.0 && !genome.layers.empty()) {
    std::optional<Genome> step;
    double step_over = over;  // a narrowing must help
    for (size_t i = 0; i < genome.layers.size(); ++i) {
      const std::optional<Layer> smaller = narrower(genome.layers[i], space);
      if (!smaller) continue;
      Genome candidate = genome;
      candidate.layers[i] = *smaller;
      if (const double o = overrun_of(candidate, space, input, classes); o < step_over) {
        step = std::move(candidate);
        step_over = o;
      }
    }
    if (!step) {
      // No narrowing helps: drop the layer whose removal helps most, or hurts least (a pool
      // whose removal enlarges what follows), so the loop always reaches the empty genome.
      // Dropping the last layer always builds, so some candidate is taken. Ties go to a
      // tidy candidate: a pile of dropouts is the last resort.
      step_over = std::numeric_limits<double>::infinity();
      for (size_t i = 0; i < genome.layers.size(); ++i) {
        Genome candidate = genome;
        candidate.layers.erase(candidate.layers.begin() + static_cast<std::ptrdiff_t>(i));
        if (!builds(candidate, input, classes)) continue;  // e.g. a map over the size limit
        const double o = overrun_of(candidate, space, input, classes);
        if (o < step_over || (o == step_over && tidy(candidate) && !tidy(*step))) {
          step = std::move(candidate);
          step_over = o;
        }
      }
    }
    genome = std::move(*step);
    over = step_over;
  }
  return genome;
}

// ---- layers drawn from the space -----------------------------------------------------------

// A stride-1 "same" convolution keeps the map, so these depend only on the site.
std::vector<int64_t> fitting_kernels(const SearchSpace& space, const Site& site) {
  std::vector<int64_t> out;
  for (int64_t k : space.kernels)
    if (k <= site.map.height && k <= site.map.width) out.push_back(k);
  return out;
}

std::vector<int64_t> fitting_filters(const SearchSpace& space, const Site& site) {
  std::vector<int64_t> out;
  for (int64_t f : space.filters)
    if (site.map.height * site.map.width <= GenomeLimits::max_feature_values / f) out.push_back(f);
  return out;
}

Layer pool_layer(const SearchSpace& space) {
  Layer layer;
  layer.type = LayerType::MaxPool2d;
  layer.kernel = {space.pool, space.pool};
  layer.stride = {space.pool, space.pool};
  return layer;
}

bool can_place(LayerType type, const SearchSpace& space, const Site& site) {
  switch (type) {
    case LayerType::Dense:
    case LayerType::Dropout:
      return true;
    case LayerType::Conv2d:
      return !site.flat && !fitting_kernels(space, site).empty() && !fitting_filters(space, site).empty();
    case LayerType::MaxPool2d:
      return fits(pool_layer(space), site);
  }
  return false;
}

// A random layer of `type` that fits at `site` (can_place() must hold).
Layer draw_layer(LayerType type, const SearchSpace& space, const Site& site, SplitMix64& rng) {
  Layer layer;
  layer.type = type;
  switch (type) {
    case LayerType::Dense:
      layer.size = log_uniform_int(rng, space.min_size, space.max_size);
      layer.activation = pick(rng, space.activations);
      break;
    case LayerType::Dropout:
      layer.rate = rng.uniform(space.min_dropout, space.max_dropout);
      break;
    case LayerType::Conv2d: {
      const int64_t k = pick(rng, fitting_kernels(space, site));
      layer.filters = pick(rng, fitting_filters(space, site));
      layer.kernel = {k, k};
      layer.stride = {1, 1};
      layer.padding = Padding::Same;
      layer.activation = pick(rng, space.activations);
      break;
    }
    case LayerType::MaxPool2d:
      layer = pool_layer(space);
      break;
  }
  return layer;
}

// ---- repair --------------------------------------------------------------------------------

// plan_network()'s checks of the input shape and class count, done before any shape arithmetic.
void check_target(Shape input, int64_t classes) { plan_network(Genome{}, input, classes); }

// Whether the layer's own values are valid wherever it stands (Genome::validate() on the
// layer alone, where no dense layer precedes it).
bool well_formed(const Layer& layer) {
  Genome alone;
  alone.layers = {layer};
  try {
    alone.validate();
    return true;
  } catch (const InvalidArgument&) {
    return false;
  }
}

// A conv whose kernel is larger than the map takes the space's largest kernel that fits; one
// whose output holds too many values per image, the space's largest filter count that fits.
// If neither helps it still does not fit, and repair() drops it.
Layer fit_conv(Layer layer, const SearchSpace& space, const Site& site) {
  if (!kernel_fits(layer, site.map)) {
    const std::vector<int64_t> kernels = fitting_kernels(space, site);
    if (kernels.empty()) return layer;
    const int64_t k = *std::max_element(kernels.begin(), kernels.end());
    layer.kernel = {k, k};
  }
  if (!kernel_fits(layer, site.map) || fits(layer, site)) return layer;
  std::optional<int64_t> most;
  for (int64_t f : space.filters) {
    Layer fewer = layer;
    fewer.filters = f;
    if (fits(fewer, site) && (!most || f > *most)) most = f;
  }
  if (most) layer.filters = *most;
  return layer;
}

// ---- mutation kinds ------------------------------------------------------------------------

struct MutationContext {
  const SearchSpace& space;
  Shape input;
  int64_t classes;
  SplitMix64 rng;
};

// What a mutation kind may choose: a genome that builds and is within the budget, so the
// closing repair() in mutate() keeps the change rather than shrinking it away.
bool acceptable(const Genome& genome, const MutationContext& c) {
  try {
    return overrun_of(genome, c.space, c.input, c.classes) == 0.0;
  } catch (const InvalidArgument&) {
    return false;
  }
}

// Replaces `genome` by one of the acceptable `options`, tidy ones first; false if there are none.
bool adopt(Genome& genome, std::vector<Genome> options, SplitMix64& rng) {
  if (options.empty()) return false;
  std::vector<Genome> tidy_options;
  std::copy_if(options.begin(), options.end(), std::back_inserter(tidy_options), tidy);
  if (!tidy_options.empty()) options = std::move(tidy_options);
  genome = std::move(options[rng.below(options.size())]);
  return true;
}

// Changes one layer: a random one among those with an acceptable alternative, to a random
// one of its acceptable alternatives. `alternatives` returns replacement layers that differ
// from the old.
bool change_one_layer(Genome& genome, MutationContext& c,
                      const std::function<std::vector<Layer>(const Layer&)>& alternatives) {
  std::vector<std::vector<Genome>> per_layer;
  for (size_t i = 0; i < genome.layers.size(); ++i) {
    std::vector<Genome> accepted;
    for (const Layer& alternative : alternatives(genome.layers[i])) {
      Genome candidate = genome;
      candidate.layers[i] = alternative;
      if (acceptable(candidate, c)) accepted.push_back(std::move(candidate));
    }
    if (!accepted.empty()) per_layer.push_back(std::move(accepted));
  }
  if (per_layer.empty()) return false;
  const auto& chosen = pick(c.rng, per_layer);
  genome = pick(c.rng, chosen);
  return true;
}

bool mutate_optimizer(Genome& genome, MutationContext& c) {
  std::vector<OptimizerName> others;
  for (OptimizerName o : c.space.optimizers)
    if (o != genome.optimizer) others.push_back(o);
  if (others.empty()) return false;
  genome.optimizer = pick(c.rng, others);
  return true;
}

// A factor in [0.5, 2], log-uniform, restricted to the space's range; a rate outside the
// range (a genome from elsewhere) is clamped into it.
bool mutate_learning_rate(Genome& genome, MutationContext& c) {
  const double rate = genome.learning_rate;
  const double lo = std::max(rate * 0.5, c.space.min_learning_rate);
  const double hi = std::min(rate * 2.0, c.space.max_learning_rate);
  double changed = lo > hi ? std::clamp(rate, c.space.min_learning_rate, c.space.max_learning_rate)
                           : log_uniform(c.rng, lo, hi);
  if (changed == rate) changed = lo != rate ? lo : hi;  // a draw of exactly 1 (or an empty interval)
  if (changed == rate) return false;
  genome.learning_rate = changed;
  return true;
}

bool mutate_add_layer(Genome& genome, MutationContext& c) {
  if (static_cast<int64_t>(genome.layers.size()) >= c.space.max_layers) return false;
  const std::vector<Site> sites = sites_of(genome, c.input);
  std::vector<Genome> options;
  for (size_t p = 0; p <= genome.layers.size(); ++p)
    for (LayerType type : c.space.layer_types) {
      if (!can_place(type, c.space, sites[p])) continue;
      Genome candidate = genome;
      candidate.layers.insert(candidate.layers.begin() + static_cast<std::ptrdiff_t>(p),
                              draw_layer(type, c.space, sites[p], c.rng));
      if (acceptable(candidate, c)) options.push_back(std::move(candidate));
    }
  return adopt(genome, std::move(options), c.rng);
}

bool mutate_remove_layer(Genome& genome, MutationContext& c) {
  if (static_cast<int64_t>(genome.layers.size()) <= c.space.min_layers) return false;
  std::vector<Genome> options;
  for (size_t i = 0; i < genome.layers.size(); ++i) {
    Genome candidate = genome;
    candidate.layers.erase(candidate.layers.begin() + static_cast<std::ptrdiff_t>(i));
    if (acceptable(candidate, c)) options.push_back(std::move(candidate));
  }
  return adopt(genome, std::move(options), c.rng);
}

// A layer becomes a fresh layer of another type (changes within a type are the other kinds).
bool mutate_replace_layer(Genome& genome, MutationContext& c) {
  const std::vector<Site> sites = sites_of(genome, c.input);
  std::vector<Genome> options;
  for (size_t i = 0; i < genome.layers.size(); ++i)
    for (LayerType type : c.space.layer_types) {
      if (type == genome.layers[i].type || !can_place(type, c.space, sites[i])) continue;
      Genome candidate = genome;
      candidate.layers[i] = draw_layer(type, c.space, sites[i], c.rng);
      if (acceptable(candidate, c)) options.push_back(std::move(candidate));
    }
  return adopt(genome, std::move(options), c.rng);
}

// A new size for one dense layer, log-uniform over the space's range. A layer's cost grows
// with its size, so when a larger draw breaks the budget a size below the old one (which
// the budget affords, as it did the old size) is drawn instead.
bool mutate_size(Genome& genome, MutationContext& c) {
  const int64_t lo = c.space.min_size, hi = c.space.max_size;
  std::vector<Genome> options;  // at most one per dense layer
  for (size_t i = 0; i < genome.layers.size(); ++i) {
    const int64_t old_size = genome.layers[i].size;
    if (genome.layers[i].type != LayerType::Dense || (lo == hi && old_size == lo)) continue;
    Genome candidate = genome;
    int64_t& size = candidate.layers[i].size;
    do {
      size = log_uniform_int(c.rng, lo, hi);
    } while (size == old_size);
    if (!acceptable(candidate, c) && size > old_size && old_size > lo)
      size = log_uniform_int(c.rng, lo, old_size - 1);
    if (acceptable(candidate, c)) options.push_back(std::move(candidate));
  }
  if (options.empty()) return false;
  genome = std::move(options[c.rng.below(options.size())]);
  return true;
}

bool mutate_filters(Genome& genome, MutationContext& c) {
  return change_one_layer(genome, c, [&](const Layer& layer) {
    std::vector<Layer> out;
    if (layer.type != LayerType::Conv2d) return out;
    for (int64_t f : c.space.filters)
      if (f != layer.filters) {
        out.push_back(layer);
        out.back().filters = f;
      }
    return out;
  });
}

bool mutate_kernel(Genome& genome, MutationContext& c) {
  return change_one_layer(genome, c, [&](const Layer& layer) {
    std::vector<Layer> out;
    if (layer.type != LayerType::Conv2d) return out;
    for (int64_t k : c.space.kernels)
      if (layer.kernel != std::array<int64_t, 2>{k, k}) {
        out.push_back(layer);
        out.back().kernel = {k, k};
      }
    return out;
  });
}

bool mutate_activation(Genome& genome, MutationContext& c) {
  return change_one_layer(genome, c, [&](const Layer& layer) {
    std::vector<Layer> out;
    if (layer.type != LayerType::Dense && layer.type != LayerType::Conv2d) return out;
    for (Activation a : c.space.activations)
      if (a != layer.activation) {
        out.push_back(layer);
        out.back().activation = a;
      }
    return out;
  });
}

bool mutate_rate(Genome& genome, MutationContext& c) {
  return change_one_layer(genome, c, [&](const Layer& layer) -> std::vector<Layer> {
    const double lo = c.space.min_dropout, hi = c.space.max_dropout;
    if (layer.type != LayerType::Dropout || (lo == hi && layer.rate == lo)) return {};
    Layer changed = layer;
    do {
      changed.rate = lo == hi ? lo : c.rng.uniform(lo, hi);
    } while (changed.rate == layer.rate);
    return {changed};
  });
}

struct MutationKind {
  std::string_view name;
  bool (*apply)(Genome&, MutationContext&);
};

// The order is part of the seeded behaviour: kinds fire and draw in this order.
constexpr MutationKind kMutationKinds[] = {
    {"optimizer", mutate_optimizer},
    {"learning_rate", mutate_learning_rate},
    {"add_layer", mutate_add_layer},
    {"remove_layer", mutate_remove_layer},
    {"replace_layer", mutate_replace_layer},
    {"size", mutate_size},
    {"filters", mutate_filters},
    {"kernel", mutate_kernel},
    {"activation", mutate_activation},
    {"rate", mutate_rate},
};

// One genome drawn from the space, budget aside: a layer count, then layer by layer a type
// that fits where it stands.
Genome draw_genome(const SearchSpace& space, Shape input, SplitMix64& rng) {
  Genome genome;
  genome.optimizer = pick(rng, space.optimizers);
  genome.learning_rate = log_uniform(rng, space.min_learning_rate, space.max_learning_rate);
  const int64_t count = space.min_layers + static_cast<int64_t>(rng.below(
                                               static_cast<uint64_t>(space.max_layers - space.min_layers + 1)));
  Site site{input};
  for (int64_t position = 0; position < count; ++position) {
    // A dropout first or after a dropout only when nothing else fits (see tidy()).
    const bool dropout_welcome = position > 0 && genome.layers.back().type != LayerType::Dropout;
    std::vector<LayerType> allowed, preferred;
    for (LayerType type : space.layer_types) {
      if (!can_place(type, space, site)) continue;
      allowed.push_back(type);
      if (type != LayerType::Dropout || dropout_welcome) preferred.push_back(type);
    }
    // A space without dense or dropout layers can run out of layers that fit a small map;
    // the genome then ends early rather than failing.
    if (allowed.empty()) break;
    const LayerType type = pick(rng, preferred.empty() ? allowed : preferred);
    genome.layers.push_back(draw_layer(type, space, site, rng));
    site = after(genome.layers.back(), site);
  }
  return genome;
}

}  // namespace

// ---- SearchSpace ---------------------------------------------------------------------------

SearchSpace SearchSpace::preset(std::string_view name) {
  SearchSpace space;
  if (name == "default") return space;
  if (name == "original") {
    space.layer_types = {LayerType::Dense, LayerType::Dropout};
    space.min_layers = 1;
    space.max_layers = 21;
    space.min_size = 1;
    space.max_size = 1597;
    space.activations = all_activations();
    space.optimizers = all_optimizers();
    space.min_learning_rate = 1e-4;
    space.max_learning_rate = 1e-1;
    space.min_dropout = 0.1;
    space.max_dropout = 0.5;
    space.max_parameters = 0;
    space.max_macs = 0;
    return space;
  }
  throw InvalidArgument("space: unknown preset '" + std::string(name) + "' (accepted: default, original)");
}

SearchSpace SearchSpace::from_json(std::string_view text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number beyond a double
    throw InvalidArgument(std::string("space: not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) throw InvalidArgument("space: expected an object, got " + j.dump());
  SearchSpace s = preset("default");
  auto to_int = [](const json& v, const std::string& f) { return as_int(v, f); };
  for (const auto& [key, value] : j.items()) {
    const std::string f = space_field(key);
    if (key == "layer_types")
      s.layer_types = as_list<LayerType>(value, f, [](const json& v, const std::string& e) {
        return parse_layer_type(as_string(v, e), e);
      });
    else if (key == "min_layers") s.min_layers = as_int(value, f);
    else if (key == "max_layers") s.max_layers = as_int(value, f);
    else if (key == "min_size") s.min_size = as_int(value, f);
    else if (key == "max_size") s.max_size = as_int(value, f);
    else if (key == "filters") s.filters = as_list<int64_t>(value, f, to_int);
    else if (key == "kernels") s.kernels = as_list<int64_t>(value, f, to_int);
    else if (key == "pool") s.pool = as_int(value, f);
    else if (key == "min_dropout") s.min_dropout = as_number(value, f);
    else if (key == "max_dropout") s.max_dropout = as_number(value, f);
    else if (key == "activations")
      s.activations = as_list<Activation>(value, f, [](const json& v, const std::string& e) {
        return parse_activation(as_string(v, e), e);
      });
    else if (key == "optimizers")
      s.optimizers = as_list<OptimizerName>(value, f, [](const json& v, const std::string& e) {
        return parse_optimizer(as_string(v, e), e);
      });
    else if (key == "min_learning_rate") s.min_learning_rate = as_number(value, f);
    else if (key == "max_learning_rate") s.max_learning_rate = as_number(value, f);
    else if (key == "max_parameters") s.max_parameters = as_int(value, f);
    else if (key == "max_macs") s.max_macs = as_int(value, f);
    else throw InvalidArgument(f + ": unknown field");
  }
  s.validate();
  return s;
}

std::string SearchSpace::to_json() const {
  json j;
  j["layer_types"] = names_of(layer_types);
  j["min_layers"] = min_layers;
  j["max_layers"] = max_layers;
  j["min_size"] = min_size;
  j["max_size"] = max_size;
  j["filters"] = filters;
  j["kernels"] = kernels;
  j["pool"] = pool;
  j["min_dropout"] = min_dropout;
  j["max_dropout"] = max_dropout;
  j["activations"] = names_of(activations);
  j["optimizers"] = names_of(optimizers);
  j["min_learning_rate"] = min_learning_rate;
  j["max_learning_rate"] = max_learning_rate;
  j["max_parameters"] = max_parameters;
  j["max_macs"] = max_macs;
  return j.dump();
}

void SearchSpace::validate() const {
  check_not_empty(layer_types, "layer_types");
  check_range(min_layers, 1, GenomeLimits::max_layers, "min_layers");
  check_range(max_layers, 1, GenomeLimits::max_layers, "max_layers");
  check_order(static_cast<double>(min_layers), static_cast<double>(max_layers), "min_layers", "max_layers");
  check_range(min_size, 1, GenomeLimits::max_size, "min_size");
  check_range(max_size, 1, GenomeLimits::max_size, "max_size");
  check_order(static_cast<double>(min_size), static_cast<double>(max_size), "min_size", "max_size");
  check_not_empty(filters, "filters");
  for (int64_t f : filters) check_range(f, 1, GenomeLimits::max_filters, "filters");
  check_not_empty(kernels, "kernels");
  for (int64_t k : kernels) check_range(k, 1, GenomeLimits::max_kernel, "kernels");
  check_range(pool, 1, GenomeLimits::max_kernel, "pool");
  for (auto [value, key] : {std::pair{min_dropout, "min_dropout"}, std::pair{max_dropout, "max_dropout"}})
    if (!(value >= 0.0 && value < 1.0))
      throw InvalidArgument(space_field(key) + ": " + number_text(value) + " is outside [0, 1)");
  check_order(min_dropout, max_dropout, "min_dropout", "max_dropout");
  check_not_empty(activations, "activations");
  check_not_empty(optimizers, "optimizers");
  for (auto [value, key] : {std::pair{min_learning_rate, "min_learning_rate"},
                            std::pair{max_learning_rate, "max_learning_rate"}})
    if (!(value > 0.0 && value <= GenomeLimits::max_learning_rate))
      throw InvalidArgument(space_field(key) + ": " + number_text(value) + " is outside (0, " +
                            number_text(GenomeLimits::max_learning_rate) + "]");
  check_order(min_learning_rate, max_learning_rate, "min_learning_rate", "max_learning_rate");
  for (auto [value, key] : {std::pair{max_parameters, "max_parameters"}, std::pair{max_macs, "max_macs"}})
    if (value < 0)
      throw InvalidArgument(space_field(key) + ": " + std::to_string(value) + " is negative (0 means unbounded)");
}

// ---- cost ----------------------------------------------------------------------------------

// No overflow for any input an image of which fits in memory: a conv's in_c*kh*kw never
// exceeds the values of the map it reads (kernels fit their maps), plan_network() caps the
// map after every layer at 2^26 values and dense layers at 2^16 units, so even 65 weighted
// modules stay far below 2^63.
NetworkCost network_cost(const Genome& genome, Shape input, int64_t classes) {
  NetworkCost cost;
  for (const ModuleSpec& m : plan_network(genome, input, classes)) {
    if (m.kind == ModuleSpec::Kind::Conv2d) {
      const int64_t weights_per_filter = m.in * m.kernel[0] * m.kernel[1];
      cost.parameters += m.out * (weights_per_filter + 1);
      cost.macs += m.output.height * m.output.width * m.out * weights_per_filter;
    } else if (m.kind == ModuleSpec::Kind::Linear) {
      cost.parameters += m.out * (m.in + 1);
      cost.macs += m.in * m.out;
    }
  }
  return cost;
}

// ---- operators -----------------------------------------------------------------------------

Genome random_genome(const SearchSpace& space, Shape input, int64_t classes, uint64_t seed) {
  space.validate();
  check_target(input, classes);
  SplitMix64 rng(hash_keys({seed, kRandomGenomeStream}));
  Genome cheapest;
  double cheapest_overrun = std::numeric_limits<double>::infinity();
  for (int draw = 0; draw < kBudgetDraws; ++draw) {
    Genome genome = draw_genome(space, input, rng);
    const double over = overrun_of(genome, space, input, classes);
    if (over == 0.0) return genome;
    if (over < cheapest_overrun) {
      cheapest = std::move(genome);
      cheapest_overrun = over;
    }
  }
  return repair(cheapest, space, input, classes);
}

Genome crossover(const Genome& a, const Genome& b, const SearchSpace& space, Shape input, int64_t classes,
                 uint64_t seed) {
  space.validate();
  SplitMix64 rng(hash_keys({seed, kCrossoverStream}));
  Genome child;
  child.optimizer = rng.chance(0.5) ? a.optimizer : b.optimizer;
  child.learning_rate = rng.chance(0.5) ? a.learning_rate : b.learning_rate;
  const size_t length = rng.chance(0.5) ? a.layers.size() : b.layers.size();
  for (size_t i = 0; i < length; ++i) {
    if (i >= a.layers.size()) child.layers.push_back(b.layers[i]);
    else if (i >= b.layers.size()) child.layers.push_back(a.layers[i]);
    else child.layers.push_back(rng.chance(0.5) ? a.layers[i] : b.layers[i]);
  }
  return repair(child, space, input, classes);
}

Genome mutate(const Genome& genome, const SearchSpace& space, Shape input, int64_t classes, double chance,
              uint64_t seed, std::vector<std::string>* applied) {
  space.validate();
  check_unit(chance, "chance");
  // The kinds below keep a valid genome valid and within the budget, so they start from one.
  Genome mutated = repair(genome, space, input, classes);
  SplitMix64 fire(hash_keys({seed, kMutateStream}));
  uint64_t stream = 0;
  for (const MutationKind& kind : kMutationKinds) {
    MutationContext context{space, input, classes, SplitMix64(hash_keys({seed, kMutateStream, ++stream}))};
    if (fire.chance(chance) && kind.apply(mutated, context) && applied) applied->emplace_back(kind.name);
  }
  return repair(mutated, space, input, classes);
}

Genome repair(const Genome& genome, const SearchSpace& space, Shape input, int64_t classes) {
  space.validate();
  check_target(input, classes);
  Genome out = genome;
  out.layers.clear();
  Site site{input};
  for (Layer layer : genome.layers) {
    if (!well_formed(layer)) continue;
    if (layer.type == LayerType::Conv2d && !site.flat) layer = fit_conv(layer, space, site);
    if (!fits(layer, site)) continue;
    out.layers.push_back(layer);
    site = after(layer, site);
  }
  if (static_cast<int64_t>(out.layers.size()) > space.max_layers)
    out.layers.resize(static_cast<size_t>(space.max_layers));
  return fit_budget(std::move(out), space, input, classes);
}

void BreedOptions::validate() const {
  if (population < 1) throw InvalidArgument("population: must be at least 1, got " + std::to_string(population));
  check_unit(retain, "retain");
  check_unit(random_select, "random_select");
  check_unit(mutate_chance, "mutate_chance");
}

std::vector<Offspring> breed(const std::vector<Scored>& scored, const BreedOptions& options,
                             const SearchSpace& space, Shape input, int64_t classes, uint64_t seed) {
  options.validate();
  space.validate();
  if (scored.empty()) throw InvalidArgument("scored: at least one scored genome is needed to breed");

  // Rank: best fitness first, NaN last, ties by id. stable_sort keeps the order the same
  // under every standard library.
  std::vector<size_t> ranked(scored.size());
  for (size_t i = 0; i < ranked.size(); ++i) ranked[i] = i;
  std::stable_sort(ranked.begin(), ranked.end(), [&](size_t x, size_t y) {
    const double fx = scored[x].fitness, fy = scored[y].fitness;
    if (std::isnan(fx) != std::isnan(fy)) return std::isnan(fy);
    if (!std::isnan(fx) && fx != fy) return fx > fy;
    return scored[x].id < scored[y].id;
  });

  const auto retain_count = std::min<size_t>(
      static_cast<size_t>(std::max<int64_t>(2, std::llround(options.retain * static_cast<double>(options.population)))),
      scored.size());
  std::vector<const Scored*> kept;
  for (size_t r = 0; r < retain_count; ++r) kept.push_back(&scored[ranked[r]]);
  // Random selection keeps some weaker genomes for diversity; a genome that failed to
  // score (NaN) gets no such second chance, as training it again would fail again.
  SplitMix64 select(hash_keys({seed, kSelectStream}));
  for (size_t r = retain_count; r < ranked.size(); ++r) {
    const Scored& s = scored[ranked[r]];
    if (!std::isnan(s.fitness) && select.chance(options.random_select)) kept.push_back(&s);
  }

  const auto population = static_cast<size_t>(options.population);
  std::vector<Offspring> next;
  std::set<std::string> seen;
  for (const Scored* s : kept) {
    if (next.size() == population) break;
    next.push_back(Offspring{s->genome, {s->id}});
    seen.insert(s->genome.to_json());
  }
  while (next.size() < population) {
    Offspring child;
    for (int attempt = 0; attempt <= kDuplicateRebreeds; ++attempt) {
      SplitMix64 rng(hash_keys({seed, kBreedStream, next.size(), static_cast<uint64_t>(attempt)}));
      if (kept.size() == 1) {
        child = Offspring{mutate(kept[0]->genome, space, input, classes, options.mutate_chance, rng.next()),
                          {kept[0]->id}};
      } else {
        const size_t i = rng.below(kept.size());
        size_t j = rng.below(kept.size() - 1);
        if (j >= i) ++j;
        const Genome mixed = crossover(kept[i]->genome, kept[j]->genome, space, input, classes, rng.next());
        child = Offspring{mutate(mixed, space, input, classes, options.mutate_chance, rng.next()),
                          {kept[i]->id, kept[j]->id}};
      }
      if (!seen.contains(child.genome.to_json())) break;
    }
    seen.insert(child.genome.to_json());
    next.push_back(std::move(child));
  }
  return next;
}

}  // namespace dicebox
