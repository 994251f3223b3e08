// The batch loader: per-epoch seeded order, seeded augmentation (affine warp with bilinear
// sampling), uint8 -> normalised float conversion, on worker threads ahead of the consumer.
// Every random draw is keyed by (seed, epoch, sample), never by thread or timing, so the
// batches are bit-identical whatever the number of threads.
#include "dicebox/loader.h"

#include <Eigen/Geometry>
#include <algorithm>
#include <cmath>
#include <numbers>
#include <sstream>

#include "dicebox/errors.h"
#include "dicebox/random.h"

namespace dicebox {
namespace {

constexpr uint64_t kShuffleStream = 0x53485546464c45ULL;  // "SHUFFLE"
constexpr uint64_t kAugmentStream = 0x4155474d454e54ULL;  // "AUGMENT"

constexpr double kMaxAngleDegrees = 10.0;
constexpr double kMinScale = 0.7;
constexpr double kMaxScale = 1.5;
constexpr double kMaxShift = 0.1;  // of the width or height
constexpr int kMaxThreads = 64;

std::string format_number(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

void validate(const LoaderOptions& options, const Shape& shape) {
  if (options.batch_size < 1)
    throw InvalidArgument("batch_size must be >= 1, got " + std::to_string(options.batch_size));
  if (!(options.augment >= 0 && options.augment <= 1))
    throw InvalidArgument("augment must be in [0, 1], got " + format_number(options.augment));
  const auto channels = static_cast<size_t>(shape.channels);
  if (!options.mean.empty() && options.mean.size() != channels)
    throw InvalidArgument("mean must have 0 or " + std::to_string(channels) + " entries (one per channel), got " +
                          std::to_string(options.mean.size()));
  if (!options.std.empty() && options.std.size() != channels)
    throw InvalidArgument("std must have 0 or " + std::to_string(channels) + " entries (one per channel), got " +
                          std::to_string(options.std.size()));
  for (size_t c = 0; c < options.mean.size(); ++c)
    if (!std::isfinite(options.mean[c]))
      throw InvalidArgument("mean[" + std::to_string(c) + "] must be finite, got " + format_number(options.mean[c]));
  for (size_t c = 0; c < options.std.size(); ++c)
    if (!(options.std[c] > 0) || !std::isfinite(options.std[c]))
      throw InvalidArgument("std[" + std::to_string(c) + "] must be > 0, got " + format_number(options.std[c]));
  if (options.threads < 1 || options.threads > kMaxThreads)
    throw InvalidArgument("threads must be in 1.." + std::to_string(kMaxThreads) + ", got " +
                          std::to_string(options.threads));
  if (options.prefetch < 1) throw InvalidArgument("prefetch must be >= 1, got " + std::to_string(options.prefetch));
}

// y = x * scale + offset equals ((x / 255) - mean) / std with 1 / (255 * std) folded
// into one multiplier per channel.
struct Normaliser {
  std::vector<float> scale;
  std::vector<float> offset;

  Normaliser(const LoaderOptions& options, int64_t channels) {
    for (int64_t c = 0; c < channels; ++c) {
      const double mean = options.mean.empty() ? 0.0 : options.mean[static_cast<size_t>(c)];
      const double deviation = options.std.empty() ? 1.0 : options.std[static_cast<size_t>(c)];
      scale.push_back(static_cast<float>(1.0 / (255.0 * deviation)));
      offset.push_back(static_cast<float>(-mean / deviation));
    }
  }
};

// The hot path of an unaugmented batch: kept free of aliasing and branches so it vectorises.
void convert_plane(const uint8_t* __restrict src, float* __restrict dst, int64_t size, float scale, float offset) {
  for (int64_t i = 0; i < size; ++i) dst[i] = static_cast<float>(src[i]) * scale + offset;
}

void normalise_plane(float* values, int64_t size, float scale, float offset) {
  for (int64_t i = 0; i < size; ++i) values[i] = values[i] * scale + offset;
}

}  // namespace

void normalise_images(const uint8_t* src, int64_t n, Shape shape, const std::vector<float>& mean,
                      const std::vector<float>& std, float* dst) {
  LoaderOptions options;
  options.mean = mean;
  options.std = std;
  const Normaliser normaliser(options, shape.channels);
  const int64_t plane = shape.height * shape.width;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < shape.channels; ++c) {
      const int64_t at = (i * shape.channels + c) * plane;
      convert_plane(src + at, dst + at, plane, normaliser.scale[static_cast<size_t>(c)],
                    normaliser.offset[static_cast<size_t>(c)]);
    }
}

AugmentParams draw_augmentation(uint64_t seed, int64_t epoch, int64_t sample, double probability) {
  SplitMix64 rng(hash_keys({seed, kAugmentStream, static_cast<uint64_t>(epoch), static_cast<uint64_t>(sample)}));
  // Everything is drawn whether applied or not, so raising the probability keeps the
  // parameters of the images that were already augmented.
  const bool apply = rng.uniform(0, 1) < probability;
  AugmentParams params;
  params.angle_degrees = rng.uniform(-kMaxAngleDegrees, kMaxAngleDegrees);
  params.scale = rng.uniform(kMinScale, kMaxScale);
  params.shift_x = rng.uniform(-kMaxShift, kMaxShift);
  params.shift_y = rng.uniform(-kMaxShift, kMaxShift);
  if (!apply) return AugmentParams{};
  params.apply = true;
  return params;
}

void augment_image(const uint8_t* src, Shape shape, const AugmentParams& params, float* dst) {
  const int64_t height = shape.height;
  const int64_t width = shape.width;
  const int64_t plane = height * width;
  // The warp maps source to destination as dst = A (src - centre) + centre + shift with
  // A = rotation * scale; each output pixel samples the source at the inverse image.
  const Eigen::Vector2d centre((static_cast<double>(width) - 1) / 2, (static_cast<double>(height) - 1) / 2);
  const Eigen::Vector2d shift(params.shift_x * static_cast<double>(width), params.shift_y * static_cast<double>(height));
  const double radians = params.angle_degrees * std::numbers::pi / 180;
  const Eigen::Matrix2d forward = Eigen::Rotation2Dd(radians).toRotationMatrix() * params.scale;
  const Eigen::Matrix2d inverse = forward.inverse();

  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      // Centre-relative first: the identity warp and the centre pixel then map exactly.
      const Eigen::Vector2d relative(static_cast<double>(x) - centre.x() - shift.x(),
                                     static_cast<double>(y) - centre.y() - shift.y());
      const Eigen::Vector2d from = inverse * relative + centre;
      float* out = dst + y * width + x;
      // Outside (-1, size) every neighbour is outside the image: all zero fill.
      if (!(from.x() > -1 && from.x() < static_cast<double>(width) && from.y() > -1 &&
            from.y() < static_cast<double>(height))) {
        for (int64_t c = 0; c < shape.channels; ++c) out[c * plane] = 0.0f;
        continue;
      }
      // Both coordinates exceed -1, so truncating x + 1 floors x: cheaper than std::floor,
      // which is a library call on baseline x86-64.
      const int64_t left = static_cast<int64_t>(from.x() + 1) - 1;
      const int64_t top = static_cast<int64_t>(from.y() + 1) - 1;
      // Just below an integer, x + 1 can round up to the next one: the fraction then comes
      // out a hair below 0, and a negative weight could push a value outside 0-255.
      // Clamped, every weight lies in [0, 1] (and the sample is that pixel's value).
      const double fx = std::max(0.0, from.x() - static_cast<double>(left));
      const double fy = std::max(0.0, from.y() - static_cast<double>(top));
      const double weights[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
      if (left >= 0 && top >= 0 && left + 1 < width && top + 1 < height) {
        // The common case: all four neighbours lie inside the image.
        const int64_t base = top * width + left;
        for (int64_t c = 0; c < shape.channels; ++c) {
          const uint8_t* p = src + c * plane + base;
          out[c * plane] = static_cast<float>(weights[0] * p[0] + weights[1] * p[1] + weights[2] * p[width] +
                                              weights[3] * p[width + 1]);
        }
        continue;
      }
      // On the border, neighbours outside the image count as zero.
      const bool has_left = left >= 0, has_right = left + 1 < width;
      const bool has_top = top >= 0, has_bottom = top + 1 < height;
      const bool present[4] = {has_top && has_left, has_top && has_right, has_bottom && has_left,
                               has_bottom && has_right};
      const int64_t offsets[4] = {top * width + left, top * width + left + 1, (top + 1) * width + left,
                                  (top + 1) * width + left + 1};
      for (int64_t c = 0; c < shape.channels; ++c) {
        const uint8_t* channel = src + c * plane;
        double value = 0;
        for (int k = 0; k < 4; ++k)
          if (present[k]) value += weights[k] * channel[offsets[k]];
        out[c * plane] = static_cast<float>(value);
      }
    }
  }
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  if (n < 0) throw InvalidArgument("n must be >= 0, got " + std::to_string(n));
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  if (!shuffle) return order;
  SplitMix64 rng(hash_keys({seed, kShuffleStream, static_cast<uint64_t>(epoch)}));
  rng.shuffle(order);
  return order;
}

