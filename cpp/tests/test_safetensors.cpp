// The safetensors reader/writer and atomic file writes.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "dicebox/errors.h"
#include "dicebox/safetensors.h"

using namespace dicebox;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir() {
  auto dir = fs::temp_directory_path() / ("dicebox-st-" + std::to_string(::getpid()) + "-" +
                                          ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::create_directories(dir);
  return dir;
}

TensorData floats(std::vector<int64_t> shape, std::vector<float> values) {
  TensorData t{DType::F32, std::move(shape), {}};
  t.bytes.resize(values.size() * 4);
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

}  // namespace

TEST(Safetensors, RoundTripsTensorsAndMetadata) {
  auto path = (temp_dir() / "a.safetensors").string();
  TensorMap in;
  in["0.weight"] = floats({2, 2}, {1, 2, 3, 4});
  in["0.bias"] = floats({2}, {-1, 0.5});
  TensorData rng{DType::U8, {3}, {7, 8, 9}};
  in["rng"] = rng;
  write_safetensors(path, in, {{"format", "pt"}});
  std::map<std::string, std::string> meta;
  auto out = read_safetensors(path, &meta);
  EXPECT_EQ(meta.at("format"), "pt");
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out.at("0.weight").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(out.at("0.weight").bytes, in["0.weight"].bytes);
  EXPECT_EQ(out.at("rng").bytes, rng.bytes);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(Safetensors, RejectsTruncatedAndMalformedFiles) {
  auto dir = temp_dir();
  auto path = (dir / "a.safetensors").string();
  TensorMap in;
  in["w"] = floats({4}, {1, 2, 3, 4});
  write_safetensors(path, in);
  auto bytes = read_file(path);
  auto write = [&](const std::vector<uint8_t>& b) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  };
  write(std::vector<uint8_t>(bytes.begin(), bytes.end() - 4));
  EXPECT_THROW(read_safetensors(path), IoError);
  write(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 5));
  EXPECT_THROW(read_safetensors(path), IoError);
  auto huge = bytes;
  huge[7] = 0x7f;  // header length far beyond the file
  write(huge);
  EXPECT_THROW(read_safetensors(path), IoError);
  auto garbled = bytes;
  garbled[8] = '[';
  write(garbled);
  EXPECT_THROW(read_safetensors(path), IoError);
  EXPECT_THROW(read_safetensors((dir / "missing").string()), IoError);
}

TEST(Safetensors, ErrorsNameTheFile) {
  auto path = (temp_dir() / "bad.safetensors").string();
  std::ofstream(path) << "xx";
  try {
    read_safetensors(path);
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos);
  }
}

TEST(Safetensors, RefusesShapeThatDoesNotMatchTheBytes) {
  TensorMap in;
  in["w"] = floats({3}, {1, 2, 3, 4});
  EXPECT_THROW(write_safetensors((temp_dir() / "x").string(), in), InvalidArgument);
}

TEST(AtomicWrite, UnwritableDirectoryIsAClearError) {
  try {
    const char data[] = "x";
    write_file_atomic("/nonexistent-dir/sub/file", data, 1);
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/sub/file"), std::string::npos);
  }
}

TEST(Safetensors, EmptyTensorsRoundTrip) {
  TensorMap in;
  in["empty"] = TensorData{DType::F32, {0, 3}, {}};
  in["w"] = floats({2}, {1, 2});
  const auto bytes = serialize_safetensors(in);
  const auto out = parse_safetensors(bytes.data(), bytes.size(), "memory");
  ASSERT_EQ(out.size(), 2u);
  EXPECT_TRUE(out.at("empty").bytes.empty());
  EXPECT_EQ(out.at("empty").shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(out.at("w").bytes, in["w"].bytes);
}

TEST(Safetensors, NonIntegerShapesAndOffsetsAreRejected) {
  auto parse = [](const std::string& header) {
    std::vector<uint8_t> bytes(8 + header.size() + 4, 0);
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(header.size() >> (8 * i));
    std::memcpy(bytes.data() + 8, header.data(), header.size());
    return parse_safetensors(bytes.data(), bytes.size(), "memory");
  };
  EXPECT_NO_THROW(parse(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})"));
  EXPECT_THROW(parse(R"({"w":{"dtype":"F32","shape":[1e300],"data_offsets":[0,4]}})"), IoError);
  EXPECT_THROW(parse(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0e30]}})"), IoError);
  EXPECT_THROW(parse(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})"), IoError);
  EXPECT_THROW(parse(R"({"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})"), IoError);
  EXPECT_THROW(parse(R"({"__metadata__":{"a":1}})"), IoError);
}
