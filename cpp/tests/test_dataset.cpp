// Tests of dicebox::Dataset: building from buffers, the packed file (round trip through
// the mapping and every kind of corruption), MNIST IDX files, subsets and stratified splits.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "dicebox/dataset.h"
#include "dicebox/errors.h"

namespace dicebox {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("dicebox-dataset-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// Runs `action`, which must throw E with each of `fragments` in its message.
template <typename E>
void expect_error(const std::function<void()>& action, std::initializer_list<std::string> fragments) {
  try {
    action();
    ADD_FAILURE() << "expected an exception";
  } catch (const E& e) {
    const std::string message = e.what();
    for (const auto& fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos) << "\"" << fragment << "\" not in: " << message;
  }
}

// Image i carries its own index in its first two bytes, so tests can tell images apart
// after any reordering; the other bytes vary with position too.
Dataset numbered_dataset(const std::vector<int64_t>& labels, Shape shape, std::vector<std::string> categories) {
  const auto count = static_cast<int64_t>(labels.size());
  std::vector<uint8_t> pixels(static_cast<size_t>(count * shape.pixels()));
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* image = pixels.data() + i * shape.pixels();
    for (int64_t k = 0; k < shape.pixels(); ++k) image[k] = static_cast<uint8_t>(i * 7 + k * 13);
    image[0] = static_cast<uint8_t>(i & 0xff);
    image[1] = static_cast<uint8_t>(i >> 8);
  }
  return Dataset::from_buffers(pixels.data(), labels.data(), count, shape, std::move(categories));
}

int64_t id_of(const Dataset& dataset, int64_t i) { return dataset.image(i)[0] | dataset.image(i)[1] << 8; }

// Labels for class sizes {50, 30, 20}: category c repeated sizes[c] times, interleaved so
// the categories are mixed in dataset order.
std::vector<int64_t> labels_with_counts(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> left = sizes;
  std::vector<int64_t> labels;
  for (bool added = true; added;) {
    added = false;
    for (size_t c = 0; c < left.size(); ++c)
      if (left[c] > 0) {
        labels.push_back(static_cast<int64_t>(c));
        --left[c];
        added = true;
      }
  }
  return labels;
}

void expect_same_contents(const Dataset& a, const Dataset& b) {
  ASSERT_EQ(a.size(), b.size());
  ASSERT_EQ(a.shape(), b.shape());
  EXPECT_EQ(a.categories(), b.categories());
  const auto pixel_count = static_cast<size_t>(a.size() * a.shape().pixels());
  EXPECT_TRUE(std::equal(a.pixels(), a.pixels() + pixel_count, b.pixels()));
  EXPECT_TRUE(std::equal(a.labels(), a.labels() + a.size(), b.labels()));
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// ---------------------------------------------------------------------------------------
// from_buffers

TEST(DatasetBuffers, CopiesTheBuffersAndCountsCategories) {
  std::vector<uint8_t> pixels(4 * 2 * 3);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i);
  std::vector<int64_t> labels{2, 0, 2, 2};
  const Dataset dataset = Dataset::from_buffers(pixels.data(), labels.data(), 4, {1, 2, 3}, {"a", "b", "c"});
  pixels.assign(pixels.size(), 0);
  labels.assign(labels.size(), 1);

  EXPECT_EQ(dataset.size(), 4);
  EXPECT_EQ(dataset.shape(), (Shape{1, 2, 3}));
  EXPECT_EQ(dataset.num_classes(), 3);
  EXPECT_EQ(dataset.image(3)[5], 23);
  EXPECT_EQ(dataset.labels()[1], 0);
  EXPECT_EQ(dataset.counts(), (std::vector<int64_t>{1, 0, 3}));
}

TEST(DatasetBuffers, LabelOutOfRangeNamesIndexAndValue) {
  std::vector<int64_t> labels(20, 3);
  labels[17] = 12;
  const std::vector<uint8_t> pixels(20, 0);
  const std::vector<std::string> categories{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  expect_error<InvalidArgument>(
      [&] { Dataset::from_buffers(pixels.data(), labels.data(), 20, {1, 1, 1}, categories); },
      {"labels[17] = 12 is outside 0..9"});
  labels[17] = -1;
  expect_error<InvalidArgument>(
      [&] { Dataset::from_buffers(pixels.data(), labels.data(), 20, {1, 1, 1}, categories); },
      {"labels[17] = -1"});
}

TEST(DatasetBuffers, RejectsBadCountShapeAndCategories) {
  const std::vector<uint8_t> pixels(64, 0);
  const std::vector<int64_t> labels(4, 0);
  auto build = [&](int64_t count, Shape shape, std::vector<std::string> categories) {
    return [=, &pixels, &labels] { Dataset::from_buffers(pixels.data(), labels.data(), count, shape, categories); };
  };
  expect_error<InvalidArgument>(build(-1, {1, 2, 2}, {"a"}), {"count must be >= 0, got -1"});
  expect_error<InvalidArgument>(build(4, {0, 2, 2}, {"a"}), {"shape.channels must be in 1..4, got 0"});
  expect_error<InvalidArgument>(build(4, {5, 2, 2}, {"a"}), {"shape.channels", "got 5"});
  expect_error<InvalidArgument>(build(4, {1, 0, 2}, {"a"}), {"shape.height must be >= 1"});
  expect_error<InvalidArgument>(build(4, {1, 2, -3}, {"a"}), {"shape.width must be >= 1, got -3"});
  expect_error<InvalidArgument>(build(4, {1, 2, 2}, {}), {"categories must not be empty"});
  expect_error<InvalidArgument>(build(4, {1, 2, 2}, {"a", ""}), {"categories[1] is empty"});
  expect_error<InvalidArgument>(build(4, {1, 2, 2}, {"a", "b", "a"}), {"categories[2] = \"a\" repeats categories[0]"});
  const int64_t huge = int64_t{1} << 40;
  expect_error<InvalidArgument>(build(huge, {4, huge, huge}, {"a"}), {"overflows"});
}

TEST(DatasetBuffers, EmptyDatasetIsAllowed) {
  const Dataset dataset = Dataset::from_buffers(nullptr, nullptr, 0, {3, 4, 4}, {"x"});
  EXPECT_EQ(dataset.size(), 0);
  EXPECT_EQ(dataset.counts(), (std::vector<int64_t>{0}));
}

// ---------------------------------------------------------------------------------------
// The packed file written by save() and read back through the mapping

TEST(DatasetFile, SaveLoadRoundTripThroughTheMapping) {
  TempDir dir;
  const Dataset original = numbered_dataset(labels_with_counts({7, 5, 6, 2}), {3, 5, 4}, {"cat", "dog", "eel", "fox"});
  original.save(dir.file("data.dbx"));
  const Dataset loaded = Dataset::load(dir.file("data.dbx"));

  expect_same_contents(original, loaded);
  EXPECT_NE(loaded.pixels(), original.pixels());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(loaded.pixels()) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(loaded.labels()) % 8, 0u);
  EXPECT_EQ(loaded.counts(), original.counts());
  EXPECT_FALSE(fs::exists(dir.file("data.dbx.tmp")));
}

TEST(DatasetFile, FileFollowsTheDocumentedLayout) {
  TempDir dir;
  const Dataset dataset = numbered_dataset({1, 0, 1}, {1, 2, 3}, {"a", "b"});
  dataset.save(dir.file("data.dbx"));
  const auto bytes = read_bytes(dir.file("data.dbx"));
  ASSERT_GE(bytes.size(), 16u);
  EXPECT_EQ(std::string(bytes.begin(), bytes.begin() + 8), std::string("DICEBOX\0", 8));
  EXPECT_EQ(bytes[8] | bytes[9] << 8 | bytes[10] << 16 | bytes[11] << 24, 1);
  const size_t header_length = bytes[12] | bytes[13] << 8 | bytes[14] << 16 | bytes[15] << 24;
  const json header = json::parse(bytes.begin() + 16, bytes.begin() + 16 + static_cast<std::ptrdiff_t>(header_length));
  EXPECT_EQ(header["count"], 3);
  EXPECT_EQ(header["channels"], 1);
  EXPECT_EQ(header["height"], 2);
  EXPECT_EQ(header["width"], 3);
  EXPECT_EQ(header["categories"], json({"a", "b"}));
  const size_t pixels_offset = header["pixels_offset"];
  const size_t labels_offset = header["labels_offset"];
  EXPECT_EQ(pixels_offset % 64, 0u);
  EXPECT_GE(pixels_offset, 16 + header_length);
  EXPECT_EQ(labels_offset % 8, 0u);
  EXPECT_EQ(bytes.size(), labels_offset + 3 * 8);
  EXPECT_EQ(bytes[pixels_offset + 6], dataset.image(1)[0]);
  int64_t second_label = 0;
  std::memcpy(&second_label, bytes.data() + labels_offset + 8, 8);
  EXPECT_EQ(second_label, 0);
}

TEST(DatasetFile, CopiesAndSubsetsOutliveTheFirstHandle) {
  TempDir dir;
  numbered_dataset({0, 1, 0, 1, 1}, {1, 3, 3}, {"a", "b"}).save(dir.file("data.dbx"));
  auto loaded = std::make_unique<Dataset>(Dataset::load(dir.file("data.dbx")));
  const Dataset copy = *loaded;
  const Dataset part = loaded->subset({4, 0});
  loaded.reset();
  fs::remove(dir.file("data.dbx"));  // the mapping keeps the unlinked file readable
  EXPECT_EQ(id_of(copy, 3), 3);
  EXPECT_EQ(copy.labels()[4], 1);
  EXPECT_EQ(id_of(part, 0), 4);
  EXPECT_EQ(id_of(part, 1), 0);
}

TEST(DatasetFile, SaveReplacesAnExistingFile) {
  TempDir dir;
  numbered_dataset({0, 0, 0}, {1, 2, 2}, {"a"}).save(dir.file("data.dbx"));
  const Dataset first = Dataset::load(dir.file("data.dbx"));
  const Dataset second = numbered_dataset({1, 0}, {3, 3, 3}, {"x", "y"});
  second.save(dir.file("data.dbx"));
  expect_same_contents(second, Dataset::load(dir.file("data.dbx")));
  EXPECT_EQ(first.size(), 3);  // the old mapping still sees the old file
  EXPECT_EQ(id_of(first, 2), 2);
}

TEST(DatasetFile, EmptyAndLoadedDatasetsRoundTrip) {
  TempDir dir;
  const Dataset empty = Dataset::from_buffers(nullptr, nullptr, 0, {2, 3, 3}, {"only"});
  empty.save(dir.file("empty.dbx"));
  expect_same_contents(empty, Dataset::load(dir.file("empty.dbx")));

  numbered_dataset({2, 1, 0}, {1, 4, 4}, {"a", "b", "c"}).save(dir.file("one.dbx"));
  const Dataset loaded = Dataset::load(dir.file("one.dbx"));
  loaded.save(dir.file("two.dbx"));
  EXPECT_EQ(read_bytes(dir.file("one.dbx")), read_bytes(dir.file("two.dbx")));
}

TEST(DatasetFile, MissingFileOrDirectoryRaisesIoError) {
  TempDir dir;
  expect_error<IoError>([&] { Dataset::load(dir.file("absent.dbx")); }, {dir.file("absent.dbx"), "No such file"});
  fs::create_directory(dir.file("folder"));
  expect_error<IoError>([&] { Dataset::load(dir.file("folder")); }, {dir.file("folder"), "not a regular file"});
}

TEST(DatasetFile, EveryTruncationRaisesIoErrorNamingTheFile) {
  TempDir dir;
  numbered_dataset(labels_with_counts({4, 4}), {1, 5, 5}, {"a", "b"}).save(dir.file("full.dbx"));
  const auto bytes = read_bytes(dir.file("full.dbx"));
  const std::string path = dir.file("cut.dbx");
  for (size_t length : {size_t{0}, size_t{7}, size_t{15}, size_t{16}, size_t{40}, bytes.size() / 2,
                        bytes.size() - 9, bytes.size() - 1}) {
    SCOPED_TRACE("length " + std::to_string(length));
    write_bytes(path, std::vector<uint8_t>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(length)));
    expect_error<IoError>([&] { Dataset::load(path); }, {path});
  }
}