BatchLoader::BatchLoader(Dataset dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(std::move(options)) {
  validate(options_, dataset_.shape());
  try {
    for (int t = 0; t < options_.threads; ++t) workers_.emplace_back([this] { work(); });
  } catch (...) {
    stop_workers();  // joins the threads already started, or their destructors would terminate
    throw;
  }
}

BatchLoader::~BatchLoader() { stop_workers(); }

void BatchLoader::stop_workers() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& worker : workers_) worker.join();
  workers_.clear();
}

int64_t BatchLoader::batches_per_epoch() const {
  const int64_t n = dataset_.size();
  return options_.drop_last ? n / options_.batch_size : (n + options_.batch_size - 1) / options_.batch_size;
}

void BatchLoader::start_epoch(int64_t epoch) {
  if (epoch < 0) throw InvalidArgument("epoch must be >= 0, got " + std::to_string(epoch));
  auto order = epoch_order(dataset_.size(), options_.seed, epoch, options_.shuffle);
  {
    std::lock_guard lock(mutex_);
    ++generation_;
    epoch_ = epoch;
    order_ = std::move(order);
    next_to_claim_ = 0;
    next_to_yield_ = 0;
    total_ = batches_per_epoch();
    ready_.clear();
    error_ = nullptr;
  }
  cv_.notify_all();
}

