// Tests of the batch loader: epoch order, augmentation draws and the affine warp,
// normalisation, batch counts, determinism across thread counts, abandoning epochs and
// option validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "dicebox/dataset.h"
#include "dicebox/errors.h"
#include "dicebox/loader.h"

namespace dicebox {
namespace {

// Image i carries its index in its first two bytes (read back through the default
// normalisation x / 255); the other bytes are scrambled so warps visibly change them.
// Labels are i % 3.
Dataset numbered_dataset(int64_t count, Shape shape) {
  std::vector<uint8_t> pixels(static_cast<size_t>(count * shape.pixels()));
  std::vector<int64_t> labels(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* image = pixels.data() + i * shape.pixels();
    for (int64_t k = 0; k < shape.pixels(); ++k) image[k] = static_cast<uint8_t>((i * 31 + k * 17) ^ (k * k));
    image[0] = static_cast<uint8_t>(i & 0xff);
    image[1] = static_cast<uint8_t>(i >> 8);
    labels[static_cast<size_t>(i)] = i % 3;
  }
  return Dataset::from_buffers(pixels.data(), labels.data(), count, shape, {"a", "b", "c"});
}

std::vector<Batch> collect_rest(BatchLoader& loader) {
  std::vector<Batch> batches;
  for (Batch batch; loader.next(batch);) batches.push_back(batch);
  return batches;
}

std::vector<Batch> collect(BatchLoader& loader, int64_t epoch) {
  loader.start_epoch(epoch);
  return collect_rest(loader);
}

// The sample in `row` of an unaugmented batch with the default normalisation.
int64_t id_in(const Batch& batch, int64_t row) {
  const float* image = batch.images->data() + row * batch.shape.pixels();
  return std::lround(image[0] * 255.0) | std::lround(image[1] * 255.0) << 8;
}

std::vector<int64_t> ids_of(const std::vector<Batch>& batches) {
  std::vector<int64_t> ids;
  for (const auto& batch : batches)
    for (int64_t row = 0; row < batch.size; ++row) ids.push_back(id_in(batch, row));
  return ids;
}

bool bit_identical(const std::vector<Batch>& a, const std::vector<Batch>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].index != b[i].index || a[i].size != b[i].size || *a[i].labels != *b[i].labels) return false;
    if (a[i].images->size() != b[i].images->size() ||
        std::memcmp(a[i].images->data(), b[i].images->data(), a[i].images->size() * sizeof(float)) != 0)
      return false;
  }
  return true;
}

void expect_same_params(const AugmentParams& a, const AugmentParams& b) {
  EXPECT_EQ(a.apply, b.apply);
  EXPECT_EQ(a.angle_degrees, b.angle_degrees);
  EXPECT_EQ(a.scale, b.scale);
  EXPECT_EQ(a.shift_x, b.shift_x);
  EXPECT_EQ(a.shift_y, b.shift_y);
}

// ---------------------------------------------------------------------------------------
// epoch_order and draw_augmentation

TEST(LoaderEpochOrder, IsAPermutationAndTheIdentityWithoutShuffle) {
  const auto order = epoch_order(1000, 3, 0, true);
  auto sorted = order;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(order, identity);
  EXPECT_EQ(epoch_order(1000, 3, 0, false), identity);
  EXPECT_TRUE(epoch_order(0, 3, 0, true).empty());
}

TEST(LoaderEpochOrder, DependsOnSeedAndEpochOnly) {
  EXPECT_EQ(epoch_order(500, 3, 4, true), epoch_order(500, 3, 4, true));
  EXPECT_NE(epoch_order(500, 3, 4, true), epoch_order(500, 3, 5, true));
  EXPECT_NE(epoch_order(500, 3, 4, true), epoch_order(500, 4, 4, true));
}

