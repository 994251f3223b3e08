// The evolution operators, property-style over many seeds: random genomes are valid and
// inside the space, crossover takes its genes from the parents, mutation reports what it
// changed, repair makes genomes buildable, breeding keeps the best and fills the
// population, and all of them keep to the compute budget; network costs; and the search
// space's presets, JSON form and validation messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>

#include "dicebox/errors.h"
#include "dicebox/evolution.h"
#include "dicebox/random.h"

using namespace dicebox;

// Readable failure messages: genomes and layers print as their canonical JSON.
namespace dicebox {
void PrintTo(const Genome& genome, std::ostream* os) { *os << genome.to_json(); }
void PrintTo(const Layer& layer, std::ostream* os) {
  Genome alone;
  alone.layers = {layer};
  *os << alone.to_json();
}
}  // namespace dicebox

namespace {

constexpr uint64_t kSeeds = 200;
constexpr int64_t kClasses = 10;
const std::vector<Shape> kShapes{{1, 28, 28}, {1, 8, 8}, {3, 32, 32}, {1, 3, 3}};

template <typename T>
bool contains(const std::vector<T>& values, const T& value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

// Every gene of `g` lies inside `space`, the layer order is valid, and the network builds.
::testing::AssertionResult in_space(const Genome& g, const SearchSpace& space, Shape input) {
  auto fail = [&](const std::string& why) { return ::testing::AssertionFailure() << why << " in " << g.to_json(); };
  try {
    plan_network(g, input, kClasses);
  } catch (const InvalidArgument& e) {
    return fail(std::string("does not build: ") + e.what());
  }
  const auto n = static_cast<int64_t>(g.layers.size());
  if (n < space.min_layers || n > space.max_layers) return fail("layer count " + std::to_string(n));
  if (!contains(space.optimizers, g.optimizer)) return fail("optimizer");
  if (g.learning_rate < space.min_learning_rate || g.learning_rate > space.max_learning_rate)
    return fail("learning rate");
  bool seen_dense = false;
  for (const Layer& l : g.layers) {
    if (!contains(space.layer_types, l.type)) return fail("layer type");
    switch (l.type) {
      case LayerType::Dense:
        seen_dense = true;
        if (l.size < space.min_size || l.size > space.max_size) return fail("dense size");
        if (!contains(space.activations, l.activation)) return fail("dense activation");
        break;
      case LayerType::Dropout:
        if (l.rate < space.min_dropout || l.rate > space.max_dropout) return fail("dropout rate");
        break;
      case LayerType::Conv2d:
        if (seen_dense) return fail("conv after dense");
        if (!contains(space.filters, l.filters)) return fail("filters");
        if (l.kernel[0] != l.kernel[1] || !contains(space.kernels, l.kernel[0])) return fail("kernel");
        if (l.stride != std::array<int64_t, 2>{1, 1} || l.padding != Padding::Same) return fail("conv stride/padding");
        if (!contains(space.activations, l.activation)) return fail("conv activation");
        break;
      case LayerType::MaxPool2d:
        if (seen_dense) return fail("maxpool after dense");
        if (l.kernel != std::array<int64_t, 2>{space.pool, space.pool} || l.stride != l.kernel) return fail("pool");
        break;
    }
  }
  return ::testing::AssertionSuccess();
}

bool has_consecutive_dropouts(const Genome& g) {
  for (size_t i = 1; i < g.layers.size(); ++i)
    if (g.layers[i].type == LayerType::Dropout && g.layers[i - 1].type == LayerType::Dropout) return true;
  return false;
}

bool only_dropouts(const Genome& g) {
  return !g.layers.empty() && std::all_of(g.layers.begin(), g.layers.end(),
                                          [](const Layer& l) { return l.type == LayerType::Dropout; });
}

Layer dense(int64_t size) {
  Layer l;
  l.type = LayerType::Dense;
  l.size = size;
  return l;
}

Layer conv(int64_t filters, int64_t kernel) {
  Layer l;
  l.type = LayerType::Conv2d;
  l.filters = filters;
  l.kernel = {kernel, kernel};
  l.stride = {1, 1};
  return l;
}

Layer pool(int64_t size) {
  Layer l;
  l.type = LayerType::MaxPool2d;
  l.kernel = {size, size};
  l.stride = {size, size};
  return l;
}

Genome genome_of(std::vector<Layer> layers) {
  Genome g;
  g.layers = std::move(layers);
  return g;
}

// Layers may be dense or dropout in any order: every layer fits every position.
SearchSpace dense_space() { return SearchSpace::preset("original"); }

// Same-padding convolutions and dropouts in any order: every layer fits every position.
// Unbounded, so that a child's layers are exactly its parents' (the budget could narrow them).
SearchSpace conv_space() {
  SearchSpace s;
  s.layer_types = {LayerType::Conv2d, LayerType::Dropout};
  s.max_parameters = s.max_macs = 0;
  return s;
}

// The network built for `input` is within the space's budget.
::testing::AssertionResult within_budget(const Genome& g, const SearchSpace& space, Shape input) {
  const NetworkCost cost = network_cost(g, input, kClasses);
  if ((space.max_parameters == 0 || cost.parameters <= space.max_parameters) &&
      (space.max_macs == 0 || cost.macs <= space.max_macs))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << cost.parameters << " parameters, " << cost.macs << " MACs for "
                                       << input.channels << "x" << input.height << "x" << input.width << ": "
                                       << g.to_json();
}

std::vector<Scored> population_of(const SearchSpace& space, Shape input, int64_t count, uint64_t seed) {
  std::vector<Scored> out;
  SplitMix64 rng(seed);
  for (int64_t i = 0; i < count; ++i)
    out.push_back(Scored{100 + i, random_genome(space, input, kClasses, seed * 1000 + static_cast<uint64_t>(i)),
                         rng.uniform(0.0, 1.0)});
  return out;
}

std::string space_error(const std::string& text) {
  try {
    SearchSpace::from_json(text);
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// ---- random genomes -------------------------------------------------------------------------

TEST(RandomGenome, ValidAndInsideTheSpaceForSeveralInputs) {
  const SearchSpace space = SearchSpace::preset("default");
  for (const Shape& shape : kShapes)
    for (uint64_t seed = 0; seed < kSeeds; ++seed) {
      const Genome g = random_genome(space, shape, kClasses, seed);
      ASSERT_TRUE(in_space(g, space, shape)) << "shape " << shape.height << "x" << shape.width << " seed " << seed;
      EXPECT_FALSE(has_consecutive_dropouts(g)) << g.to_json();
      EXPECT_FALSE(only_dropouts(g)) << g.to_json();
    }
}

TEST(RandomGenome, OriginalPresetStaysInItsBounds) {
  const SearchSpace space = SearchSpace::preset("original");
  std::set<int64_t> lengths;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{1, 28, 28}, kClasses, seed);
    ASSERT_TRUE(in_space(g, space, Shape{1, 28, 28})) << seed;
    lengths.insert(static_cast<int64_t>(g.layers.size()));
  }
  EXPECT_GT(lengths.size(), 10u);  // lengths spread over 1..21
}

TEST(RandomGenome, SameSeedSameGenomeOtherSeedsDiffer) {
  const SearchSpace space = SearchSpace::preset("default");
  std::set<std::string> distinct;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{1, 28, 28}, kClasses, seed);
    EXPECT_EQ(g, random_genome(space, Shape{1, 28, 28}, kClasses, seed));
    distinct.insert(g.to_json());
  }
  EXPECT_GT(distinct.size(), kSeeds * 9 / 10);
}