// A packed file laid out by hand, independent of save(), so the tests pin the format
// itself; each corruption below changes one part. Pixels and labels stay where the valid
// header puts them, whatever the corrupted header claims.
struct PackedParts {
  static constexpr size_t kPixelsAt = 512;
  static constexpr size_t kLabelsAt = 552;  // 512 + 6 images * 6 bytes, rounded up to 8
  std::string magic{"DICEBOX\0", 8};
  uint32_t version = 1;
  json header = {{"count", 6},
                 {"channels", 1},
                 {"height", 2},
                 {"width", 3},
                 {"categories", {"a", "b", "c"}},
                 {"pixels_offset", kPixelsAt},
                 {"labels_offset", kLabelsAt}};
  std::optional<uint32_t> header_length;  // the header's own length unless set
  std::vector<uint8_t> pixels = std::vector<uint8_t>(36, 9);
  std::vector<int64_t> labels{0, 1, 2, 0, 1, 2};

  std::vector<uint8_t> bytes() const {
    const std::string text = header.dump();
    std::vector<uint8_t> out(kLabelsAt + 8 * labels.size(), 0);
    std::memcpy(out.data(), magic.data(), 8);
    const uint32_t length = header_length.value_or(static_cast<uint32_t>(text.size()));
    for (int i = 0; i < 4; ++i) {
      out[8 + i] = static_cast<uint8_t>(version >> (8 * i));
      out[12 + i] = static_cast<uint8_t>(length >> (8 * i));
    }
    std::memcpy(out.data() + 16, text.data(), text.size());
    std::memcpy(out.data() + kPixelsAt, pixels.data(), pixels.size());
    std::memcpy(out.data() + kLabelsAt, labels.data(), 8 * labels.size());
    return out;
  }
};

