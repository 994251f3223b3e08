// The trainer: fits a genome's network to a dataset with early stopping, label smoothing,
// per-epoch history and callback, cancellation, per-epoch checkpoints with exact resume,
// and warm start. Deterministic on CPU for a given seed and thread count.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "dicebox/dataset.h"
#include "dicebox/genome.h"
#include "dicebox/model.h"

namespace dicebox {

// Set from any thread; the trainer stops before its next batch and throws Cancelled.
class CancelToken {
 public:
  void cancel() { flag_.store(true); }
  bool cancelled() const { return flag_.load(); }

 private:
  std::atomic<bool> flag_{false};
};

struct TrainOptions {
  int64_t epochs = 20;
  int64_t batch_size = 64;
  int64_t patience = 5;               // epochs without improvement before stopping; 0 = never stop early
  uint64_t seed = 0;
  double augment = 0.0;               // probability per image
  double label_smoothing = 0.0;
  int threads = 0;                    // intra-op threads; 0 = leave as is
  int loader_threads = 1;
  std::string device = "cpu";         // "cpu", "cuda" or "auto"
  std::string checkpoint_dir;         // empty = no checkpoints
  std::optional<Model> init;          // warm start: weights copied from this model
  std::shared_ptr<CancelToken> cancel;
  // Called after every epoch; returning false stops training (best weights kept).
  std::function<bool(const EpochRecord&)> on_epoch;
  // Called every few batches (about twice a second) with (epoch, batch, batches in epoch):
  // lets a binding check for interrupts. Returning false cancels.
  std::function<bool(int64_t, int64_t, int64_t)> on_batch;
  void validate() const;
};

// Trains `genome` on `train`; early stopping watches `validation` (val_loss) when given,
// otherwise the training loss. With checkpoint_dir set, a checkpoint is written after every
// epoch and a later call with the same arguments resumes from it.
Model train(const Genome& genome, const Dataset& train, const Dataset* validation,
            const TrainOptions& options);

// Sets LibTorch's intra-op thread count (process-wide).
void set_threads(int threads);
int get_threads();

}  // namespace dicebox