bool BatchLoader::next(Batch& out) {
  std::unique_lock lock(mutex_);
  if (epoch_ < 0) throw InvalidArgument("next() called before start_epoch()");
  if (error_) std::rethrow_exception(error_);
  if (next_to_yield_ >= total_) return false;
  cv_.wait(lock, [this] { return error_ || ready_.contains(next_to_yield_); });
  if (error_) std::rethrow_exception(error_);
  auto node = ready_.extract(next_to_yield_);
  out = std::move(node.mapped());
  ++next_to_yield_;
  lock.unlock();
  cv_.notify_all();  // the prefetch window moved: a worker may claim another batch
  return true;
}

void BatchLoader::work() {
  std::unique_lock lock(mutex_);
  for (;;) {
    cv_.wait(lock, [this] {
      return stopping_ || (next_to_claim_ < total_ && next_to_claim_ < next_to_yield_ + options_.prefetch);
    });
    if (stopping_) return;
    const int64_t index = next_to_claim_++;
    const int64_t generation = generation_;
    const int64_t epoch = epoch_;
    const auto begin = order_.begin() + index * options_.batch_size;
    const auto end = order_.begin() + std::min<int64_t>((index + 1) * options_.batch_size, dataset_.size());
    const std::vector<int64_t> samples(begin, end);
    lock.unlock();

    Batch batch;
    std::exception_ptr error;
    try {
      produce(index, epoch, samples, batch);
    } catch (...) {
      error = std::current_exception();
    }

    lock.lock();
    if (generation != generation_) continue;  // start_epoch came in between: stale work
    if (error) {
      if (!error_) error_ = error;
      next_to_claim_ = total_;  // the epoch is lost; claim nothing more
    } else {
      ready_.emplace(index, std::move(batch));
    }
    cv_.notify_all();
  }
}

void BatchLoader::produce(int64_t index, int64_t epoch, const std::vector<int64_t>& samples, Batch& out) const {
  const Shape shape = dataset_.shape();
  const int64_t image_size = shape.pixels();
  const int64_t plane = shape.height * shape.width;
  const auto size = static_cast<int64_t>(samples.size());
  const Normaliser normaliser(options_, shape.channels);
  out.index = index;
  out.size = size;
  out.shape = shape;
  out.images = std::make_shared<std::vector<float>>(static_cast<size_t>(size * image_size));
  out.labels = std::make_shared<std::vector<int64_t>>(static_cast<size_t>(size));
  for (int64_t i = 0; i < size; ++i) {
    const int64_t sample = samples[static_cast<size_t>(i)];
    (*out.labels)[static_cast<size_t>(i)] = dataset_.labels()[sample];
    const uint8_t* src = dataset_.image(sample);
    float* dst = out.images->data() + i * image_size;
    const AugmentParams params =
        options_.augment > 0 ? draw_augmentation(options_.seed, epoch, sample, options_.augment) : AugmentParams{};
    if (params.apply) {
      augment_image(src, shape, params, dst);
      for (int64_t c = 0; c < shape.channels; ++c)
        normalise_plane(dst + c * plane, plane, normaliser.scale[static_cast<size_t>(c)],
                        normaliser.offset[static_cast<size_t>(c)]);
    } else {
      for (int64_t c = 0; c < shape.channels; ++c)
        convert_plane(src + c * plane, dst + c * plane, plane, normaliser.scale[static_cast<size_t>(c)],
                      normaliser.offset[static_cast<size_t>(c)]);
    }
  }
}

}  // namespace dicebox