TEST(DatasetFile, HandWrittenFileLoads) {
  TempDir dir;
  PackedParts parts;
  parts.pixels[35] = 200;
  write_bytes(dir.file("hand.dbx"), parts.bytes());
  const Dataset dataset = Dataset::load(dir.file("hand.dbx"));
  EXPECT_EQ(dataset.size(), 6);
  EXPECT_EQ(dataset.shape(), (Shape{1, 2, 3}));
  EXPECT_EQ(dataset.categories(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(dataset.image(5)[5], 200);
  EXPECT_EQ(dataset.labels()[5], 2);
}

struct Corruption {
  std::string name;
  std::function<void(PackedParts&)> corrupt;
  std::string expected;  // a fragment of the message
};

class DatasetCorruptFile : public testing::TestWithParam<Corruption> {};

TEST_P(DatasetCorruptFile, RaisesIoErrorNamingFileAndProblem) {
  TempDir dir;
  PackedParts parts;
  GetParam().corrupt(parts);
  const std::string path = dir.file("corrupt.dbx");
  write_bytes(path, parts.bytes());
  expect_error<IoError>([&] { Dataset::load(path); }, {path, GetParam().expected});
}

const uint64_t kHuge = uint64_t{1} << 40;

INSTANTIATE_TEST_SUITE_P(
    AllFields, DatasetCorruptFile,
    testing::Values(
        Corruption{"BadMagic", [](PackedParts& p) { p.magic[0] = 'X'; }, "bad magic"},
        Corruption{"FutureVersion", [](PackedParts& p) { p.version = 2; }, "unsupported format version 2"},
        Corruption{"HugeHeaderLength", [](PackedParts& p) { p.header_length = 0xfffffff0u; },
                   "header length 4294967280 exceeds the file size 600"},
        Corruption{"CutHeader", [](PackedParts& p) { p.header_length = 20; }, "malformed header JSON"},
        Corruption{"HeaderNotObject", [](PackedParts& p) { p.header = json::array({1, 2}); }, "not a JSON object"},
        Corruption{"CountTooLargeForPixels", [](PackedParts& p) { p.header["count"] = 1000; },
                   "truncated: the pixels of 1000 images"},
        Corruption{"CountOverlapsLabels", [](PackedParts& p) { p.header["count"] = 7; }, "overlaps the pixels"},
        Corruption{"CountTooSmall", [](PackedParts& p) { p.header["count"] = 5; }, "8 unexpected bytes"},
        Corruption{"CountNegative", [](PackedParts& p) { p.header["count"] = -1; },
                   "\"count\" must be a non-negative integer"},
        Corruption{"CountNotNumber", [](PackedParts& p) { p.header["count"] = "6"; },
                   "\"count\" must be a non-negative integer"},
        Corruption{"CountFractional", [](PackedParts& p) { p.header["count"] = 6.5; },
                   "\"count\" must be a non-negative integer"},
        Corruption{"WidthMissing", [](PackedParts& p) { p.header.erase("width"); }, "\"width\" is missing"},
        Corruption{"WidthZero", [](PackedParts& p) { p.header["width"] = 0; }, "width must be >= 1, got 0"},
        Corruption{"FiveChannels", [](PackedParts& p) { p.header["channels"] = 5; }, "channels must be in 1..4"},
        Corruption{"ShapeOverflows",
                   [](PackedParts& p) {
                     p.header["height"] = uint64_t{1} << 62;
                     p.header["width"] = uint64_t{1} << 62;
                   },
                   "overflows"},
        Corruption{"PixelsMisaligned", [](PackedParts& p) { p.header["pixels_offset"] = 520; },
                   "pixels_offset 520 is not a multiple of 64"},
        Corruption{"PixelsOverlapHeader", [](PackedParts& p) { p.header["pixels_offset"] = 0; },
                   "overlaps the header"},
        Corruption{"LabelsMisaligned", [](PackedParts& p) { p.header["labels_offset"] = 556; },
                   "labels_offset 556 is not a multiple of 8"},
        Corruption{"LabelsOverlapPixels", [](PackedParts& p) { p.header["labels_offset"] = 544; },
                   "overlaps the pixels"},
        Corruption{"LabelsPastEnd", [](PackedParts& p) { p.header["labels_offset"] = kHuge; },
                   "truncated: the labels"},
        Corruption{"CategoriesMissing", [](PackedParts& p) { p.header.erase("categories"); },
                   "\"categories\" is missing"},
        Corruption{"CategoriesEmpty", [](PackedParts& p) { p.header["categories"] = json::array(); },
                   "categories must not be empty"},
        Corruption{"CategoryDuplicated", [](PackedParts& p) { p.header["categories"] = {"a", "b", "a"}; },
                   "repeats categories[0]"},
        Corruption{"CategoryBlank", [](PackedParts& p) { p.header["categories"] = {"a", "", "c"}; },
                   "categories[1] is empty"},
        Corruption{"CategoryNotString", [](PackedParts& p) { p.header["categories"] = {"a", 1, "c"}; },
                   "array of strings"},
        Corruption{"LabelOutOfRange", [](PackedParts& p) { p.labels[4] = 3; }, "labels[4] = 3 is outside 0..2"},
        Corruption{"LabelNegative", [](PackedParts& p) { p.labels[0] = -1; }, "labels[0] = -1"},
        Corruption{"FewerCategoriesThanLabels", [](PackedParts& p) { p.header["categories"] = {"a", "b"}; },
                   "labels[2] = 2 is outside 0..1"}),
    [](const testing::TestParamInfo<Corruption>& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------
// MNIST IDX files

std::vector<uint8_t> idx_bytes(uint32_t magic, const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out;
  auto put = [&](uint32_t value) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(value >> shift));
  };
  put(magic);
  for (uint32_t d : dims) put(d);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

void write_gzip(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr);
  ASSERT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(file), Z_OK);
}

// Five 3x2 images, pixel k of image i = 10 * i + k, labels with 3 as the largest.
struct SmallIdx {
  std::vector<uint8_t> pixels;
  std::vector<uint8_t> labels{0, 3, 1, 3, 2};
  SmallIdx() {
    for (int i = 0; i < 5; ++i)
      for (int k = 0; k < 6; ++k) pixels.push_back(static_cast<uint8_t>(10 * i + k));
  }
  std::vector<uint8_t> images_file() const { return idx_bytes(2051, {5, 3, 2}, pixels); }
  std::vector<uint8_t> labels_file() const { return idx_bytes(2049, {5}, labels); }
};

void expect_small_idx(const Dataset& dataset) {
  const SmallIdx idx;
  ASSERT_EQ(dataset.size(), 5);
  EXPECT_EQ(dataset.shape(), (Shape{1, 3, 2}));
  EXPECT_EQ(dataset.categories(), (std::vector<std::string>{"0", "1", "2", "3"}));
  EXPECT_TRUE(std::equal(idx.pixels.begin(), idx.pixels.end(), dataset.pixels()));
  EXPECT_EQ(std::vector<int64_t>(dataset.labels(), dataset.labels() + 5), (std::vector<int64_t>{0, 3, 1, 3, 2}));
}

TEST(DatasetIdx, ReadsPlainFiles) {
  TempDir dir;
  const SmallIdx idx;
  write_bytes(dir.file("images-idx3-ubyte"), idx.images_file());
  write_bytes(dir.file("labels-idx1-ubyte"), idx.labels_file());
  expect_small_idx(Dataset::from_idx(dir.file("images-idx3-ubyte"), dir.file("labels-idx1-ubyte")));
}

TEST(DatasetIdx, ReadsGzipFilesAndMixtures) {
  TempDir dir;
  const SmallIdx idx;
  write_gzip(dir.file("images.gz"), idx.images_file());
  write_gzip(dir.file("labels.gz"), idx.labels_file());
  write_bytes(dir.file("labels"), idx.labels_file());
  const auto compressed = read_bytes(dir.file("images.gz"));
  ASSERT_GE(compressed.size(), 2u);
  EXPECT_EQ(compressed[0], 0x1f);  // really gzip, not stored plain
  EXPECT_EQ(compressed[1], 0x8b);
  expect_small_idx(Dataset::from_idx(dir.file("images.gz"), dir.file("labels.gz")));
  expect_small_idx(Dataset::from_idx(dir.file("images.gz"), dir.file("labels")));
}

TEST(DatasetIdx, WrongMagicNamesTheFile) {
  TempDir dir;
  const SmallIdx idx;
  write_bytes(dir.file("images"), idx.images_file());
  write_bytes(dir.file("labels"), idx.labels_file());
  // The two files swapped: each has the other's magic.
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("labels"), dir.file("images")); },
                        {dir.file("labels"), "bad IDX magic 2049, expected 2051"});
  write_gzip(dir.file("odd.gz"), idx_bytes(2051, {5}, idx.labels));
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("images"), dir.file("odd.gz")); },
                        {dir.file("odd.gz"), "bad IDX magic 2051, expected 2049"});
}

