// A trained model: genome, categories, input shape, normalisation, history and the
// network's weights. Saved as a directory with weights.safetensors and model.json.
// Batched inference and evaluation run here, in C++. Torch-free header (pimpl).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dicebox/dataset.h"
#include "dicebox/genome.h"

namespace dicebox {

// Per-channel normalisation applied to pixels scaled to 0-1: (x - mean) / std.
struct Normalisation {
  std::vector<float> mean;
  std::vector<float> std;
  // Mean and standard deviation of every channel of `dataset` (std floored at 1e-3).
  static Normalisation of(const Dataset& dataset);
};

// One epoch of training, as recorded in the history.
struct EpochRecord {
  int64_t epoch = 0;                 // from 1
  double loss = 0.0;                 // training loss (with label smoothing, if any)
  double accuracy = 0.0;             // training accuracy
  double val_loss = 0.0;             // NaN when there is no validation set
  double val_accuracy = 0.0;         // NaN when there is no validation set
  double samples_per_second = 0.0;
  double seconds = 0.0;
};

struct Metrics {
  double accuracy = 0.0;
  double loss = 0.0;
  int64_t k = 0;
  double top_k = 0.0;                 // fraction whose label is among the k best
  double precision = 0.0;             // macro
  double recall = 0.0;                // macro
  double f1 = 0.0;                    // macro
  std::vector<int64_t> confusion;     // [classes x classes], row = true, column = predicted
  int64_t count = 0;
};

// A named float32 array (weights export for to_torch and state inspection).
struct NamedArray {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

class Model {
 public:
  Model();
  ~Model();
  Model(const Model&);
  Model& operator=(const Model&);

  // Loads a directory written by save(); says which file is missing or corrupt.
  static Model load(const std::string& dir);
  // Writes weights.safetensors and model.json into `dir` (created if needed), atomically
  // per file. `extra_json` (an object, may be empty) is stored under "extra".
  void save(const std::string& dir) const;

  const Genome& genome() const;
  const std::vector<std::string>& categories() const;
  Shape input_shape() const;
  const Normalisation& normalisation() const;
  const std::vector<EpochRecord>& history() const;
  std::string extra_json() const;          // "{}" when unset
  void set_extra_json(const std::string& json);
  std::string plan_json() const;           // the torch-equivalent module list

  // Class probabilities [n, classes] for uint8 images [n, C, H, W]; threads as set globally.
  std::vector<float> predict(const uint8_t* images, int64_t n, int64_t batch_size = 256) const;
  // Metrics over a dataset whose categories equal the model's.
  Metrics evaluate(const Dataset& dataset, int64_t k = 5, int64_t batch_size = 256) const;
  std::vector<NamedArray> weights() const;

  struct Impl;
  explicit Model(std::shared_ptr<Impl> impl);
  Impl& impl() const { return *impl_; }

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace dicebox