TEST(RandomGenome, DrawsEveryChoiceOfTheSpace) {
  const SearchSpace space = SearchSpace::preset("default");
  std::set<LayerType> types;
  std::set<OptimizerName> optimizers;
  std::set<Activation> activations;
  std::set<int64_t> filters, kernels;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{1, 28, 28}, kClasses, seed);
    optimizers.insert(g.optimizer);
    for (const Layer& l : g.layers) {
      types.insert(l.type);
      if (l.type == LayerType::Dense || l.type == LayerType::Conv2d) activations.insert(l.activation);
      if (l.type == LayerType::Conv2d) {
        filters.insert(l.filters);
        kernels.insert(l.kernel[0]);
      }
    }
  }
  EXPECT_EQ(types.size(), space.layer_types.size());
  EXPECT_EQ(optimizers.size(), space.optimizers.size());
  EXPECT_EQ(activations.size(), space.activations.size());
  EXPECT_EQ(filters.size(), space.filters.size());
  EXPECT_EQ(kernels.size(), space.kernels.size());
}

TEST(RandomGenome, TinyInputsNeverGetKernelsLargerThanTheMap) {
  const SearchSpace space = SearchSpace::preset("default");  // kernels {3, 5}, pool 2
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{1, 3, 3}, kClasses, seed);
    bool pooled = false;  // 3x3 pools to 1x1, where no kernel and no pool fits
    for (const Layer& l : g.layers) {
      if (l.type == LayerType::Conv2d) {
        EXPECT_TRUE(l.kernel[0] == 3 && !pooled) << g.to_json();
      }
      if (l.type == LayerType::MaxPool2d) {
        EXPECT_FALSE(pooled) << g.to_json();
      }
      pooled = pooled || l.type == LayerType::MaxPool2d;
    }
  }
}

// ---- crossover -------------------------------------------------------------------------------

TEST(Crossover, GenesComeFromTheParents) {
  for (const SearchSpace& space : {dense_space(), conv_space()}) {
    bool took_from_a = false, took_from_b = false;
    for (uint64_t seed = 0; seed < kSeeds; ++seed) {
      const Genome a = random_genome(space, Shape{1, 28, 28}, kClasses, 2 * seed);
      const Genome b = random_genome(space, Shape{1, 28, 28}, kClasses, 2 * seed + 1);
      const Genome child = crossover(a, b, space, Shape{1, 28, 28}, kClasses, seed);
      ASSERT_TRUE(in_space(child, space, Shape{1, 28, 28}));
      EXPECT_TRUE(child.optimizer == a.optimizer || child.optimizer == b.optimizer);
      EXPECT_TRUE(child.learning_rate == a.learning_rate || child.learning_rate == b.learning_rate);
      ASSERT_TRUE(child.layers.size() == a.layers.size() || child.layers.size() == b.layers.size());
      for (size_t i = 0; i < child.layers.size(); ++i) {
        const bool from_a = i < a.layers.size() && child.layers[i] == a.layers[i];
        const bool from_b = i < b.layers.size() && child.layers[i] == b.layers[i];
        EXPECT_TRUE(from_a || from_b) << "seed " << seed << " layer " << i;
        took_from_a = took_from_a || (from_a && !from_b);
        took_from_b = took_from_b || (from_b && !from_a);
      }
      EXPECT_EQ(child, crossover(a, b, space, Shape{1, 28, 28}, kClasses, seed));
    }
    EXPECT_TRUE(took_from_a && took_from_b);
  }
}