TEST(DatasetIdx, CountMismatchNamesBothFiles) {
  TempDir dir;
  const SmallIdx idx;
  write_bytes(dir.file("images"), idx.images_file());
  write_bytes(dir.file("labels"), idx_bytes(2049, {4}, {0, 1, 2, 3}));
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("images"), dir.file("labels")); },
                        {dir.file("labels"), "holds 4 labels", dir.file("images"), "5 images"});
}

TEST(DatasetIdx, TruncationNamesTheFile) {
  TempDir dir;
  const SmallIdx idx;
  auto images = idx.images_file();
  images.pop_back();  // not resize(size() - 1): gcc then warns of a wrapped size under ASan
  write_gzip(dir.file("images.gz"), images);
  write_bytes(dir.file("labels"), idx.labels_file());
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("images.gz"), dir.file("labels")); },
                        {dir.file("images.gz"), "truncated", "expected 30 bytes of pixels, found 29"});

  write_bytes(dir.file("images"), idx.images_file());
  auto labels = idx.labels_file();
  labels.resize(6);  // the magic and half the count
  write_bytes(dir.file("labels"), labels);
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("images"), dir.file("labels")); },
                        {dir.file("labels"), "truncated"});
}

TEST(DatasetIdx, ZeroSizedImagesAndMissingFilesAreRefused) {
  TempDir dir;
  write_bytes(dir.file("images"), idx_bytes(2051, {1, 0, 28}, {}));
  write_bytes(dir.file("labels"), idx_bytes(2049, {1}, {0}));
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("images"), dir.file("labels")); },
                        {dir.file("images"), "0x28"});
  expect_error<IoError>([&] { Dataset::from_idx(dir.file("nothing"), dir.file("labels")); },
                        {"cannot read", dir.file("nothing")});
}

