// Packed image datasets: uint8 pixels [N, C, H, W], int64 labels [N] and category
// names in one file that is memory-mapped on load. Builders from raw buffers and from
// MNIST IDX files; stratified seeded splits. No torch here: the bindings include it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dicebox {

// Channels, height, width of one image.
struct Shape {
  int64_t channels = 1;
  int64_t height = 0;
  int64_t width = 0;
  int64_t pixels() const { return channels * height * width; }
  bool operator==(const Shape&) const = default;
};

class Dataset {
 public:
  Dataset() = default;

  // Copies `count` images of `shape` and their labels. Labels must lie in
  // [0, categories.size()); category names must be unique and non-empty.
  static Dataset from_buffers(const uint8_t* pixels, const int64_t* labels, int64_t count,
                              Shape shape, std::vector<std::string> categories);
  // Reads MNIST IDX files (magic 2051 images, 2049 labels), gzip-compressed or not.
  // Categories are "0".."max label".
  static Dataset from_idx(const std::string& images_path, const std::string& labels_path);
  // Memory-maps a file written by save(); every header field is checked against the file.
  static Dataset load(const std::string& path);
  // Writes the packed file atomically (temporary file, fsync, rename).
  void save(const std::string& path) const;

  int64_t size() const { return count_; }
  const Shape& shape() const { return shape_; }
  const std::vector<std::string>& categories() const { return categories_; }
  int64_t num_classes() const { return static_cast<int64_t>(categories_.size()); }
  const uint8_t* pixels() const { return pixels_; }
  const int64_t* labels() const { return labels_; }
  const uint8_t* image(int64_t i) const { return pixels_ + i * shape_.pixels(); }
  // Images per category, in category order.
  std::vector<int64_t> counts() const;

  // A new dataset holding copies of the given rows, in that order.
  Dataset subset(const std::vector<int64_t>& indices) const;
  // Stratified, disjoint split: fractions (each > 0, summing to at most 1) give the
  // share of every category in each part; the same seed gives the same parts.
  std::vector<Dataset> split(const std::vector<double>& fractions, uint64_t seed) const;

 private:
  std::shared_ptr<const void> owner_;  // keeps pixels_ and labels_ alive (buffer or mapping)
  const uint8_t* pixels_ = nullptr;
  const int64_t* labels_ = nullptr;
  int64_t count_ = 0;
  Shape shape_;
  std::vector<std::string> categories_;
};

}  // namespace dicebox