TEST(LoaderAugmentDraw, IsPureAndWithinItsRanges) {
  int differing_epochs = 0;
  for (int64_t sample = 0; sample < 1000; ++sample) {
    const AugmentParams params = draw_augmentation(9, 2, sample, 1.0);
    ASSERT_TRUE(params.apply);
    EXPECT_GE(params.angle_degrees, -10.0);
    EXPECT_LE(params.angle_degrees, 10.0);
    EXPECT_GE(params.scale, 0.7);
    EXPECT_LE(params.scale, 1.5);
    EXPECT_GE(params.shift_x, -0.1);
    EXPECT_LE(params.shift_x, 0.1);
    EXPECT_GE(params.shift_y, -0.1);
    EXPECT_LE(params.shift_y, 0.1);
    expect_same_params(params, draw_augmentation(9, 2, sample, 1.0));
    differing_epochs += params.angle_degrees != draw_augmentation(9, 3, sample, 1.0).angle_degrees;
  }
  EXPECT_EQ(differing_epochs, 1000);
  expect_same_params(draw_augmentation(9, 2, 17, 0.0), AugmentParams{});
}

TEST(LoaderAugmentDraw, ProbabilityControlsHowManyApply) {
  int applied = 0;
  for (int64_t sample = 0; sample < 4000; ++sample) {
    const AugmentParams low = draw_augmentation(1, 0, sample, 0.3);
    const AugmentParams high = draw_augmentation(1, 0, sample, 0.6);
    applied += low.apply;
    // Raising the probability adds augmented images without changing the others' draws.
    if (low.apply) expect_same_params(low, high);
  }
  EXPECT_GT(applied, 4000 * 0.27);
  EXPECT_LT(applied, 4000 * 0.33);
}

// ---------------------------------------------------------------------------------------
// augment_image

std::vector<uint8_t> scrambled_image(Shape shape) {
  std::vector<uint8_t> image(static_cast<size_t>(shape.pixels()));
  for (size_t k = 0; k < image.size(); ++k) image[k] = static_cast<uint8_t>(k * 37 + 11);
  return image;
}

TEST(LoaderWarp, IdentityReproducesTheImage) {
  for (Shape shape : {Shape{3, 7, 9}, Shape{1, 8, 6}}) {
    const auto image = scrambled_image(shape);
    std::vector<float> out(image.size(), -1.0f);
    AugmentParams identity;
    identity.apply = true;
    augment_image(image.data(), shape, identity, out.data());
    for (size_t k = 0; k < image.size(); ++k) ASSERT_EQ(out[k], static_cast<float>(image[k])) << "pixel " << k;
  }
}

TEST(LoaderWarp, SmallRotationKeepsTheCentrePixel) {
  const Shape shape{3, 9, 9};
  const auto image = scrambled_image(shape);
  std::vector<float> out(image.size());
  AugmentParams params;
  params.apply = true;
  params.angle_degrees = 7;
  params.scale = 1.3;
  augment_image(image.data(), shape, params, out.data());
  const int64_t centre = 4 * 9 + 4;
  for (int64_t c = 0; c < 3; ++c) EXPECT_EQ(out[static_cast<size_t>(c * 81 + centre)], image[static_cast<size_t>(c * 81 + centre)]);
  EXPECT_NE(out[0], static_cast<float>(image[0]));  // but the rest moved
}

TEST(LoaderWarp, ShiftMovesByWholePixelsAndFillsWithZero) {
  const Shape shape{2, 8, 8};
  const auto image = scrambled_image(shape);
  std::vector<float> out(image.size());
  AugmentParams params;
  params.apply = true;
  params.shift_x = 0.25;    // 2 pixels right
  params.shift_y = -0.125;  // 1 pixel up
  augment_image(image.data(), shape, params, out.data());
  for (int64_t c = 0; c < 2; ++c)
    for (int64_t y = 0; y < 8; ++y)
      for (int64_t x = 0; x < 8; ++x) {
        const float got = out[static_cast<size_t>(c * 64 + y * 8 + x)];
        const bool inside = x >= 2 && y + 1 < 8;
        const float expected = inside ? image[static_cast<size_t>(c * 64 + (y + 1) * 8 + x - 2)] : 0.0f;
        EXPECT_EQ(got, expected) << "c " << c << " y " << y << " x " << x;
      }
}

