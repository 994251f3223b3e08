// Reading and writing the safetensors format (8-byte header length, JSON header, raw
// little-endian data). Written here because no C++ safetensors library is packaged for
// Debian and the format is small; the Python `safetensors` package reads our files in
// the tests. Files are written atomically (temporary file, fsync, rename).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dicebox {

enum class DType { F32, I64, U8 };

struct TensorData {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, row-major
};

using TensorMap = std::map<std::string, TensorData>;

// The bytes of a safetensors file holding `tensors` (and `metadata`, when not empty).
std::vector<uint8_t> serialize_safetensors(const TensorMap& tensors,
                                           const std::map<std::string, std::string>& metadata = {});
void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata = {});
// Throws IoError naming the file when it is missing, truncated or malformed.
TensorMap read_safetensors(const std::string& path,
                           std::map<std::string, std::string>* metadata = nullptr);
// Parses a safetensors image held in memory (`what` names it in errors).
TensorMap parse_safetensors(const uint8_t* data, size_t size, const std::string& what,
                            std::map<std::string, std::string>* metadata = nullptr);

// Writes bytes to `path` atomically: `path`.tmp, fsync, rename. Throws IoError.
void write_file_atomic(const std::string& path, const void* data, size_t size);
std::vector<uint8_t> read_file(const std::string& path);

}  // namespace dicebox