TEST(Crossover, ChildrenOfMixedParentsAreRepaired) {
  // Default-space parents on small inputs: a child can get a conv after a dense, or a
  // kernel that one parent's pools made too large.
  const SearchSpace space = SearchSpace::preset("default");
  for (const Shape& shape : kShapes)
    for (uint64_t seed = 0; seed < kSeeds; ++seed) {
      const Genome a = random_genome(space, shape, kClasses, 2 * seed);
      const Genome b = random_genome(space, shape, kClasses, 2 * seed + 1);
      const Genome child = crossover(a, b, space, shape, kClasses, seed);
      EXPECT_NO_THROW(plan_network(child, shape, kClasses)) << child.to_json();
      EXPECT_LE(static_cast<int64_t>(child.layers.size()), space.max_layers);
    }
}

// ---- mutation --------------------------------------------------------------------------------

TEST(Mutate, ChanceOneAlwaysChangesChanceZeroNever) {
  const SearchSpace space = SearchSpace::preset("default");
  for (const Shape& shape : kShapes)
    for (uint64_t seed = 0; seed < kSeeds; ++seed) {
      const Genome g = random_genome(space, shape, kClasses, seed);
      std::vector<std::string> applied;
      const Genome changed = mutate(g, space, shape, kClasses, 1.0, seed, &applied);
      EXPECT_NE(changed, g);
      EXPECT_FALSE(applied.empty());
      EXPECT_TRUE(in_space(changed, space, shape));
      applied.clear();
      EXPECT_EQ(mutate(g, space, shape, kClasses, 0.0, seed, &applied), g);
      EXPECT_TRUE(applied.empty());
    }
}

TEST(Mutate, ReportedKindsAreTheChangesMade) {
  const SearchSpace space = SearchSpace::preset("default");
  const std::vector<std::string> kinds{"optimizer", "learning_rate", "add_layer", "remove_layer", "replace_layer",
                                       "size", "filters", "kernel", "activation", "rate"};
  std::map<std::string, int> reported;
  for (uint64_t seed = 0; seed < 5 * kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{3, 32, 32}, kClasses, seed);
    std::vector<std::string> applied;
    const Genome m = mutate(g, space, Shape{3, 32, 32}, kClasses, 0.15, seed, &applied);
    ASSERT_TRUE(in_space(m, space, Shape{3, 32, 32}));
    auto did = [&](const std::string& kind) { return contains(applied, kind); };
    // Reported in the fixed order, each at most once, only known names.
    size_t next_allowed = 0;
    for (const std::string& kind : applied) {
      const auto at = static_cast<size_t>(std::find(kinds.begin(), kinds.end(), kind) - kinds.begin());
      ASSERT_LT(at, kinds.size()) << kind;
      EXPECT_GE(at, next_allowed) << kind;
      next_allowed = at + 1;
      ++reported[kind];
    }
    EXPECT_EQ(did("optimizer"), m.optimizer != g.optimizer);
    EXPECT_EQ(did("learning_rate"), m.learning_rate != g.learning_rate);
    if (applied.empty()) {
      EXPECT_EQ(m, g);
    }
    const auto delta = static_cast<int>(m.layers.size()) - static_cast<int>(g.layers.size());
    EXPECT_EQ(delta, int{did("add_layer")} - int{did("remove_layer")});
    // A single per-layer kind changes exactly one layer, and only that field.
    if (applied.size() == 1 && m.layers.size() == g.layers.size() && applied[0] != "replace_layer" &&
        applied[0] != "add_layer" && applied[0] != "remove_layer" && applied[0] != "optimizer" &&
        applied[0] != "learning_rate") {
      int differing = 0;
      for (size_t i = 0; i < g.layers.size(); ++i) {
        if (m.layers[i] == g.layers[i]) continue;
        ++differing;
        Layer restored = m.layers[i];
        const std::string& kind = applied[0];
        if (kind == "size") restored.size = g.layers[i].size;
        if (kind == "filters") restored.filters = g.layers[i].filters;
        if (kind == "kernel") restored.kernel = g.layers[i].kernel;
        if (kind == "activation") restored.activation = g.layers[i].activation;
        if (kind == "rate") restored.rate = g.layers[i].rate;
        EXPECT_EQ(restored, g.layers[i]) << kind;
      }
      EXPECT_EQ(differing, 1) << applied[0];
    }
    if (applied.size() == 1 && applied[0] == "replace_layer") {
      int differing = 0;
      for (size_t i = 0; i < g.layers.size(); ++i) differing += m.layers[i].type != g.layers[i].type;
      EXPECT_EQ(differing, 1);
    }
  }
  for (const std::string& kind : kinds) EXPECT_GT(reported[kind], 0) << kind;
}

TEST(Mutate, LearningRateChangesByAtMostTwofoldInsideTheRange) {
  const SearchSpace space = SearchSpace::preset("default");
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{1, 28, 28}, kClasses, seed);
    const Genome m = mutate(g, space, Shape{1, 28, 28}, kClasses, 1.0, seed);
    EXPECT_NE(m.learning_rate, g.learning_rate);
    EXPECT_GE(m.learning_rate, space.min_learning_rate);
    EXPECT_LE(m.learning_rate, space.max_learning_rate);
    EXPECT_LE(m.learning_rate, 2 * g.learning_rate * (1 + 1e-12));
    EXPECT_GE(m.learning_rate, 0.5 * g.learning_rate * (1 - 1e-12));
  }
}