// ---------------------------------------------------------------------------------------
// subset and split

TEST(DatasetSubset, CopiesRowsInTheGivenOrder) {
  const Dataset dataset = numbered_dataset({0, 1, 2, 0, 1}, {2, 2, 2}, {"a", "b", "c"});
  const Dataset part = dataset.subset({3, 1, 3});
  ASSERT_EQ(part.size(), 3);
  EXPECT_EQ(id_of(part, 0), 3);
  EXPECT_EQ(id_of(part, 1), 1);
  EXPECT_EQ(id_of(part, 2), 3);
  EXPECT_TRUE(std::equal(dataset.image(1), dataset.image(1) + 8, part.image(1)));
  EXPECT_EQ(part.labels()[1], 1);
  EXPECT_EQ(part.categories(), dataset.categories());
  EXPECT_EQ(dataset.subset({}).size(), 0);
}

TEST(DatasetSubset, RefusesIndicesOutOfBounds) {
  const Dataset dataset = numbered_dataset(std::vector<int64_t>(20, 0), {1, 2, 2}, {"a"});
  expect_error<InvalidArgument>([&] { dataset.subset({0, 20}); }, {"indices[1] = 20 is outside 0..19"});
  expect_error<InvalidArgument>([&] { dataset.subset({-1}); }, {"indices[0] = -1"});
}

