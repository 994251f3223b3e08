// Packed datasets: the on-disk format (memory-mapped on load, every header field checked
// against the file), the MNIST IDX reader, and subsets and stratified seeded splits.
//
// File layout, little-endian:
//   0  "DICEBOX\0"            8-byte magic
//   8  u32 format version     (= 1)
//   12 u32 header length L
//   16 L bytes of JSON        {"count","channels","height","width","categories",
//                              "pixels_offset","labels_offset"}
//   pixels_offset (multiple of 64): uint8 pixels [count, channels, height, width]
//   labels_offset (multiple of 8):  int64 labels [count], ending exactly at the end of file
#include "dicebox/dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <sstream>
#include <unordered_map>

#include "dicebox/errors.h"
#include "dicebox/random.h"
#include "dicebox/safetensors.h"

namespace dicebox {
namespace {

using json = nlohmann::json;

// Loaded labels are read in place from the mapping, so the file's byte order must be ours.
static_assert(std::endian::native == std::endian::little, "packed datasets assume a little-endian host");

constexpr char kMagic[8] = {'D', 'I', 'C', 'E', 'B', 'O', 'X', '\0'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint64_t kPreambleSize = 16;  // magic, version, header length
constexpr uint64_t kPixelsAlignment = 64;
constexpr uint64_t kLabelsAlignment = 8;
constexpr uint64_t kMaxSize = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
constexpr int64_t kMaxChannels = 4;
constexpr uint32_t kIdxImagesMagic = 2051;
constexpr uint32_t kIdxLabelsMagic = 2049;

// Owns the pixels and labels of a dataset built in memory (the alternative owner is a mapping).
struct Storage {
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
};

std::string errno_text() { return std::strerror(errno); }

// a * b and a + b, or nullopt when the result would not fit in int64_t: header fields are
// untrusted, and a wrapped product could pass every later bounds check.
std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) {
  if (a != 0 && b > kMaxSize / a) return std::nullopt;
  return a * b;
}
std::optional<uint64_t> checked_add(uint64_t a, uint64_t b) {
  if (a > kMaxSize || b > kMaxSize - a) return std::nullopt;
  return a + b;
}

// Bytes of `count` images of `shape`, or nullopt when that overflows.
std::optional<uint64_t> pixel_bytes(uint64_t count, const Shape& shape) {
  auto plane = checked_mul(static_cast<uint64_t>(shape.height), static_cast<uint64_t>(shape.width));
  auto image = plane ? checked_mul(*plane, static_cast<uint64_t>(shape.channels)) : std::nullopt;
  return image ? checked_mul(*image, count) : std::nullopt;
}

uint64_t align_up(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

// The checks shared by from_buffers (InvalidArgument) and load (IoError): each returns what
// is wrong, or an empty string.
std::string shape_problem(const Shape& shape, const std::string& prefix) {
  if (shape.channels < 1 || shape.channels > kMaxChannels)
    return prefix + "channels must be in 1.." + std::to_string(kMaxChannels) + ", got " +
           std::to_string(shape.channels);
  if (shape.height < 1) return prefix + "height must be >= 1, got " + std::to_string(shape.height);
  if (shape.width < 1) return prefix + "width must be >= 1, got " + std::to_string(shape.width);
  return {};
}

std::string categories_problem(const std::vector<std::string>& categories) {
  if (categories.empty()) return "categories must not be empty";
  std::unordered_map<std::string, size_t> first_index;
  for (size_t i = 0; i < categories.size(); ++i) {
    if (categories[i].empty()) return "categories[" + std::to_string(i) + "] is empty";
    auto [it, inserted] = first_index.emplace(categories[i], i);
    if (!inserted)
      return "categories[" + std::to_string(i) + "] = \"" + categories[i] + "\" repeats categories[" +
             std::to_string(it->second) + "]";
  }
  return {};
}

std::string labels_problem(const int64_t* labels, int64_t count, int64_t classes) {
  for (int64_t i = 0; i < count; ++i)
    if (labels[i] < 0 || labels[i] >= classes)
      return "labels[" + std::to_string(i) + "] = " + std::to_string(labels[i]) + " is outside 0.." +
             std::to_string(classes - 1);
  return {};
}

uint32_t read_u32_le(const uint8_t* bytes) {
  return uint32_t{bytes[0]} | uint32_t{bytes[1]} << 8 | uint32_t{bytes[2]} << 16 | uint32_t{bytes[3]} << 24;
}
void write_u32_le(uint8_t* bytes, uint32_t value) {
  for (int i = 0; i < 4; ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
}

// What a packed file's preamble and header say, after every check against the file.
struct PackedLayout {
  int64_t count = 0;
  Shape shape;
  std::vector<std::string> categories;
  uint64_t pixels_offset = 0;
  uint64_t labels_offset = 0;
};

// A header field that must be a non-negative integer fitting in int64_t.
uint64_t header_integer(const json& header, const char* key, const std::string& path) {
  auto it = header.find(key);
  if (it == header.end()) throw IoError(path + ": header field \"" + key + "\" is missing");
  if (!it->is_number_unsigned() || it->get<uint64_t>() > kMaxSize)
    throw IoError(path + ": header field \"" + key + "\" must be a non-negative integer, got " + it->dump());
  return it->get<uint64_t>();
}

PackedLayout parse_packed(const uint8_t* bytes, uint64_t size, const std::string& path) {
  auto fail = [&](const std::string& what) { return IoError(path + ": " + what); };
  if (size < kPreambleSize)
    throw fail("truncated: " + std::to_string(size) + " bytes is shorter than the 16-byte preamble");
  if (std::memcmp(bytes, kMagic, sizeof kMagic) != 0) throw fail("not a dicebox dataset (bad magic)");
  const uint32_t version = read_u32_le(bytes + 8);
  if (version != kFormatVersion)
    throw fail("unsupported format version " + std::to_string(version) + " (expected " +
               std::to_string(kFormatVersion) + ")");
  const uint64_t header_length = read_u32_le(bytes + 12);
  if (header_length > size - kPreambleSize)
    throw fail("header length " + std::to_string(header_length) + " exceeds the file size " + std::to_string(size));

  json header;
  try {
    header = json::parse(bytes + kPreambleSize, bytes + kPreambleSize + header_length);
  } catch (const json::exception& e) {
    throw fail(std::string("malformed header JSON (") + e.what() + ")");
  }
  if (!header.is_object()) throw fail("header is not a JSON object");

  PackedLayout layout;
  layout.count = static_cast<int64_t>(header_integer(header, "count", path));
  layout.shape.channels = static_cast<int64_t>(header_integer(header, "channels", path));
  layout.shape.height = static_cast<int64_t>(header_integer(header, "height", path));
  layout.shape.width = static_cast<int64_t>(header_integer(header, "width", path));
  layout.pixels_offset = header_integer(header, "pixels_offset", path);
  layout.labels_offset = header_integer(header, "labels_offset", path);
  if (std::string problem = shape_problem(layout.shape, ""); !problem.empty()) throw fail(problem);

  auto categories = header.find("categories");
  if (categories == header.end()) throw fail("header field \"categories\" is missing");
  if (!categories->is_array()) throw fail("header field \"categories\" must be an array of strings");
  for (const auto& name : *categories) {
    if (!name.is_string()) throw fail("header field \"categories\" must be an array of strings");
    layout.categories.push_back(name.get<std::string>());
  }
  if (std::string problem = categories_problem(layout.categories); !problem.empty()) throw fail(problem);

  const auto pixels_size = pixel_bytes(static_cast<uint64_t>(layout.count), layout.shape);
  if (!pixels_size) throw fail("count * channels * height * width overflows");
  if (layout.pixels_offset % kPixelsAlignment != 0)
    throw fail("pixels_offset " + std::to_string(layout.pixels_offset) + " is not a multiple of 64");
  if (layout.pixels_offset < kPreambleSize + header_length)
    throw fail("pixels_offset " + std::to_string(layout.pixels_offset) + " overlaps the header, which ends at " +
               std::to_string(kPreambleSize + header_length));
  const auto pixels_end = checked_add(layout.pixels_offset, *pixels_size);
  if (!pixels_end || *pixels_end > size)
    throw fail("truncated: the pixels of " + std::to_string(layout.count) + " images need " +
               std::to_string(*pixels_size) + " bytes from offset " + std::to_string(layout.pixels_offset) +
               ", the file has " + std::to_string(size));
  if (layout.labels_offset % kLabelsAlignment != 0)
    throw fail("labels_offset " + std::to_string(layout.labels_offset) + " is not a multiple of 8");
  if (layout.labels_offset < *pixels_end)
    throw fail("labels_offset " + std::to_string(layout.labels_offset) + " overlaps the pixels, which end at " +
               std::to_string(*pixels_end));
  // count fits in int64_t, so 8 * count fits in uint64_t.
  const auto labels_end = checked_add(layout.labels_offset, 8 * static_cast<uint64_t>(layout.count));
  if (!labels_end || *labels_end > size)
    throw fail("truncated: the labels of " + std::to_string(layout.count) + " images need " +
               std::to_string(8 * static_cast<uint64_t>(layout.count)) + " bytes from offset " +
               std::to_string(layout.labels_offset) + ", the file has " + std::to_string(size));
  if (*labels_end != size)
    throw fail(std::to_string(size - *labels_end) + " unexpected bytes after the labels");
  return layout;
}

// Memory-maps a whole file read-only; the mapping lives as long as the returned owner.
// Truncating a mapped file in place would fault readers (SIGBUS); save() never does, as it
// renames a new file over the old one and existing mappings keep the old inode.
std::shared_ptr<const void> map_file(const std::string& path, uint64_t& size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot read " + path + ": " + errno_text());
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const std::string why = errno_text();
    ::close(fd);
    throw IoError("cannot read " + path + ": " + why);
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    throw IoError("cannot read " + path + ": not a regular file");
  }
  size = static_cast<uint64_t>(info.st_size);
  if (size == 0) {  // mmap refuses empty mappings; the caller reports the truncation
    ::close(fd);
    return nullptr;
  }
  void* address = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (address == MAP_FAILED) {
    const std::string why = errno_text();
    ::close(fd);
    throw IoError("cannot map " + path + ": " + why);
  }
  ::close(fd);  // the mapping keeps its own reference to the file
  return std::shared_ptr<const void>(address, [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
}

struct GzClose {
  void operator()(gzFile file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzClose>;

// Reads exactly `size` bytes of `what`. Grows the buffer as data arrives instead of trusting
// the size up front, so a header claiming billions of images cannot exhaust memory.
std::vector<uint8_t> read_exactly(gzFile file, uint64_t size, const std::string& path, const std::string& what) {
  constexpr uint64_t kChunk = uint64_t{1} << 20;
  std::vector<uint8_t> bytes;
  while (bytes.size() < size) {
    const uint64_t want = std::min(kChunk, size - bytes.size());
    const size_t start = bytes.size();
    bytes.resize(start + want);
    const int got = gzread(file, bytes.data() + start, static_cast<unsigned>(want));
    if (got < 0) {
      int code = 0;
      throw IoError("cannot read " + path + ": " + gzerror(file, &code));
    }
    bytes.resize(start + static_cast<size_t>(got));
    if (got == 0)
      throw IoError(path + ": truncated: expected " + std::to_string(size) + " bytes of " + what + ", found " +
                    std::to_string(bytes.size()));
  }
  return bytes;
}

// Opens an IDX file and checks its magic; returns the file positioned after the magic.
GzFile open_idx(const std::string& path, uint32_t expected_magic, const std::string& kind) {
  // gzopen reads plain files unchanged, so one path serves .gz and uncompressed files.
  errno = 0;
  GzFile file(gzopen(path.c_str(), "rb"));
  if (!file) throw IoError("cannot read " + path + ": " + (errno ? errno_text() : "gzopen failed"));
  const auto magic = read_exactly(file.get(), 4, path, "IDX magic");
  const uint32_t value = uint32_t{magic[0]} << 24 | uint32_t{magic[1]} << 16 | uint32_t{magic[2]} << 8 | magic[3];
  if (value != expected_magic)
    throw IoError(path + ": bad IDX magic " + std::to_string(value) + ", expected " +
                  std::to_string(expected_magic) + " (" + kind + ")");
  return file;
}

uint32_t read_u32_be(gzFile file, const std::string& path, const std::string& what) {
  const auto bytes = read_exactly(file, 4, path, what);
  return uint32_t{bytes[0]} << 24 | uint32_t{bytes[1]} << 16 | uint32_t{bytes[2]} << 8 | bytes[3];
}

constexpr uint64_t kSplitStream = 0x53504c4954ULL;  // "SPLIT": keeps split draws apart from other streams

// How many of a category's n images each part gets: floor(fraction * n), then the images
// the floors leave over go one each to the parts with the largest remainders (earlier part
// on ties), up to floor(sum * n) in all, or all n when the fractions sum to 1.
std::vector<uint64_t> part_sizes(const std::vector<double>& fractions, double fraction_sum, uint64_t n) {
  // The relative nudge makes 0.29 * 100 count as 29, not 28.999999999999996.
  auto floor_of = [](double x) { return static_cast<uint64_t>(std::floor(x * (1 + 1e-12))); };
  const auto images = static_cast<double>(n);
  const uint64_t total = fraction_sum >= 1 - 1e-9 ? n : std::min(n, floor_of(fraction_sum * images));
  std::vector<uint64_t> sizes(fractions.size());
  std::vector<double> remainders(fractions.size());
  uint64_t assigned = 0;
  for (size_t p = 0; p < fractions.size(); ++p) {
    sizes[p] = floor_of(fractions[p] * images);
    remainders[p] = fractions[p] * images - static_cast<double>(sizes[p]);
    assigned += sizes[p];
  }
  std::vector<size_t> by_remainder(fractions.size());
  std::iota(by_remainder.begin(), by_remainder.end(), size_t{0});
  std::stable_sort(by_remainder.begin(), by_remainder.end(),
                   [&](size_t a, size_t b) { return remainders[a] > remainders[b]; });
  for (uint64_t extra = 0; assigned + extra < total; ++extra) ++sizes[by_remainder[extra % by_remainder.size()]];
  return sizes;
}

std::string format_number(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

}  // namespace

Dataset Dataset::from_buffers(const uint8_t* pixels, const int64_t* labels, int64_t count, Shape shape,
                              std::vector<std::string> categories) {
  if (count < 0) throw InvalidArgument("count must be >= 0, got " + std::to_string(count));
  if (std::string problem = shape_problem(shape, "shape."); !problem.empty()) throw InvalidArgument(problem);
  if (std::string problem = categories_problem(categories); !problem.empty()) throw InvalidArgument(problem);
  const auto pixels_size = pixel_bytes(static_cast<uint64_t>(count), shape);
  if (!pixels_size) throw InvalidArgument("count * channels * height * width overflows");
  if (count > 0 && (pixels == nullptr || labels == nullptr))
    throw InvalidArgument("pixels and labels must not be null when count > 0");
  const auto classes = static_cast<int64_t>(categories.size());
  if (std::string problem = labels_problem(labels, count, classes); !problem.empty()) throw InvalidArgument(problem);

  auto storage = std::make_shared<Storage>();
  storage->pixels.assign(pixels, pixels + *pixels_size);
  storage->labels.assign(labels, labels + count);
  Dataset out;
  out.pixels_ = storage->pixels.data();
  out.labels_ = storage->labels.data();
  out.owner_ = std::move(storage);
  out.count_ = count;
  out.shape_ = shape;
  out.categories_ = std::move(categories);
  return out;
}

Dataset Dataset::from_idx(const std::string& images_path, const std::string& labels_path) {
  GzFile images = open_idx(images_path, kIdxImagesMagic, "IDX images");
  const uint32_t image_count = read_u32_be(images.get(), images_path, "image count");
  const uint32_t rows = read_u32_be(images.get(), images_path, "row count");
  const uint32_t cols = read_u32_be(images.get(), images_path, "column count");
  if (rows == 0 || cols == 0)
    throw IoError(images_path + ": images are " + std::to_string(rows) + "x" + std::to_string(cols) +
                  ", both sides must be >= 1");
  GzFile labels = open_idx(labels_path, kIdxLabelsMagic, "IDX labels");
  const uint32_t label_count = read_u32_be(labels.get(), labels_path, "label count");
  if (label_count != image_count)
    throw IoError(labels_path + ": holds " + std::to_string(label_count) + " labels but " + images_path +
                  " holds " + std::to_string(image_count) + " images");

  const Shape shape{1, rows, cols};
  // At most 2^32 images of 2^64 pixels: only a lying header overflows, and read_exactly
  // would then report the truncation long before memory runs out.
  const auto pixels_size = pixel_bytes(image_count, shape);
  if (!pixels_size) throw IoError(images_path + ": image count * rows * columns overflows");
  const auto pixels = read_exactly(images.get(), *pixels_size, images_path, "pixels");
  const auto raw_labels = read_exactly(labels.get(), label_count, labels_path, "labels");

  const std::vector<int64_t> label_values(raw_labels.begin(), raw_labels.end());
  const uint8_t max_label = raw_labels.empty() ? 0 : *std::max_element(raw_labels.begin(), raw_labels.end());
  std::vector<std::string> categories;
  for (int label = 0; label <= max_label; ++label) categories.push_back(std::to_string(label));
  return from_buffers(pixels.data(), label_values.data(), image_count, shape, std::move(categories));
}

Dataset Dataset::load(const std::string& path) {
  uint64_t size = 0;
  auto mapping = map_file(path, size);
  const auto* bytes = static_cast<const uint8_t*>(mapping.get());
  PackedLayout layout = parse_packed(bytes, size, path);
  // Offsets are aligned and the mapping is page-aligned, so the labels are aligned in memory.
  const auto* labels = reinterpret_cast<const int64_t*>(bytes + layout.labels_offset);
  const auto classes = static_cast<int64_t>(layout.categories.size());
  if (std::string problem = labels_problem(labels, layout.count, classes); !problem.empty())
    throw IoError(path + ": " + problem);

  Dataset out;
  out.pixels_ = bytes + layout.pixels_offset;
  out.labels_ = labels;
  out.owner_ = std::move(mapping);
  out.count_ = layout.count;
  out.shape_ = layout.shape;
  out.categories_ = std::move(layout.categories);
  return out;
}

void Dataset::save(const std::string& path) const {
  const uint64_t pixels_size = static_cast<uint64_t>(count_ * shape_.pixels());
  json header = {{"count", count_},
                 {"channels", shape_.channels},
                 {"height", shape_.height},
                 {"width", shape_.width},
                 {"categories", categories_}};
  // The header holds the offsets and its length moves them: repeat until they stop moving
  // (two or three rounds, as offsets only grow).
  std::string text;
  uint64_t pixels_offset = 0;
  uint64_t labels_offset = 0;
  for (;;) {
    header["pixels_offset"] = pixels_offset;
    header["labels_offset"] = labels_offset;
    try {
      text = header.dump();
    } catch (const json::exception&) {
      throw InvalidArgument("categories must be valid UTF-8 to be saved");
    }
    const uint64_t pixels_at = align_up(kPreambleSize + text.size(), kPixelsAlignment);
    const uint64_t labels_at = align_up(pixels_at + pixels_size, kLabelsAlignment);
    if (pixels_at == pixels_offset && labels_at == labels_offset) break;
    pixels_offset = pixels_at;
    labels_offset = labels_at;
  }

  std::vector<uint8_t> file(labels_offset + 8 * static_cast<uint64_t>(count_), 0);
  std::memcpy(file.data(), kMagic, sizeof kMagic);
  write_u32_le(file.data() + 8, kFormatVersion);
  write_u32_le(file.data() + 12, static_cast<uint32_t>(text.size()));
  std::memcpy(file.data() + kPreambleSize, text.data(), text.size());
  if (count_ > 0) {
    std::memcpy(file.data() + pixels_offset, pixels_, pixels_size);
    std::memcpy(file.data() + labels_offset, labels_, 8 * static_cast<uint64_t>(count_));
  }
  write_file_atomic(path, file.data(), file.size());
}

std::vector<int64_t> Dataset::counts() const {
  std::vector<int64_t> out(categories_.size(), 0);
  for (int64_t i = 0; i < count_; ++i) ++out[static_cast<size_t>(labels_[i])];
  return out;
}

Dataset Dataset::subset(const std::vector<int64_t>& indices) const {
  for (size_t i = 0; i < indices.size(); ++i)
    if (indices[i] < 0 || indices[i] >= count_)
      throw InvalidArgument("indices[" + std::to_string(i) + "] = " + std::to_string(indices[i]) +
                            " is outside 0.." + std::to_string(count_ - 1));
  const auto image_size = static_cast<size_t>(shape_.pixels());
  auto storage = std::make_shared<Storage>();
  storage->pixels.resize(indices.size() * image_size);
  storage->labels.resize(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    std::memcpy(storage->pixels.data() + i * image_size, image(indices[i]), image_size);
    storage->labels[i] = labels_[indices[i]];
  }
  Dataset out;
  out.pixels_ = storage->pixels.data();
  out.labels_ = storage->labels.data();
  out.owner_ = std::move(storage);
  out.count_ = static_cast<int64_t>(indices.size());
  out.shape_ = shape_;
  out.categories_ = categories_;
  return out;
}

std::vector<Dataset> Dataset::split(const std::vector<double>& fractions, uint64_t seed) const {
  if (fractions.empty()) throw InvalidArgument("fractions must not be empty");
  double fraction_sum = 0;
  for (size_t p = 0; p < fractions.size(); ++p) {
    if (!(fractions[p] > 0) || !std::isfinite(fractions[p]))
      throw InvalidArgument("fractions[" + std::to_string(p) + "] must be > 0, got " + format_number(fractions[p]));
    fraction_sum += fractions[p];
  }
  if (fraction_sum > 1 + 1e-9) throw InvalidArgument("fractions must sum to at most 1, got " + format_number(fraction_sum));

  std::vector<std::vector<int64_t>> members(categories_.size());
  for (int64_t i = 0; i < count_; ++i) members[static_cast<size_t>(labels_[i])].push_back(i);
  std::vector<std::vector<int64_t>> parts(fractions.size());
  for (size_t category = 0; category < members.size(); ++category) {
    // One stream per category: a category's draw does not depend on the others' sizes.
    SplitMix64 rng(hash_keys({seed, kSplitStream, category}));
    rng.shuffle(members[category]);
    const auto sizes = part_sizes(fractions, fraction_sum, members[category].size());
    size_t taken = 0;
    for (size_t p = 0; p < parts.size(); ++p) {
      // Fractions may sum to 1 + 1e-9, so the last part may find fewer images left than its size.
      const size_t take = std::min<size_t>(sizes[p], members[category].size() - taken);
      parts[p].insert(parts[p].end(), members[category].begin() + static_cast<std::ptrdiff_t>(taken),
                      members[category].begin() + static_cast<std::ptrdiff_t>(taken + take));
      taken += take;
    }
  }
  std::vector<Dataset> out;
  for (auto& part : parts) {
    std::sort(part.begin(), part.end());  // original order keeps a part stable as data grows
    out.push_back(subset(part));
  }
  return out;
}

}  // namespace dicebox