TEST(LoaderWarp, ShrinkingBlendsNeighboursAndZeroesTheBorder) {
  const Shape shape{1, 9, 9};
  const std::vector<uint8_t> image(81, 200);
  std::vector<float> out(81);
  AugmentParams params;
  params.apply = true;
  params.scale = 0.7;
  augment_image(image.data(), shape, params, out.data());
  EXPECT_EQ(out[0], 0.0f);                  // the corner samples outside the source
  EXPECT_EQ(out[4 * 9], 0.0f);              // so does column 0: x = (0 - 4) / 0.7 + 4 = -1.71
  EXPECT_FLOAT_EQ(out[4 * 9 + 4], 200.0f);  // the centre is still inside
  for (float value : out) EXPECT_LE(value, 200.0f + 1e-3f);
  // Column 1 samples x = (1 - 4) / 0.7 + 4 = -0.29: 71% column 0, 29% zero fill.
  EXPECT_NEAR(out[4 * 9 + 1], 200.0 * ((1 - 4) / 0.7 + 5), 1e-3);
}

// ---------------------------------------------------------------------------------------
// BatchLoader

LoaderOptions options_with(int64_t batch_size, int threads, uint64_t seed = 0) {
  LoaderOptions options;
  options.batch_size = batch_size;
  options.threads = threads;
  options.seed = seed;
  return options;
}

TEST(BatchLoader, EverySampleAppearsOncePerEpoch) {
  const Dataset dataset = numbered_dataset(103, {1, 3, 3});
  BatchLoader loader(dataset, options_with(10, 3));
  std::vector<int64_t> all(103);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    const auto batches = collect(loader, epoch);
    auto ids = ids_of(batches);
    for (const auto& batch : batches)
      for (int64_t row = 0; row < batch.size; ++row)
        EXPECT_EQ((*batch.labels)[static_cast<size_t>(row)], id_in(batch, row) % 3);
    std::sort(ids.begin(), ids.end());
    EXPECT_EQ(ids, all);
  }
}

TEST(BatchLoader, OrderFollowsTheEpochOrder) {
  const Dataset dataset = numbered_dataset(50, {1, 2, 2});
  LoaderOptions options = options_with(8, 2, 77);
  BatchLoader shuffled(dataset, options);
  const auto epoch0 = ids_of(collect(shuffled, 0));
  const auto epoch1 = ids_of(collect(shuffled, 1));
  EXPECT_EQ(epoch0, epoch_order(50, 77, 0, true));
  EXPECT_EQ(epoch1, epoch_order(50, 77, 1, true));
  EXPECT_NE(epoch0, epoch1);

  options.shuffle = false;
  BatchLoader in_order(dataset, options);
  EXPECT_EQ(ids_of(collect(in_order, 5)), epoch_order(50, 77, 5, false));
}

TEST(BatchLoader, SameSeedGivesTheSameBatches) {
  const Dataset dataset = numbered_dataset(64, {3, 4, 4});
  LoaderOptions options = options_with(16, 2, 5);
  options.augment = 0.5;
  BatchLoader first(dataset, options);
  BatchLoader second(dataset, options);
  EXPECT_TRUE(bit_identical(collect(first, 2), collect(second, 2)));
  options.seed = 6;
  BatchLoader other(dataset, options);
  EXPECT_FALSE(bit_identical(collect(first, 2), collect(other, 2)));
}