TEST(Mutate, RepeatedMutationStaysInsideTheSpace) {
  for (const SearchSpace& space : {SearchSpace::preset("default"), SearchSpace::preset("original")})
    for (const Shape& shape : kShapes)
      for (uint64_t seed = 0; seed < 20; ++seed) {
        Genome g = random_genome(space, shape, kClasses, seed);
        for (uint64_t step = 0; step < 30; ++step) {
          g = mutate(g, space, shape, kClasses, 0.3, seed * 100 + step);
          ASSERT_TRUE(in_space(g, space, shape)) << "seed " << seed << " step " << step;
        }
      }
}

TEST(Mutate, KindsWithNothingToChangeAreNotReported) {
  SearchSpace space = SearchSpace::preset("default");
  space.optimizers = {OptimizerName::Adam};
  space.min_learning_rate = space.max_learning_rate = 0.001;
  space.layer_types = {LayerType::Dense};
  space.min_layers = space.max_layers = 1;
  space.min_size = space.max_size = 32;
  space.activations = {Activation::Relu};
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{1, 8, 8}, kClasses, seed);
    std::vector<std::string> applied;
    EXPECT_EQ(mutate(g, space, Shape{1, 8, 8}, kClasses, 1.0, seed, &applied), g);
    EXPECT_TRUE(applied.empty()) << applied.front();
  }
}

// ---- repair ----------------------------------------------------------------------------------

TEST(Repair, DropsConvAfterDenseAndFitsKernelsAndPools) {
  const SearchSpace space = SearchSpace::preset("default");  // kernels {3, 5}, pool 2
  Genome g = repair(genome_of({dense(8), conv(4, 3), pool(2), dense(4)}), space, Shape{1, 28, 28}, kClasses);
  EXPECT_EQ(g.layers, (std::vector<Layer>{dense(8), dense(4)}));

  g = repair(genome_of({conv(4, 5)}), space, Shape{1, 3, 3}, kClasses);  // shrinks to the largest that fits
  EXPECT_EQ(g.layers, std::vector<Layer>{conv(4, 3)});

  g = repair(genome_of({conv(4, 5), dense(8)}), space, Shape{1, 2, 2}, kClasses);  // no kernel fits: dropped
  EXPECT_EQ(g.layers, std::vector<Layer>{dense(8)});

  // 7x7 pools to 3x3 (the conv shrinks), then to 1x1 (no pool or conv fits any more).
  g = repair(genome_of({pool(2), conv(4, 5), pool(2), pool(2), conv(4, 3)}), space, Shape{1, 7, 7}, kClasses);
  EXPECT_EQ(g.layers, (std::vector<Layer>{pool(2), conv(4, 3), pool(2)}));

  // Too many values per image. Unbounded: the default budget would narrow it further.
  SearchSpace unbounded = space;
  unbounded.max_parameters = unbounded.max_macs = 0;
  g = repair(genome_of({conv(4096, 3)}), unbounded, Shape{1, 512, 512}, kClasses);
  EXPECT_EQ(g.layers, std::vector<Layer>{conv(64, 3)});

  std::vector<Layer> many(10, dense(8));
  EXPECT_EQ(repair(genome_of(many), space, Shape{1, 28, 28}, kClasses).layers.size(), 6u);

  Genome malformed = genome_of({dense(0), dense(8)});
  EXPECT_EQ(repair(malformed, space, Shape{1, 28, 28}, kClasses).layers, std::vector<Layer>{dense(8)});
}

TEST(Repair, LeavesValidGenomesAlone) {
  const SearchSpace space = SearchSpace::preset("default");
  for (const Shape& shape : kShapes)
    for (uint64_t seed = 0; seed < kSeeds; ++seed) {
      const Genome g = random_genome(space, shape, kClasses, seed);
      EXPECT_EQ(repair(g, space, shape, kClasses), g);
    }
}

TEST(Repair, RepairedGenomesAlwaysBuild) {
  // Default-space genomes drawn for a large input, forced onto smaller ones.
  const SearchSpace space = SearchSpace::preset("default");
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Genome g = random_genome(space, Shape{3, 32, 32}, kClasses, seed);
    for (const Shape& shape : kShapes) EXPECT_NO_THROW(plan_network(repair(g, space, shape, kClasses), shape, kClasses));
  }
}

// ---- breeding --------------------------------------------------------------------------------

TEST(Breed, KeepsTheBestInRankOrderAndFillsWithChildrenOfTwoParents) {
  const SearchSpace space = SearchSpace::preset("default");
  BreedOptions options;
  options.random_select = 0.0;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const std::vector<Scored> scored = population_of(space, Shape{1, 8, 8}, 20, seed);
    std::vector<Scored> ranked = scored;
    std::sort(ranked.begin(), ranked.end(), [](const Scored& x, const Scored& y) { return x.fitness > y.fitness; });
    const std::vector<Offspring> next = breed(scored, options, space, Shape{1, 8, 8}, kClasses, seed);
    ASSERT_EQ(next.size(), 20u);
    std::set<int64_t> kept;
    for (size_t i = 0; i < 8; ++i) {  // round(0.4 * 20)
      EXPECT_EQ(next[i].genome, ranked[i].genome);
      EXPECT_EQ(next[i].parents, std::vector<int64_t>{ranked[i].id});
      kept.insert(ranked[i].id);
    }
    for (size_t i = 8; i < next.size(); ++i) {
      ASSERT_EQ(next[i].parents.size(), 2u);
      EXPECT_NE(next[i].parents[0], next[i].parents[1]);
      EXPECT_TRUE(kept.contains(next[i].parents[0]) && kept.contains(next[i].parents[1]));
      EXPECT_NO_THROW(plan_network(next[i].genome, Shape{1, 8, 8}, kClasses));
    }
  }
}

