// What a Model holds inside, and the scoring shared by the trainer and Model::evaluate.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "dicebox/model.h"
#include "model_file.h"
#include "network.h"

namespace dicebox {

// The fields model.json holds (genome, categories, shape, ...) and the network.
struct Model::Impl : ModelFields {
  std::unique_ptr<Network> network;  // always in evaluation mode once inside a Model
};

// Normalised float32 images [n, C, H, W] from uint8 pixels.
torch::Tensor normalise(const uint8_t* images, int64_t n, Shape shape, const Normalisation& norm);

// Runs `network` (in evaluation mode) over `dataset`. With `full` false only loss and
// accuracy are computed (the per-epoch validation); otherwise every metric.
Metrics score(Network& network, const Dataset& dataset, const Normalisation& norm, int64_t k,
              int64_t batch_size, bool full);

}  // namespace dicebox