TEST(BatchLoader, BatchCountWithAndWithoutDropLast) {
  const Dataset dataset = numbered_dataset(10, {1, 2, 3});
  LoaderOptions options = options_with(3, 2);
  BatchLoader keep(dataset, options);
  EXPECT_EQ(keep.batches_per_epoch(), 4);
  const auto kept = collect(keep, 0);
  ASSERT_EQ(kept.size(), 4u);
  for (size_t i = 0; i < kept.size(); ++i) {
    EXPECT_EQ(kept[i].index, static_cast<int64_t>(i));
    EXPECT_EQ(kept[i].size, i < 3 ? 3 : 1);
    EXPECT_EQ(kept[i].shape, dataset.shape());
    EXPECT_EQ(kept[i].images->size(), static_cast<size_t>(kept[i].size * 6));
    EXPECT_EQ(kept[i].labels->size(), static_cast<size_t>(kept[i].size));
  }

  options.drop_last = true;
  BatchLoader drop(dataset, options);
  EXPECT_EQ(drop.batches_per_epoch(), 3);
  const auto dropped = collect(drop, 0);
  ASSERT_EQ(dropped.size(), 3u);
  for (const auto& batch : dropped) EXPECT_EQ(batch.size, 3);

  BatchLoader exact(numbered_dataset(9, {1, 2, 3}), options_with(3, 1));
  EXPECT_EQ(exact.batches_per_epoch(), 3);
}

TEST(BatchLoader, NormalisationMatchesTheFormula) {
  const Dataset dataset = numbered_dataset(20, {3, 4, 5});
  LoaderOptions options = options_with(7, 2);
  options.shuffle = false;
  options.mean = {0.1f, 0.5f, 0.9f};
  options.std = {0.2f, 0.5f, 1.5f};
  BatchLoader loader(dataset, options);
  int64_t sample = 0;
  for (const auto& batch : collect(loader, 0))
    for (int64_t row = 0; row < batch.size; ++row, ++sample)
      for (int64_t c = 0; c < 3; ++c)
        for (int64_t k = 0; k < 20; ++k) {
          const double x = dataset.image(sample)[c * 20 + k];
          const double expected = (x / 255.0 - options.mean[static_cast<size_t>(c)]) / options.std[static_cast<size_t>(c)];
          const float got = (*batch.images)[static_cast<size_t>(row * 60 + c * 20 + k)];
          ASSERT_NEAR(got, expected, 2e-6) << "sample " << sample << " channel " << c << " pixel " << k;
        }
  EXPECT_EQ(sample, 20);
}

TEST(BatchLoader, WithoutAugmentationPixelsAreExact) {
  const Dataset dataset = numbered_dataset(40, {3, 5, 5});
  LoaderOptions options = options_with(16, 2, 8);
  options.augment = 0.0;
  BatchLoader loader(dataset, options);
  const auto order = epoch_order(40, 8, 1, true);
  size_t position = 0;
  for (const auto& batch : collect(loader, 1))
    for (int64_t row = 0; row < batch.size; ++row, ++position) {
      const uint8_t* source = dataset.image(order[position]);
      const float* image = batch.images->data() + row * 75;
      for (int64_t k = 0; k < 75; ++k) {
        ASSERT_NEAR(image[k] * 255.0, source[k], 1e-4);
        ASSERT_EQ(std::lround(image[k] * 255.0), source[k]);
      }
    }
  EXPECT_EQ(position, 40u);
}

TEST(BatchLoader, FullAugmentationChangesImages) {
  const Dataset dataset = numbered_dataset(64, {1, 12, 12});
  LoaderOptions options = options_with(64, 2);
  options.shuffle = false;
  BatchLoader plain(dataset, options);
  options.augment = 1.0;
  BatchLoader augmented(dataset, options);
  const Batch a = collect(plain, 0).at(0);
  const Batch b = collect(augmented, 0).at(0);
  EXPECT_EQ(*a.labels, *b.labels);  // warps never move an image to another label
  int changed = 0;
  for (int64_t row = 0; row < 64; ++row)
    changed += !std::equal(a.images->begin() + row * 144, a.images->begin() + (row + 1) * 144,
                           b.images->begin() + row * 144);
  EXPECT_EQ(changed, 64);
}