TEST(Breed, IsDeterministicForASeed) {
  const SearchSpace space = SearchSpace::preset("default");
  const std::vector<Scored> scored = population_of(space, Shape{1, 28, 28}, 12, 7);
  auto forms = [&](uint64_t seed) {
    std::vector<std::string> out;
    for (const Offspring& o : breed(scored, BreedOptions{}, space, Shape{1, 28, 28}, kClasses, seed))
      out.push_back(o.genome.to_json());
    return out;
  };
  for (uint64_t seed = 0; seed < 20; ++seed) EXPECT_EQ(forms(seed), forms(seed));
  EXPECT_NE(forms(1), forms(2));
}

TEST(Breed, RanksNaNLastAndBreaksTiesById) {
  const SearchSpace space = SearchSpace::preset("default");
  std::vector<Scored> scored = population_of(space, Shape{1, 8, 8}, 6, 3);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> fitness{nan, 0.5, nan, 0.9, 0.5, 0.1};  // ids 100..105
  for (size_t i = 0; i < scored.size(); ++i) scored[i].fitness = fitness[i];
  BreedOptions options;
  options.population = 6;
  options.retain = 1.0;
  const std::vector<Offspring> next = breed(scored, options, space, Shape{1, 8, 8}, kClasses, 1);
  ASSERT_EQ(next.size(), 6u);
  const std::vector<int64_t> expected{103, 101, 104, 105, 100, 102};
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(next[i].parents, std::vector<int64_t>{expected[i]});
}

TEST(Breed, NaNGenomesAreNotRandomlySelected) {
  const SearchSpace space = SearchSpace::preset("default");
  std::vector<Scored> scored = population_of(space, Shape{1, 8, 8}, 10, 5);
  for (size_t i = 5; i < scored.size(); ++i) scored[i].fitness = std::numeric_limits<double>::quiet_NaN();
  BreedOptions options;
  options.population = 10;
  options.retain = 0.2;
  options.random_select = 1.0;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const std::vector<Offspring> next = breed(scored, options, space, Shape{1, 8, 8}, kClasses, seed);
    size_t survivors = 0;
    while (survivors < next.size() && next[survivors].parents.size() == 1) ++survivors;
    EXPECT_EQ(survivors, 5u);  // the 2 retained and the 3 other scored ones, none of the NaNs
    for (size_t i = 0; i < survivors; ++i) EXPECT_LT(next[i].parents[0], 105);
  }
}

TEST(Breed, ALoneParentSurvivesAndItsMutantsFillThePopulation) {
  const SearchSpace space = SearchSpace::preset("default");
  const std::vector<Scored> scored = population_of(space, Shape{1, 28, 28}, 1, 11);
  BreedOptions options;
  options.population = 6;
  options.mutate_chance = 0.5;
  const std::vector<Offspring> next = breed(scored, options, space, Shape{1, 28, 28}, kClasses, 4);
  ASSERT_EQ(next.size(), 6u);
  EXPECT_EQ(next[0].genome, scored[0].genome);
  std::set<std::string> forms;
  for (const Offspring& o : next) {
    EXPECT_EQ(o.parents, std::vector<int64_t>{100});
    EXPECT_TRUE(in_space(o.genome, space, Shape{1, 28, 28}));
    forms.insert(o.genome.to_json());
  }
  EXPECT_EQ(forms.size(), next.size());  // duplicates are bred again
}

TEST(Breed, AvoidsDuplicatesAndHonoursSmallPopulations) {
  const SearchSpace space = SearchSpace::preset("default");
  const std::vector<Scored> scored = population_of(space, Shape{1, 28, 28}, 20, 9);
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::set<std::string> forms;
    for (const Offspring& o : breed(scored, BreedOptions{}, space, Shape{1, 28, 28}, kClasses, seed))
      forms.insert(o.genome.to_json());
    EXPECT_EQ(forms.size(), 20u) << seed;
  }
  for (int64_t population : {1, 2, 3}) {
    BreedOptions options;
    options.population = population;
    EXPECT_EQ(breed(scored, options, space, Shape{1, 28, 28}, kClasses, 0).size(), static_cast<size_t>(population));
  }
}

