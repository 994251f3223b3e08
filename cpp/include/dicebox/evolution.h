// The evolution operators: random genomes drawn from a search space, crossover, mutation
// and selection/breeding of the next generation. Pure functions of their arguments and
// seed (all draws go through dicebox/random.h), so the same seed and scores give the same
// genomes in the same order on every machine. Every genome they return is valid for the
// given input shape: no conv after a dense layer, no kernel larger than the feature map
// that reaches it, no feature map below 1x1 (repaired, or redrawn); and within the space's
// compute budget (max_parameters, max_macs) unless even the bare output layer exceeds it.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dicebox/dataset.h"
#include "dicebox/genome.h"

namespace dicebox {

// The taxonomy evolution draws from. Sizes and learning rates are drawn log-uniformly.
struct SearchSpace {
  std::vector<LayerType> layer_types{LayerType::Dense, LayerType::Dropout, LayerType::Conv2d,
                                     LayerType::MaxPool2d};
  int64_t min_layers = 1;
  int64_t max_layers = 6;
  int64_t min_size = 16;           // dense units
  int64_t max_size = 256;
  std::vector<int64_t> filters{8, 16, 32, 64};
  std::vector<int64_t> kernels{3, 5};  // square conv kernels
  int64_t pool = 2;                    // maxpool kernel and stride
  double min_dropout = 0.1;
  double max_dropout = 0.5;
  std::vector<Activation> activations{Activation::Relu, Activation::Elu, Activation::Selu,
                                      Activation::Swish, Activation::Tanh};
  std::vector<OptimizerName> optimizers{OptimizerName::Adam, OptimizerName::Nadam,
                                        OptimizerName::Adamax, OptimizerName::Rmsprop};
  double min_learning_rate = 3e-4;
  double max_learning_rate = 3e-3;
  // The compute budget of one network (see network_cost()); 0 = unbounded. The layer
  // choices above alone allow networks that take minutes per epoch on a small CPU, which
  // would eat a whole evolution run. The defaults leave room for a conv32-pool-conv64-
  // pool-dense128 MNIST CNN (~0.42M parameters, ~4.2M multiply-accumulates).
  int64_t max_parameters = 1'000'000;
  int64_t max_macs = 20'000'000;

  // "default" (sized for a 2-core CPU) or "original" (the first dicebox's taxonomy: dense
  // layers only, 1-1597 neurons, 1-21 layers, every activation and optimizer, no budget).
  static SearchSpace preset(std::string_view name);
  // Parses and validates; missing fields keep the default preset's values. Errors name the field.
  static SearchSpace from_json(std::string_view text);
  std::string to_json() const;
  void validate() const;
};

// What the network a genome builds for `input` and `classes` costs: `parameters` counts the
// weights and biases of every conv and linear module, the output layer included; `macs` the
// multiply-accumulates per image of one forward pass (conv: out_h*out_w*out_c*in_c*kh*kw,
// linear: in*out; padding, pooling, activations and dropout count as free). Throws
// InvalidArgument as plan_network() does.
struct NetworkCost {
  int64_t parameters = 0;
  int64_t macs = 0;
};
NetworkCost network_cost(const Genome& genome, Shape input, int64_t classes);

// Draws a valid genome within the budget; `input` and `classes` are what the network will
// see. Up to 32 draws from the seed's stream; if none is within the budget, the cheapest is
// repaired (shrunk).
Genome random_genome(const SearchSpace& space, Shape input, int64_t classes, uint64_t seed);

// A child of two parents: optimizer and learning rate each from either parent; layer i from
// parent a's or b's layer i (the child's length is one of the parents' lengths; a position
// only one parent has comes from that parent). Repaired to be valid and within the budget,
// which can shrink or drop layers the parents could afford separately.
Genome crossover(const Genome& a, const Genome& b, const SearchSpace& space, Shape input,
                 int64_t classes, uint64_t seed);

// Each kind of mutation happens with probability `chance`: optimizer swap, learning-rate
// change, add a layer, remove a layer, replace a layer, change a dense size, conv filters,
// a kernel, an activation, a dropout rate. Each kind that fires really changes the genome
// (when the space allows any change of that kind within the budget), and the change stays:
// kinds only choose changes the budget affords, so the closing repair() leaves them alone.
// `applied`, if given, receives the names of the kinds that fired.
Genome mutate(const Genome& genome, const SearchSpace& space, Shape input, int64_t classes,
              double chance, uint64_t seed, std::vector<std::string>* applied = nullptr);

// Makes `genome` valid for `input` within the space's bounds: drops layers that cannot
// follow a dense layer, shrinks or drops kernels and pools that do not fit, trims to
// max_layers. Then, while the network is over the budget, takes the step that cuts the
// overrun most: halving a dense size (not below min_size) or stepping conv filters down to
// the next smaller value in `filters`; when no such step helps, dropping the layer whose
// removal helps most. Stops within the budget or at no layers (the bare output layer, which
// nothing can shrink). Deterministic. Returns the repaired genome (possibly with fewer layers).
Genome repair(const Genome& genome, const SearchSpace& space, Shape input, int64_t classes);

struct Scored {
  int64_t id = 0;
  Genome genome;
  double fitness = 0.0;  // higher is better; NaN counts as worst
};

struct BreedOptions {
  int64_t population = 20;
  double retain = 0.4;
  double random_select = 0.1;
  double mutate_chance = 0.2;
  void validate() const;
};

struct Offspring {
  Genome genome;
  std::vector<int64_t> parents;  // ids; one id for a survivor, two for a child
};

// The next generation, as in the original algorithm: rank by fitness (ties by id), keep the
// best `retain` share, keep each other individual with probability `random_select`, then
// fill up to `population` with children of two distinct kept parents (crossover, then
// mutate). A child whose canonical form is already in the new generation is bred again (a
// few tries) so no slot is wasted on a duplicate.
std::vector<Offspring> breed(const std::vector<Scored>& scored, const BreedOptions& options,
                             const SearchSpace& space, Shape input, int64_t classes, uint64_t seed);

}  // namespace dicebox