TEST(BatchLoader, AugmentedRowsAreTheDrawnWarpsNormalised) {
  const Dataset dataset = numbered_dataset(60, {2, 6, 7});
  LoaderOptions options = options_with(9, 3, 21);
  options.augment = 0.5;
  options.mean = {0.25f, 0.75f};
  options.std = {0.5f, 2.0f};
  BatchLoader loader(dataset, options);
  const auto order = epoch_order(60, 21, 3, true);
  size_t position = 0;
  int applied = 0;
  std::vector<float> warped(84);
  for (const auto& batch : collect(loader, 3))
    for (int64_t row = 0; row < batch.size; ++row, ++position) {
      const int64_t sample = order[position];
      const AugmentParams params = draw_augmentation(21, 3, sample, 0.5);
      applied += params.apply;
      EXPECT_EQ((*batch.labels)[static_cast<size_t>(row)], dataset.labels()[sample]);
      if (params.apply) {
        augment_image(dataset.image(sample), dataset.shape(), params, warped.data());
      } else {
        std::copy(dataset.image(sample), dataset.image(sample) + 84, warped.begin());
      }
      for (int64_t k = 0; k < 84; ++k) {
        const size_t c = static_cast<size_t>(k / 42);
        const double expected = (warped[static_cast<size_t>(k)] / 255.0 - options.mean[c]) / options.std[c];
        ASSERT_NEAR((*batch.images)[static_cast<size_t>(row * 84 + k)], expected, 2e-6);
      }
    }
  EXPECT_EQ(position, 60u);
  EXPECT_GT(applied, 15);
  EXPECT_LT(applied, 45);
}

TEST(BatchLoader, ThreadCountDoesNotChangeBatches) {
  const Dataset dataset = numbered_dataset(200, {3, 8, 8});
  auto run = [&](int threads, int prefetch) {
    LoaderOptions options = options_with(16, threads, 99);
    options.prefetch = prefetch;
    options.augment = 0.5;
    options.mean = {0.4f, 0.5f, 0.6f};
    options.std = {0.2f, 0.25f, 0.3f};
    BatchLoader loader(dataset, options);
    auto batches = collect(loader, 0);
    auto second = collect(loader, 1);
    batches.insert(batches.end(), second.begin(), second.end());
    return batches;
  };
  const auto reference = run(1, 4);
  ASSERT_EQ(reference.size(), 2 * 13u);
  EXPECT_TRUE(bit_identical(reference, run(4, 4)));
  EXPECT_TRUE(bit_identical(reference, run(4, 1)));
  EXPECT_TRUE(bit_identical(reference, run(3, 32)));
}

TEST(BatchLoader, AbandoningAnEpochMidwayIsSafe) {
  const Dataset dataset = numbered_dataset(300, {1, 16, 16});
  LoaderOptions options = options_with(10, 4, 12);
  options.prefetch = 3;
  options.augment = 0.5;
  BatchLoader loader(dataset, options);
  loader.start_epoch(0);
  Batch first;
  ASSERT_TRUE(loader.next(first));
  loader.start_epoch(1);
  ASSERT_TRUE(loader.next(first));
  for (int i = 0; i < 20; ++i) loader.start_epoch(i % 3);  // restarts while workers are busy
  loader.start_epoch(1);
  const auto resumed = collect_rest(loader);

  BatchLoader fresh(dataset, options);
  EXPECT_TRUE(bit_identical(resumed, collect(fresh, 1)));
  EXPECT_TRUE(bit_identical(collect(loader, 0), collect(fresh, 0)));
}

TEST(BatchLoader, DestroyingWhileWorkersRunIsSafe) {
  const Dataset dataset = numbered_dataset(500, {3, 16, 16});
  LoaderOptions options = options_with(20, 4);
  options.augment = 1.0;
  options.prefetch = 8;
  {
    BatchLoader loader(dataset, options);
    loader.start_epoch(0);
    Batch batch;
    EXPECT_TRUE(loader.next(batch));
  }
  {
    BatchLoader never_started(dataset, options);
  }
}