TEST(Breed, RefusesBadArgumentsByName) {
  const SearchSpace space = SearchSpace::preset("default");
  auto error = [&](const std::vector<Scored>& scored, const BreedOptions& options) -> std::string {
    try {
      breed(scored, options, space, Shape{1, 8, 8}, kClasses, 0);
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "";
  };
  const std::vector<Scored> scored = population_of(space, Shape{1, 8, 8}, 4, 1);
  EXPECT_NE(error({}, BreedOptions{}).find("scored"), std::string::npos);
  BreedOptions bad;
  bad.population = 0;
  EXPECT_NE(error(scored, bad).find("population"), std::string::npos);
  bad = BreedOptions{};
  bad.retain = 1.5;
  EXPECT_NE(error(scored, bad).find("retain"), std::string::npos);
  bad = BreedOptions{};
  bad.random_select = -0.1;
  EXPECT_NE(error(scored, bad).find("random_select"), std::string::npos);
  bad = BreedOptions{};
  bad.mutate_chance = std::numeric_limits<double>::quiet_NaN();
  EXPECT_NE(error(scored, bad).find("mutate_chance"), std::string::npos);
}

// ---- compute budget --------------------------------------------------------------------------

TEST(NetworkCost, MatchesHandCounts) {
  // No layers: the output layer alone, 784 -> 10.
  NetworkCost cost = network_cost(Genome{}, Shape{1, 28, 28}, kClasses);
  EXPECT_EQ(cost.parameters, 784 * 10 + 10);
  EXPECT_EQ(cost.macs, 784 * 10);

  Layer dropout;
  dropout.type = LayerType::Dropout;
  dropout.rate = 0.5;
  // MLP 784 -> 64 -> (dropout) -> 32 -> 10.
  cost = network_cost(genome_of({dense(64), dropout, dense(32)}), Shape{1, 28, 28}, kClasses);
  EXPECT_EQ(cost.parameters, (784 * 64 + 64) + (64 * 32 + 32) + (32 * 10 + 10));  // 52'650
  EXPECT_EQ(cost.macs, 784 * 64 + 64 * 32 + 32 * 10);                           // 52'544

  // The MNIST CNN the default budget is sized by: same-padded 3x3 convs keep the map, each
  // pool halves it (28 -> 14 -> 7), so the dense layer reads 64 * 7 * 7 = 3136 features.
  cost = network_cost(genome_of({conv(32, 3), pool(2), conv(64, 3), pool(2), dense(128)}), Shape{1, 28, 28}, kClasses);
  EXPECT_EQ(cost.parameters, 32 * (1 * 9 + 1) + 64 * (32 * 9 + 1) + (3136 * 128 + 128) + (128 * 10 + 10));  // 421'642
  EXPECT_EQ(cost.macs, 28 * 28 * 32 * 1 * 9 + 14 * 14 * 64 * 32 * 9 + 3136 * 128 + 128 * 10);            // 4'241'152

  // A 2x2 "same" kernel pads unevenly (a ZeroPad2d module, which costs nothing): 5x5x3 ->
  // 5x5x4, then 100 features -> 10.
  cost = network_cost(genome_of({conv(4, 2)}), Shape{3, 5, 5}, kClasses);
  EXPECT_EQ(cost.parameters, 4 * (3 * 2 * 2 + 1) + (100 * 10 + 10));
  EXPECT_EQ(cost.macs, 5 * 5 * 4 * 3 * 2 * 2 + 100 * 10);

  EXPECT_THROW(network_cost(genome_of({conv(4, 7)}), Shape{1, 5, 5}, kClasses), InvalidArgument);
}

TEST(Budget, DefaultPresetAndItsReferenceNetwork) {
  const SearchSpace space = SearchSpace::preset("default");
  EXPECT_EQ(space.max_parameters, 1'000'000);
  EXPECT_EQ(space.max_macs, 20'000'000);
  const Genome cnn = genome_of({conv(32, 3), pool(2), conv(64, 3), pool(2), dense(128)});
  EXPECT_TRUE(within_budget(cnn, space, Shape{1, 28, 28}));
  EXPECT_EQ(repair(cnn, space, Shape{1, 28, 28}, kClasses), cnn);
}

TEST(Budget, RandomMutatedAndBredGenomesStayWithinTheDefaultBudget) {
  const SearchSpace space = SearchSpace::preset("default");
  BreedOptions options;
  options.population = 6;
  for (const Shape& shape : {Shape{1, 28, 28}, Shape{3, 32, 32}, Shape{1, 8, 8}})
    for (uint64_t seed = 0; seed < kSeeds; ++seed) {
      const Genome a = random_genome(space, shape, kClasses, 2 * seed);
      const Genome b = random_genome(space, shape, kClasses, 2 * seed + 1);
      ASSERT_TRUE(within_budget(a, space, shape)) << "seed " << seed;
      ASSERT_TRUE(in_space(a, space, shape)) << "seed " << seed;
      for (double chance : {0.3, 1.0}) {
        const Genome m = mutate(a, space, shape, kClasses, chance, seed);
        ASSERT_TRUE(within_budget(m, space, shape)) << "seed " << seed << " chance " << chance;
        ASSERT_TRUE(in_space(m, space, shape)) << "seed " << seed << " chance " << chance;
      }
      const Genome child = crossover(a, b, space, shape, kClasses, seed);
      ASSERT_TRUE(within_budget(child, space, shape)) << "seed " << seed;
      ASSERT_TRUE(in_space(child, space, shape)) << "seed " << seed;
      for (const Offspring& o : breed(population_of(space, shape, 4, seed), options, space, shape, kClasses, seed)) {
        ASSERT_TRUE(within_budget(o.genome, space, shape)) << "seed " << seed;
        ASSERT_TRUE(in_space(o.genome, space, shape)) << "seed " << seed;
      }
    }
}

TEST(Budget, RepairNarrowsAMonsterDeterministically) {
  const SearchSpace space = SearchSpace::preset("default");
  const Shape mnist{1, 28, 28};
  // Three 64-filter 5x5 convs at full resolution, then 64 * 28 * 28 features -> 256 units:
  // ~13M parameters and ~175M MACs per image.
  const Genome monster = genome_of({conv(64, 5), conv(64, 5), conv(64, 5), dense(256)});
  const NetworkCost before = network_cost(monster, mnist, kClasses);
  EXPECT_GT(before.parameters, space.max_parameters);
  EXPECT_GT(before.macs, space.max_macs);

  const Genome repaired = repair(monster, space, mnist, kClasses);
  EXPECT_TRUE(within_budget(repaired, space, mnist));
  EXPECT_TRUE(in_space(repaired, space, mnist));
  EXPECT_EQ(repaired, repair(monster, space, mnist, kClasses));
  EXPECT_EQ(repair(repaired, space, mnist, kClasses), repaired);
  // Narrowing alone suffices here, so every layer stays, no wider than before.
  ASSERT_EQ(repaired.layers.size(), monster.layers.size());
  for (size_t i = 0; i < monster.layers.size(); ++i) {
    EXPECT_EQ(repaired.layers[i].type, monster.layers[i].type);
    EXPECT_EQ(repaired.layers[i].kernel, monster.layers[i].kernel);
    EXPECT_LE(repaired.layers[i].filters, monster.layers[i].filters);
    EXPECT_LE(repaired.layers[i].size, monster.layers[i].size);
  }
  EXPECT_NE(repaired, monster);
}

TEST(Budget, RepairDropsLayersWhenNarrowingCannotHelp) {
  SearchSpace space = SearchSpace::preset("default");
  space.max_macs = 10'000;
  // The conv alone costs 28 * 28 * 8 * 9 = 56'448 MACs and is at the fewest filters (8),
  // the dense layer at min_size: dropping the conv is what gets within the budget.
  Genome g = repair(genome_of({conv(8, 3), pool(2), dense(16)}), space, Shape{1, 28, 28}, kClasses);
  EXPECT_EQ(g.layers, (std::vector<Layer>{pool(2), dense(16)}));
  EXPECT_TRUE(within_budget(g, space, Shape{1, 28, 28}));

  // A budget below even the bare output layer (7850 parameters): every layer goes, and the
  // empty genome (a linear classifier) is returned rather than an error.
  space.max_parameters = 100;
  g = repair(genome_of({conv(8, 3), pool(2), dense(16)}), space, Shape{1, 28, 28}, kClasses);
  EXPECT_TRUE(g.layers.empty()) << g.to_json();
  EXPECT_NO_THROW(mutate(g, space, Shape{1, 28, 28}, kClasses, 1.0, 0));
}

TEST(Budget, ZeroMeansUnbounded) {
  // The original preset has no budget: a 21-layer 1597-wide MLP (~52M parameters) is drawn
  // as is from a space that allows only that, and repair and mutation leave it alone.
  SearchSpace space = SearchSpace::preset("original");
  EXPECT_EQ(space.max_parameters, 0);
  EXPECT_EQ(space.max_macs, 0);
  space.layer_types = {LayerType::Dense};
  space.min_layers = 21;
  space.min_size = 1597;
  const Genome wide = random_genome(space, Shape{1, 28, 28}, kClasses, 0);
  ASSERT_EQ(wide.layers.size(), 21u);
  for (const Layer& l : wide.layers) EXPECT_EQ(l.size, 1597);
  EXPECT_GT(network_cost(wide, Shape{1, 28, 28}, kClasses).parameters, 50'000'000);
  EXPECT_EQ(repair(wide, space, Shape{1, 28, 28}, kClasses), wide);
  EXPECT_EQ(mutate(wide, space, Shape{1, 28, 28}, kClasses, 0.0, 0), wide);

  // The same genome under a budget is narrowed.
  space.max_parameters = 1'000'000;
  space.min_size = 1;
  const Genome narrowed = repair(wide, space, Shape{1, 28, 28}, kClasses);
  EXPECT_TRUE(within_budget(narrowed, space, Shape{1, 28, 28}));
  EXPECT_EQ(narrowed.layers.size(), 21u);

  // Undisturbed original draws go past the default budget.
  const SearchSpace original = SearchSpace::preset("original");
  bool over = false;
  for (uint64_t seed = 0; seed < kSeeds && !over; ++seed)
    over = !within_budget(random_genome(original, Shape{1, 28, 28}, kClasses, seed), SearchSpace{}, Shape{1, 28, 28});
  EXPECT_TRUE(over);
}

TEST(Budget, MutationKindsThatFireKeepTheirChangeUnderATightBudget) {
  // A budget that a good share of draws and mutations run into.
  SearchSpace space = SearchSpace::preset("default");
  space.max_parameters = 60'000;
  space.max_macs = 2'000'000;
  const Shape mnist{1, 28, 28};
  std::map<std::string, int> reported;
  for (uint64_t seed = 0; seed < 2 * kSeeds; ++seed) {
    const Genome g = random_genome(space, mnist, kClasses, seed);
    ASSERT_TRUE(within_budget(g, space, mnist));
    std::vector<std::string> applied;
    const Genome m = mutate(g, space, mnist, kClasses, 0.15, seed, &applied);
    ASSERT_TRUE(within_budget(m, space, mnist));
    ASSERT_TRUE(in_space(m, space, mnist));
    auto did = [&](const std::string& kind) { return contains(applied, kind); };
    EXPECT_EQ(did("optimizer"), m.optimizer != g.optimizer);
    EXPECT_EQ(did("learning_rate"), m.learning_rate != g.learning_rate);
    EXPECT_EQ(static_cast<int>(m.layers.size()) - static_cast<int>(g.layers.size()),
              int{did("add_layer")} - int{did("remove_layer")});
    if (applied.size() == 1) {
      EXPECT_NE(m, g) << applied[0];
    }
    for (const std::string& kind : applied) ++reported[kind];
  }
  for (const char* kind : {"add_layer", "remove_layer", "replace_layer", "size", "filters", "kernel"})
    EXPECT_GT(reported[kind], 0) << kind;
}

// ---- search space ----------------------------------------------------------------------------

TEST(SearchSpace, PresetsAndJsonRoundTrip) {
  const SearchSpace original = SearchSpace::preset("original");
  EXPECT_EQ(original.max_size, 1597);
  EXPECT_EQ(original.min_size, 1);
  EXPECT_EQ(original.max_layers, 21);
  EXPECT_EQ(original.activations.size(), 12u);
  EXPECT_EQ(original.optimizers.size(), 7u);
  EXPECT_EQ(original.layer_types, (std::vector<LayerType>{LayerType::Dense, LayerType::Dropout}));
  for (const SearchSpace& s : {SearchSpace::preset("default"), original})
    EXPECT_EQ(SearchSpace::from_json(s.to_json()).to_json(), s.to_json());
  EXPECT_NE(SearchSpace{}.to_json().find(R"("max_macs":20000000)"), std::string::npos);
  EXPECT_NE(SearchSpace{}.to_json().find(R"("max_parameters":1000000)"), std::string::npos);
  const SearchSpace budget = SearchSpace::from_json(R"({"max_parameters": 5000, "max_macs": 0})");
  EXPECT_EQ(budget.max_parameters, 5000);
  EXPECT_EQ(budget.max_macs, 0);
  EXPECT_EQ(SearchSpace::from_json(budget.to_json()).to_json(), budget.to_json());
  EXPECT_EQ(SearchSpace::from_json(R"({"max_macs": 7})").max_parameters, 1'000'000);  // missing: the default
  EXPECT_EQ(SearchSpace::from_json("{}").to_json(), SearchSpace{}.to_json());
  const SearchSpace custom = SearchSpace::from_json(
      R"({"layer_types": ["conv2d", "dense"], "filters": [4], "kernels": [3], "pool": 3, "min_size": 2,
          "max_size": 2, "activations": ["tanh"], "optimizers": ["sgd"], "min_learning_rate": 0.001})");
  EXPECT_EQ(custom.layer_types, (std::vector<LayerType>{LayerType::Conv2d, LayerType::Dense}));
  EXPECT_EQ(custom.pool, 3);
  EXPECT_EQ(custom.max_layers, 6);  // missing fields keep the defaults
  EXPECT_EQ(SearchSpace::from_json(custom.to_json()).to_json(), custom.to_json());
  try {
    SearchSpace::preset("huge");
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("default, original"), std::string::npos);
  }
}

