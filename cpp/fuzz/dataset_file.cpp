// Fuzz target: packed dataset files as Dataset::load reads them (a memory-mapped file).
// A file that loads must be consistent: every label names a category, the per-category
// counts add up to the size, and save() then load() gives the same dataset back.
#include <cstring>

#include "dicebox/dataset.h"
#include "dicebox/errors.h"
#include "fuzz_support.h"

using namespace dicebox;
using fuzz::require;

namespace {

bool same_contents(const Dataset& a, const Dataset& b) {
  const auto pixel_count = static_cast<size_t>(a.size() * a.shape().pixels());
  return a.size() == b.size() && a.shape() == b.shape() && a.categories() == b.categories() &&
         std::memcmp(a.pixels(), b.pixels(), pixel_count) == 0 &&
         std::memcmp(a.labels(), b.labels(), sizeof(int64_t) * static_cast<size_t>(a.size())) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::MemoryFile file(data, size);
  Dataset dataset;
  try {
    dataset = Dataset::load(file.path());
  } catch (const IoError&) {
    return 0;
  }
  require(dataset.size() >= 0, "negative size");
  require(dataset.num_classes() >= 1, "no categories");
  const Shape shape = dataset.shape();
  require(shape.channels >= 1 && shape.height >= 1 && shape.width >= 1, "empty image shape");
  int64_t counted = 0;
  for (int64_t n : dataset.counts()) counted += n;
  require(counted == dataset.size(), "category counts do not add up to the size");
  for (int64_t i = 0; i < dataset.size(); ++i)
    require(dataset.labels()[i] >= 0 && dataset.labels()[i] < dataset.num_classes(), "label out of range");
  // Touch the last pixel: the mapping must cover every image the header claims.
  if (dataset.size() > 0) {
    volatile uint8_t last = dataset.image(dataset.size() - 1)[shape.pixels() - 1];
    (void)last;
  }

  const std::string copy = fuzz::scratch_directory() + "/dataset.bin";
  dataset.save(copy);
  require(same_contents(dataset, Dataset::load(copy)), "save() then load() changed the dataset");
  return 0;
}
