// Shared helpers of the fuzz targets: a reader that carves typed values out of the fuzz
// input, an in-memory file for the parsers that take paths, and the invariant check that
// turns a broken promise into a crash libFuzzer (or the replay test) reports.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace dicebox::fuzz {

// Aborts with `message` when `condition` is false: an invariant of a successful parse broke.
inline void require(bool condition, const char* message) {
  if (condition) return;
  std::fprintf(stderr, "fuzz invariant violated: %s\n", message);
  std::abort();
}

// Reads the fuzz input front to back; past the end every read yields zeros.
class InputReader {
 public:
  InputReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  uint8_t byte() { return position_ < size_ ? data_[position_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(byte() | byte() << 8); }
  uint32_t u32() { return uint32_t{u16()} | uint32_t{u16()} << 16; }
  uint64_t u64() { return uint64_t{u32()} | uint64_t{u32()} << 32; }
  // An integer in [low, high].
  int64_t in_range(int64_t low, int64_t high) {
    const auto span = static_cast<uint64_t>(high - low) + 1;
    return low + static_cast<int64_t>(u32() % span);
  }
  // A double in [0, 1].
  double unit() { return u16() / 65535.0; }
  // Up to `count` bytes (fewer when the input runs out).
  std::vector<uint8_t> bytes(size_t count) {
    const size_t take = std::min(count, size_ - position_);
    std::vector<uint8_t> out(data_ + position_, data_ + position_ + take);
    position_ += take;
    return out;
  }
  std::vector<uint8_t> rest() { return bytes(size_ - position_); }
  size_t remaining() const { return size_ - position_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t position_ = 0;
};

// Two files packed in one input: a 4-byte little-endian length n, n bytes of the first
// file (fewer if the input is shorter), then the second file to the end.
inline std::pair<std::vector<uint8_t>, std::vector<uint8_t>> split_two_files(const uint8_t* data, size_t size) {
  InputReader in(data, size);
  auto first = in.bytes(in.u32());
  return {std::move(first), in.rest()};
}

// A file held in memory (memfd), reachable by path for parsers that open files themselves.
class MemoryFile {
 public:
  MemoryFile(const void* data, size_t size) {
    fd_ = ::memfd_create("dicebox-fuzz", MFD_CLOEXEC);
    require(fd_ >= 0, "memfd_create failed");
    const auto* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t n = ::write(fd_, p, size);
      require(n > 0, "writing the memory file failed");
      p += n;
      size -= static_cast<size_t>(n);
    }
  }
  ~MemoryFile() { ::close(fd_); }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;

  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_ = -1;
};

// A scratch directory for round trips through files, made once per process.
inline const std::string& scratch_directory() {
  static const std::string path = [] {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/dicebox-fuzz-XXXXXX";
    require(::mkdtemp(pattern.data()) != nullptr, "mkdtemp failed");
    return pattern;
  }();
  return path;
}

}  // namespace dicebox::fuzz