std::vector<int64_t> ids_of(const Dataset& dataset) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < dataset.size(); ++i) ids.push_back(id_of(dataset, i));
  return ids;
}

const Dataset& hundred_images() {
  static const Dataset dataset = numbered_dataset(labels_with_counts({50, 30, 20}), {1, 2, 2}, {"a", "b", "c"});
  return dataset;
}

TEST(DatasetSplit, EveryPartHasItsShareOfEveryCategory) {
  const auto parts = hundred_images().split({0.6, 0.2, 0.2}, 7);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].counts(), (std::vector<int64_t>{30, 18, 12}));
  EXPECT_EQ(parts[1].counts(), (std::vector<int64_t>{10, 6, 4}));
  EXPECT_EQ(parts[2].counts(), (std::vector<int64_t>{10, 6, 4}));
  for (const auto& part : parts) EXPECT_EQ(part.categories(), hundred_images().categories());
}

TEST(DatasetSplit, PartsAreDisjointCoverAllAndKeepDatasetOrder) {
  const auto parts = hundred_images().split({0.55, 0.3, 0.15}, 11);
  std::set<int64_t> seen;
  for (const auto& part : parts) {
    const auto ids = ids_of(part);
    EXPECT_TRUE(std::is_sorted(ids.begin(), ids.end()));
    for (int64_t i = 0; i < part.size(); ++i) {
      EXPECT_TRUE(seen.insert(ids[static_cast<size_t>(i)]).second) << "image " << ids[static_cast<size_t>(i)] << " twice";
      EXPECT_EQ(part.labels()[i], hundred_images().labels()[ids[static_cast<size_t>(i)]]);
    }
  }
  EXPECT_EQ(seen.size(), 100u);
}

