// Fuzz target: safetensors images (parse_safetensors). A parse that succeeds must give
// tensors whose byte counts match their shapes and dtypes, and serialising them again
// must parse back to the same tensors and metadata.
#include "dicebox/errors.h"
#include "dicebox/safetensors.h"
#include "fuzz_support.h"

using namespace dicebox;
using fuzz::require;

namespace {

size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

bool same_tensors(const TensorMap& a, const TensorMap& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, tensor] : a) {
    auto other = b.find(name);
    if (other == b.end() || other->second.dtype != tensor.dtype || other->second.shape != tensor.shape ||
        other->second.bytes != tensor.bytes)
      return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::map<std::string, std::string> metadata;
  TensorMap tensors;
  try {
    tensors = parse_safetensors(data, size, "input", &metadata);
  } catch (const IoError&) {
    return 0;
  }
  for (const auto& [name, tensor] : tensors) {
    size_t count = 1;
    for (int64_t dim : tensor.shape) {
      require(dim >= 0, "negative dimension");
      count *= static_cast<size_t>(dim);
    }
    require(tensor.bytes.size() == count * element_size(tensor.dtype), "bytes do not match the shape");
  }
  const auto bytes = serialize_safetensors(tensors, metadata);
  std::map<std::string, std::string> metadata_again;
  const TensorMap again = parse_safetensors(bytes.data(), bytes.size(), "serialised", &metadata_again);
  require(same_tensors(tensors, again), "serialised tensors parse differently");
  require(metadata == metadata_again, "serialised metadata parses differently");
  return 0;
}
