// Fuzz target: raw image buffers as they enter the core from numpy (Dataset.from_arrays ->
// Dataset::from_buffers) with arbitrary shapes, labels and category names, and what then
// reads those pixels: the batch loader with arbitrary options (shuffle, augmentation,
// normalisation, threads, prefetch, drop_last), augment_image with arbitrary warp
// parameters, subset() and split(). The leading bytes choose the shape, count, categories,
// labels and options; the rest, repeated, are the pixels. Invariants: every batch holds
// valid labels and finite values (exactly the normalised pixels when not augmented, within
// the normalised 0-255 range when augmented), an epoch yields every sample once, a warp
// stays within 0-255, and split parts are disjoint.
#include <algorithm>
#include <bit>
#include <cmath>

#include "dicebox/dataset.h"
#include "dicebox/errors.h"
#include "dicebox/loader.h"
#include "fuzz_support.h"

using namespace dicebox;
using fuzz::require;

namespace {

// A category name of 0-2 letters from one byte: empty and repeated names occur, as they
// may from outside.
std::string category_name(uint8_t b) { return std::string(b % 3, static_cast<char>('a' + (b >> 2) % 3)); }

// Mostly labels within 0..classes-1; classes itself and -1 occur too.
int64_t label_from(uint8_t b, int64_t classes) { return b == 255 ? -1 : b % (classes + 1); }

// Any double at all, NaN and infinities included.
double any_double(fuzz::InputReader& in) { return std::bit_cast<double>(in.u64()); }

// The values pixels 0 and 255 of each channel normalise to: a warped pixel lies between.
std::vector<std::pair<float, float>> normalised_range(const Shape& shape, const LoaderOptions& options) {
  const Shape pair_shape{shape.channels, 1, 2};
  std::vector<uint8_t> extremes;
  for (int64_t c = 0; c < shape.channels; ++c) extremes.insert(extremes.end(), {0, 255});
  std::vector<float> values(extremes.size());
  normalise_images(extremes.data(), 1, pair_shape, options.mean, options.std, values.data());
  std::vector<std::pair<float, float>> out;
  for (size_t c = 0; c < values.size(); c += 2) out.emplace_back(std::minmax(values[c], values[c + 1]));
  return out;
}

void check_epoch(BatchLoader& loader, const Dataset& dataset, const LoaderOptions& options, int64_t epoch) {
  loader.start_epoch(epoch);
  const Shape shape = dataset.shape();
  const int64_t image_size = shape.pixels();
  const int64_t plane = shape.height * shape.width;
  const auto order = epoch_order(dataset.size(), options.seed, epoch, options.shuffle);
  const auto range = normalised_range(shape, options);
  std::vector<float> expected(static_cast<size_t>(image_size));
  int64_t seen = 0;
  Batch batch;
  while (loader.next(batch)) {
    require(batch.size >= 1 && batch.size <= options.batch_size, "batch size out of range");
    require(batch.shape == shape, "batch shape differs from the dataset's");
    for (int64_t i = 0; i < batch.size; ++i, ++seen) {
      require(seen < dataset.size(), "an epoch yields more samples than the dataset holds");
      const int64_t sample = order[static_cast<size_t>(seen)];
      require((*batch.labels)[static_cast<size_t>(i)] == dataset.labels()[sample], "label differs from the sample's");
      const float* values = batch.images->data() + i * image_size;
      const bool augmented = draw_augmentation(options.seed, epoch, sample, options.augment).apply;
      normalise_images(dataset.image(sample), 1, shape, options.mean, options.std, expected.data());
      for (int64_t p = 0; p < image_size; ++p) {
        require(std::isfinite(values[p]), "a batch value is not finite");
        if (!augmented) {
          require(values[p] == expected[static_cast<size_t>(p)], "unaugmented value is not the normalised pixel");
        } else {
          const auto [low, high] = range[static_cast<size_t>(p / plane)];
          const float slack = 1e-3f * (high - low);
          require(values[p] >= low - slack && values[p] <= high + slack, "augmented value outside the pixel range");
        }
      }
    }
  }
  const int64_t expected_count =
      options.drop_last ? dataset.size() / options.batch_size * options.batch_size : dataset.size();
  require(seen == expected_count, "an epoch does not yield every sample once");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::InputReader in(data, size);
  const Shape shape{in.in_range(0, 4), in.in_range(0, 12), in.in_range(0, 12)};
  const int64_t count = in.in_range(0, 10);
  std::vector<std::string> categories;
  for (int64_t c = in.in_range(0, 4); c > 0; --c) categories.push_back(category_name(in.byte()));
  const auto classes = static_cast<int64_t>(categories.size());
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < count; ++i) labels.push_back(label_from(in.byte(), classes));

  LoaderOptions options;
  options.batch_size = in.in_range(0, 6);
  options.shuffle = in.byte() & 1;
  options.seed = in.u64();
  options.augment = in.in_range(-1, 11) / 10.0;
  const uint8_t normalisation = in.byte();
  for (int64_t c = 0; c < shape.channels; ++c) {
    if (normalisation & 1) options.mean.push_back(static_cast<float>(static_cast<int16_t>(in.u16())) / 100);
    if (normalisation & 2) options.std.push_back(static_cast<float>(static_cast<int16_t>(in.u16())) / 100);
  }
  options.threads = static_cast<int>(in.in_range(0, 3));
  options.prefetch = static_cast<int>(in.in_range(0, 3));
  options.drop_last = in.byte() & 1;
  const AugmentParams warp{true, any_double(in), any_double(in), any_double(in), any_double(in)};
  std::vector<double> fractions;
  for (int64_t p = in.in_range(0, 3); p > 0; --p) fractions.push_back(in.in_range(0, 60) / 100.0);
  const uint64_t split_seed = in.u64();

  // The pixels: the rest of the input, repeated; zeros when there is none.
  const auto source = in.rest();
  const int64_t pixel_count = shape.pixels() * count;
  std::vector<uint8_t> pixels(static_cast<size_t>(pixel_count));
  for (size_t i = 0; i < pixels.size() && !source.empty(); ++i) pixels[i] = source[i % source.size()];

  Dataset dataset;
  try {
    dataset = Dataset::from_buffers(pixels.data(), labels.data(), count, shape, categories);
  } catch (const InvalidArgument&) {
    return 0;
  }
  require(dataset.size() == count && dataset.shape() == shape, "from_buffers changed the size or shape");

  if (count > 0) {
    std::vector<float> warped(static_cast<size_t>(shape.pixels()));
    augment_image(dataset.image(0), shape, warp, warped.data());
    for (float v : warped) require(v >= 0.0f && v <= 255.0f, "a warped pixel is outside 0-255");
  }

  try {
    std::vector<Dataset> parts = dataset.split(fractions, split_seed);
    int64_t total = 0;
    for (const Dataset& part : parts) {
      total += part.size();
      require(part.categories() == dataset.categories(), "a split part has other categories");
    }
    require(total <= dataset.size(), "split parts hold more images than the dataset");
  } catch (const InvalidArgument&) {
  }

  try {
    BatchLoader loader(dataset, options);
    require(loader.batches_per_epoch() >= 0, "negative batch count");
    check_epoch(loader, dataset, options, 0);
    check_epoch(loader, dataset, options, 1);
  } catch (const InvalidArgument&) {
  }
  return 0;
}