TEST(DatasetSplit, LeftoverImagesGoToTheLargestRemainders) {
  // Category a has 7 images, b has 5. At 0.5/0.5 the floors are 3 + 3 and 2 + 2; the
  // image left over goes to the first part on the tie.
  const Dataset dataset = numbered_dataset(labels_with_counts({7, 5}), {1, 1, 2}, {"a", "b"});
  const auto halves = dataset.split({0.5, 0.5}, 3);
  EXPECT_EQ(halves[0].counts(), (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(halves[1].counts(), (std::vector<int64_t>{3, 2}));
  const auto uneven = dataset.split({0.3, 0.7}, 3);
  EXPECT_EQ(uneven[0].size() + uneven[1].size(), 12);
  EXPECT_EQ(uneven[0].counts(), (std::vector<int64_t>{2, 2}));  // 2.1 -> 2, 1.5 -> 1 + 1
  EXPECT_EQ(uneven[1].counts(), (std::vector<int64_t>{5, 3}));  // 4.9 -> 4 + 1, 3.5 -> 3
}

TEST(DatasetSplit, FractionsBelowOneLeaveTheRestOut) {
  const auto parts = hundred_images().split({0.5, 0.25}, 5);
  EXPECT_EQ(parts[0].counts(), (std::vector<int64_t>{25, 15, 10}));
  EXPECT_EQ(parts[1].counts(), (std::vector<int64_t>{12, 7, 5}));  // 12.5 and 7.5 stay floors: 0.75 of 50 is 37
}

TEST(DatasetSplit, SameSeedSamePartsOtherSeedOtherParts) {
  const auto first = hundred_images().split({0.5, 0.5}, 42);
  const auto again = hundred_images().split({0.5, 0.5}, 42);
  const auto other = hundred_images().split({0.5, 0.5}, 43);
  EXPECT_EQ(ids_of(first[0]), ids_of(again[0]));
  EXPECT_EQ(ids_of(first[1]), ids_of(again[1]));
  EXPECT_NE(ids_of(first[0]), ids_of(other[0]));
  EXPECT_EQ(first[0].counts(), other[0].counts());
}

TEST(DatasetSplit, ExactFractionsAreNotLostToRounding) {
  // 0.29 * 100 is 28.999999999999996 in binary floating point.
  const Dataset dataset = numbered_dataset(std::vector<int64_t>(100, 0), {1, 2, 2}, {"a"});
  const auto parts = dataset.split({0.29, 0.3}, 1);
  EXPECT_EQ(parts[0].size(), 29);
  EXPECT_EQ(parts[1].size(), 30);
}

TEST(DatasetSplit, RefusesBadFractions) {
  const Dataset& dataset = hundred_images();
  expect_error<InvalidArgument>([&] { dataset.split({}, 0); }, {"fractions must not be empty"});
  expect_error<InvalidArgument>([&] { dataset.split({0.5, 0}, 0); }, {"fractions[1] must be > 0, got 0"});
  expect_error<InvalidArgument>([&] { dataset.split({-0.2}, 0); }, {"fractions[0] must be > 0, got -0.2"});
  expect_error<InvalidArgument>([&] { dataset.split({std::nan("")}, 0); }, {"fractions[0] must be > 0"});
  expect_error<InvalidArgument>([&] { dataset.split({std::numeric_limits<double>::infinity()}, 0); },
                                {"fractions[0] must be > 0"});
  expect_error<InvalidArgument>([&] { dataset.split({0.6, 0.5}, 0); }, {"fractions must sum to at most 1, got 1.1"});
}

}  // namespace
}  // namespace dicebox