TEST(BatchLoader, NextNeedsAnEpochAndEndsWithFalse) {
  const Dataset dataset = numbered_dataset(5, {1, 2, 2});
  BatchLoader loader(dataset, options_with(2, 1));
  Batch batch;
  EXPECT_THROW(loader.next(batch), InvalidArgument);
  EXPECT_THROW(loader.start_epoch(-1), InvalidArgument);
  EXPECT_EQ(collect(loader, 0).size(), 3u);
  EXPECT_FALSE(loader.next(batch));
  EXPECT_FALSE(loader.next(batch));
}

TEST(BatchLoader, EmptyDatasetHasNoBatches) {
  BatchLoader loader(Dataset::from_buffers(nullptr, nullptr, 0, {1, 4, 4}, {"only"}), options_with(8, 2));
  EXPECT_EQ(loader.batches_per_epoch(), 0);
  EXPECT_TRUE(collect(loader, 0).empty());
}

TEST(BatchLoader, RefusesInvalidOptionsNamingTheField) {
  const Dataset dataset = numbered_dataset(4, {3, 2, 2});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<std::pair<std::function<void(LoaderOptions&)>, std::string>> cases = {
      {[](LoaderOptions& o) { o.batch_size = 0; }, "batch_size must be >= 1, got 0"},
      {[](LoaderOptions& o) { o.augment = 1.5; }, "augment must be in [0, 1], got 1.5"},
      {[](LoaderOptions& o) { o.augment = -0.1; }, "augment must be in [0, 1], got -0.1"},
      {[=](LoaderOptions& o) { o.augment = nan; }, "augment must be in [0, 1]"},
      {[](LoaderOptions& o) { o.mean = {0.5f, 0.5f}; }, "mean must have 0 or 3 entries (one per channel), got 2"},
      {[](LoaderOptions& o) { o.std = {1.0f}; }, "std must have 0 or 3 entries (one per channel), got 1"},
      {[](LoaderOptions& o) { o.std = {1.0f, 0.0f, 1.0f}; }, "std[1] must be > 0, got 0"},
      {[](LoaderOptions& o) { o.std = {1.0f, 1.0f, -2.0f}; }, "std[2] must be > 0, got -2"},
      {[=](LoaderOptions& o) { o.mean = {0.0f, static_cast<float>(nan), 0.0f}; }, "mean[1] must be finite"},
      {[](LoaderOptions& o) { o.threads = 0; }, "threads must be in 1..64, got 0"},
      {[](LoaderOptions& o) { o.threads = 65; }, "threads must be in 1..64, got 65"},
      {[](LoaderOptions& o) { o.prefetch = 0; }, "prefetch must be >= 1, got 0"},
  };
  for (const auto& [corrupt, expected] : cases) {
    LoaderOptions options;
    corrupt(options);
    try {
      BatchLoader loader(dataset, options);
      ADD_FAILURE() << "accepted options that should fail with: " << expected;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  }
}

TEST(AugmentImage, WarpedValuesStayWithinThePixelRange) {
  // A sample point just below an integer column (x + 1 rounds up) once gave a weight a hair
  // below 0, and values such as -2.2e-16 (cpp/fuzz/regressions/image_buffers).
  const Shape shape{1, 5, 4};
  std::vector<uint8_t> image(20, 0);
  image[13] = image[17] = 2;
  const AugmentParams params{true, 10843961455707782.0, 10843961455707782.0, 3.1315130741798618e-294,
                             2.1228052928227009e-314};
  std::vector<float> out(20);
  augment_image(image.data(), shape, params, out.data());
  for (float v : out) {
    EXPECT_GE(v, 0.0f);
    EXPECT_LE(v, 255.0f);
  }
}

}  // namespace
}  // namespace dicebox
