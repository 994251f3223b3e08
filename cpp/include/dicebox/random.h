// The core's own small random number generator (splitmix64) and key hashing. Every seeded
// draw in dicebox (splits, epoch order, augmentation, evolution) goes through it, because
// std::shuffle and the std distributions differ between standard libraries and dicebox's
// results must not.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace dicebox {

inline constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// One 64-bit state from several keys (seed, stream, epoch, ...): independent streams.
inline uint64_t hash_keys(std::initializer_list<uint64_t> keys) {
  uint64_t h = 0;
  for (uint64_t key : keys) h = mix64((h ^ key) + kGoldenGamma);
  return h;
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() { return mix64(state_ += kGoldenGamma); }
  // Uniform in [0, bound), without modulo bias.
  uint64_t below(uint64_t bound) {
    const uint64_t threshold = (0 - bound) % bound;
    for (;;)
      if (uint64_t r = next(); r >= threshold) return r % bound;
  }
  // Uniform in [low, high), from the top 53 bits.
  double uniform(double low, double high) {
    return low + (high - low) * static_cast<double>(next() >> 11) * 0x1.0p-53;
  }
  bool chance(double probability) { return uniform(0.0, 1.0) < probability; }
  // Fisher-Yates.
  template <typename T>
  void shuffle(std::vector<T>& values) {
    for (size_t i = values.size(); i > 1; --i) std::swap(values[i - 1], values[below(i)]);
  }
  uint64_t state() const { return state_; }

 private:
  uint64_t state_;
};

}  // namespace dicebox
