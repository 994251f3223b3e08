// The safetensors reader and writer, and atomic whole-file writes (see safetensors.h).
#include "dicebox/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dicebox/errors.h"

namespace dicebox {
namespace {

using json = nlohmann::json;

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

DType parse_dtype(const std::string& s, const std::string& what) {
  if (s == "F32") return DType::F32;
  if (s == "I64") return DType::I64;
  if (s == "U8") return DType::U8;
  throw IoError(what + ": unsupported dtype " + s);
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

void write_file_atomic(const std::string& path, const void* data, size_t size) {
  // A unique temporary name: two writers of the same path (two processes exporting one
  // dataset, say) must never write into one temporary file and rename a mix into place.
  std::string tmp = path + ".XXXXXX.tmp";
  int fd = ::mkostemps(tmp.data(), 4, O_CLOEXEC);
  if (fd < 0) throw IoError("cannot write " + path + ": " + errno_text());
  ::fchmod(fd, 0644);
  const auto* p = static_cast<const char*>(data);
  size_t left = size;
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string why = errno_text();
      ::close(fd);
      ::unlink(tmp.c_str());
      throw IoError("cannot write " + path + ": " + why);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    std::string why = errno_text();
    ::unlink(tmp.c_str());
    throw IoError("cannot write " + path + ": " + why);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string why = errno_text();
    ::unlink(tmp.c_str());
    throw IoError("cannot write " + path + ": " + why);
  }
  // Make the rename itself durable.
  std::string dir = std::filesystem::path(path).parent_path().string();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + path + ": " + errno_text());
  in.seekg(0, std::ios::end);
  std::streamoff size = in.tellg();
  if (size < 0) throw IoError("cannot read " + path);
  in.seekg(0);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    throw IoError("cannot read " + path + ": short read");
  return bytes;
}

std::vector<uint8_t> serialize_safetensors(const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    size_t expected = dtype_size(t.dtype);
    for (auto d : t.shape) expected *= static_cast<size_t>(d);
    if (expected != t.bytes.size())
      throw InvalidArgument("tensor " + name + ": shape does not match its " + std::to_string(t.bytes.size()) + " bytes");
    header[name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape},
                    {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
  std::vector<uint8_t> out(8 + text.size() + offset);
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  uint8_t* data = out.data() + 8 + text.size();
  for (const auto& [name, t] : tensors) {
    // An empty tensor's vector may hold no buffer at all, and memcpy from null is undefined.
    if (t.bytes.empty()) continue;
    std::memcpy(data, t.bytes.data(), t.bytes.size());
    data += t.bytes.size();
  }
  return out;
}

void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const auto bytes = serialize_safetensors(tensors, metadata);
  write_file_atomic(path, bytes.data(), bytes.size());
}

TensorMap parse_safetensors(const uint8_t* bytes, size_t size, const std::string& what,
                            std::map<std::string, std::string>* metadata) {
  if (size < 8) throw IoError(what + ": too short for a safetensors file");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t{bytes[i]} << (8 * i);
  if (n > size - 8 || n > (uint64_t{100} << 20)) throw IoError(what + ": header length " + std::to_string(n) + " exceeds the file");
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + n);
  } catch (const json::exception& e) {
    throw IoError(what + ": malformed header (" + e.what() + ")");
  }
  if (!header.is_object()) throw IoError(what + ": malformed header");
  const uint8_t* data = bytes + 8 + n;
  const size_t data_size = size - 8 - n;
  TensorMap out;
  // Every number is checked to be a non-negative integer before it is read as one: a JSON
  // number may be any double, and converting one that does not fit is undefined behaviour.
  auto malformed = [&](const std::string& name, const std::string& why) {
    return IoError(what + ": tensor " + name + " " + why);
  };
  try {
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) throw IoError(what + ": __metadata__ must be an object of strings");
        for (const auto& [k, v] : entry.items()) {
          if (!v.is_string()) throw IoError(what + ": __metadata__ must be an object of strings");
          if (metadata) (*metadata)[k] = v.get<std::string>();
        }
        continue;
      }
      if (!entry.is_object()) throw malformed(name, "is not an object");
      TensorData t;
      t.dtype = parse_dtype(entry.at("dtype").get<std::string>(), what);
      const json& shape = entry.at("shape");
      if (!shape.is_array()) throw malformed(name, "has a bad shape");
      size_t count = 1;
      for (const auto& d : shape) {
        if (!d.is_number_unsigned()) throw malformed(name, "has a bad shape");
        const uint64_t dim = d.get<uint64_t>();
        if (dim > (uint64_t{1} << 40) || (dim > 0 && count > (size_t{1} << 40) / dim))
          throw malformed(name, "has a bad shape");
        t.shape.push_back(static_cast<int64_t>(dim));
        count *= static_cast<size_t>(dim);
      }
      const json& offsets = entry.at("data_offsets");
      if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
          !offsets[1].is_number_unsigned())
        throw malformed(name, "has bad data_offsets");
      const auto begin = offsets[0].get<uint64_t>();
      const auto end = offsets[1].get<uint64_t>();
      if (begin > end || end > data_size || end - begin != count * dtype_size(t.dtype))
        throw malformed(name, "lies outside the file or does not match its shape");
      t.bytes.assign(data + begin, data + end);
      out.emplace(name, std::move(t));
    }
  } catch (const json::exception& e) {
    throw IoError(what + ": malformed header (" + e.what() + ")");
  }
  return out;
}

TensorMap read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  auto bytes = read_file(path);
  return parse_safetensors(bytes.data(), bytes.size(), path, metadata);
}

}  // namespace dicebox
