// Fuzz target: MNIST IDX image and label files as Dataset::from_idx reads them, plain or
// gzip-compressed. Input: one flags byte (bit 0: gzip the images file, bit 1: gzip the
// labels file), then the two files as fuzz_support.h's split_two_files packs them.
// Unflagged bytes that start with the gzip magic still reach zlib as they are, so corrupt
// gzip streams are fuzzed too. A dataset that loads must have one channel, labels within
// its "0".."max" categories and as many labels as images.
#include <zlib.h>

#include "dicebox/dataset.h"
#include "dicebox/errors.h"
#include "fuzz_support.h"

using namespace dicebox;
using fuzz::require;

namespace {

std::vector<uint8_t> gzip(const std::vector<uint8_t>& plain) {
  z_stream stream{};
  // windowBits 15 + 16 writes a gzip (not zlib) wrapper, which gzopen expects.
  require(deflateInit2(&stream, Z_BEST_SPEED, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) == Z_OK, "deflateInit2");
  std::vector<uint8_t> out(deflateBound(&stream, plain.size()) + 32);
  stream.next_in = const_cast<Bytef*>(plain.data());
  stream.avail_in = static_cast<uInt>(plain.size());
  stream.next_out = out.data();
  stream.avail_out = static_cast<uInt>(out.size());
  require(deflate(&stream, Z_FINISH) == Z_STREAM_END, "deflate");
  out.resize(stream.total_out);
  deflateEnd(&stream);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t flags = data[0];
  auto [images, labels] = fuzz::split_two_files(data + 1, size - 1);
  if (flags & 1) images = gzip(images);
  if (flags & 2) labels = gzip(labels);
  const fuzz::MemoryFile images_file(images.data(), images.size());
  const fuzz::MemoryFile labels_file(labels.data(), labels.size());
  Dataset dataset;
  try {
    dataset = Dataset::from_idx(images_file.path(), labels_file.path());
  } catch (const IoError&) {
    return 0;
  }
  require(dataset.shape().channels == 1, "IDX images have one channel");
  require(dataset.shape().height >= 1 && dataset.shape().width >= 1, "empty image shape");
  require(dataset.num_classes() >= 1 && dataset.num_classes() <= 256, "categories outside 1..256");
  for (int64_t c = 0; c < dataset.num_classes(); ++c)
    require(dataset.categories()[static_cast<size_t>(c)] == std::to_string(c), "categories are not 0..max");
  int64_t largest = 0;
  for (int64_t i = 0; i < dataset.size(); ++i) {
    require(dataset.labels()[i] >= 0 && dataset.labels()[i] < dataset.num_classes(), "label out of range");
    largest = std::max(largest, dataset.labels()[i]);
  }
  require(largest == dataset.num_classes() - 1, "categories go past the largest label");
  return 0;
}