TEST(SearchSpace, EveryValidationErrorNamesItsField) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {R"({"layer_types": []})", "space.layer_types"},
      {R"({"layer_types": ["lstm"]})", "space.layer_types[0]"},
      {R"({"min_layers": 0})", "space.min_layers"},
      {R"({"max_layers": 65})", "space.max_layers"},
      {R"({"min_layers": 5, "max_layers": 4})", "space.max_layers"},
      {R"({"min_size": 0})", "space.min_size"},
      {R"({"max_size": 70000})", "space.max_size"},
      {R"({"min_size": 100, "max_size": 50})", "space.max_size"},
      {R"({"filters": []})", "space.filters"},
      {R"({"filters": [8, 5000]})", "space.filters"},
      {R"({"filters": [8.5]})", "space.filters[0]"},
      {R"({"kernels": [0]})", "space.kernels"},
      {R"({"pool": 0})", "space.pool"},
      {R"({"min_dropout": -0.1})", "space.min_dropout"},
      {R"({"max_dropout": 1.0})", "space.max_dropout"},
      {R"({"min_dropout": 0.4, "max_dropout": 0.2})", "space.max_dropout"},
      {R"({"activations": []})", "space.activations"},
      {R"({"activations": ["gelu"]})", "space.activations[0]"},
      {R"({"optimizers": []})", "space.optimizers"},
      {R"({"optimizers": ["adamw"]})", "space.optimizers[0]"},
      {R"({"min_learning_rate": 0})", "space.min_learning_rate"},
      {R"({"max_learning_rate": 11})", "space.max_learning_rate"},
      {R"({"min_learning_rate": 0.01, "max_learning_rate": 0.001})", "space.max_learning_rate"},
      {R"({"max_layers": "six"})", "space.max_layers"},
      {R"({"max_parameters": -1})", "space.max_parameters"},
      {R"({"max_macs": -20000000})", "space.max_macs"},
      {R"({"max_macs": 1.5})", "space.max_macs"},
      {R"({"neurons": 5})", "space.neurons"},
      {R"([1, 2])", "space"},
      {"{not json", "space"},
  };
  for (const auto& [text, field] : cases) {
    const std::string e = space_error(text);
    EXPECT_EQ(e.rfind(field + ":", 0), 0u) << text << " gave: " << e;
  }
}

TEST(SearchSpace, OperatorsRefuseAnInvalidSpaceOrTarget) {
  SearchSpace space;
  space.kernels.clear();
  EXPECT_THROW(random_genome(space, Shape{1, 8, 8}, kClasses, 0), InvalidArgument);
  EXPECT_THROW(random_genome(SearchSpace{}, Shape{1, 0, 8}, kClasses, 0), InvalidArgument);
  EXPECT_THROW(random_genome(SearchSpace{}, Shape{1, 8, 8}, 1, 0), InvalidArgument);
  const Genome g = random_genome(SearchSpace{}, Shape{1, 8, 8}, kClasses, 0);
  EXPECT_THROW(mutate(g, SearchSpace{}, Shape{1, 8, 8}, kClasses, 2.0, 0), InvalidArgument);
}
