// The batch loader: shuffles per epoch from the seed, converts uint8 pixels to
// normalised float32 and applies augmentation on its own threads, ahead of the trainer.
// Output depends only on (dataset, options, epoch), never on thread timing.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "dicebox/dataset.h"

namespace dicebox {

struct LoaderOptions {
  int64_t batch_size = 64;
  bool shuffle = true;
  uint64_t seed = 0;
  double augment = 0.0;       // probability that an image is augmented, in [0, 1]
  std::vector<float> mean;    // per channel, on the 0-1 scale; empty = 0
  std::vector<float> std;     // per channel; empty = 1
  int threads = 1;            // converter threads
  int prefetch = 4;           // batches ready ahead of the consumer
  bool drop_last = false;
};

// One batch: images [size, C, H, W] float32 normalised, labels [size] int64.
struct Batch {
  int64_t index = 0;
  int64_t size = 0;
  Shape shape;
  std::shared_ptr<std::vector<float>> images;
  std::shared_ptr<std::vector<int64_t>> labels;
};

// Augmentation parameters drawn for one image (exposed for tests).
struct AugmentParams {
  bool apply = false;
  double angle_degrees = 0.0;  // within +-10
  double scale = 1.0;          // 0.7 .. 1.5
  double shift_x = 0.0;        // fraction of the width, within +-0.1 (times width = pixels)
  double shift_y = 0.0;        // fraction of the height, within +-0.1
};

// The parameters image `sample` gets in `epoch`: a pure function of its arguments.
AugmentParams draw_augmentation(uint64_t seed, int64_t epoch, int64_t sample, double probability);
// Warps one uint8 image [C, H, W] by `params` (bilinear, zero fill) into float pixels 0-255.
void augment_image(const uint8_t* src, Shape shape, const AugmentParams& params, float* dst);
// Converts n uint8 images [n, C, H, W] to float32 ((x / 255) - mean[c]) / std[c] in `dst`,
// exactly as the loader does (empty mean = 0, empty std = 1).
void normalise_images(const uint8_t* src, int64_t n, Shape shape, const std::vector<float>& mean,
                      const std::vector<float>& std, float* dst);
// The order of samples in `epoch`: a permutation of 0..n-1 seeded by (seed, epoch).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

class BatchLoader {
 public:
  BatchLoader(Dataset dataset, LoaderOptions options);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  int64_t batches_per_epoch() const;
  const Dataset& dataset() const { return dataset_; }
  // Starts producing the batches of `epoch` (abandons any unfinished epoch).
  void start_epoch(int64_t epoch);
  // The next batch in order; false when the epoch is done.
  bool next(Batch& out);

 private:
  void work();
  // Builds batch `index` of `epoch` from `samples`, its slice of the epoch order copied
  // under the lock, so start_epoch may replace order_ while workers are busy.
  void produce(int64_t index, int64_t epoch, const std::vector<int64_t>& samples, Batch& out) const;
  void stop_workers();

  Dataset dataset_;
  LoaderOptions options_;
  std::vector<int64_t> order_;
  int64_t epoch_ = -1;
  int64_t generation_ = 0;      // bumps with every start_epoch, so stale work is dropped
  int64_t next_to_claim_ = 0;
  int64_t next_to_yield_ = 0;
  int64_t total_ = 0;
  bool stopping_ = false;
  std::map<int64_t, Batch> ready_;
  std::exception_ptr error_;    // a worker's failure in this epoch, re-thrown by next()
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
};

}  // namespace dicebox
