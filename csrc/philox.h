// The counter-based generator of the frozen experts (docs/method.md §9), one copy for
// the CPU kernels and the CUDA kernels (and, in Python,
// some/nn/generator.py, checked bit for bit against this one).
//
// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011; the Random123 reference): a bijection of a
// 128-bit counter under a 64-bit key, 10 rounds. Generator "some-philox-v1":
//
//   element i of tensor t (W1 = 0, b1 = 1, W2 = 2, b2 = 3) of expert e in
//   layer l of a model with seed s is lane i % 4 of
//       philox4x32_10(counter = (i / 4 low 32 bits, i / 4 high 32 bits, e, t),
//                     key = (s, l)),
//   turned into u = (bits >> 8) * 2^-24 in [0, 1) and then, in float32,
//   w = (2u - 1) * bound with bound = float32(1 / sqrt(fan_in)): U(-bound, bound)
//   as nn.Linear draws its weight and bias (fan_in = d for W1 and b1, h for W2
//   and b2). 2u - 1 is exact in float32, so the one rounding is the product:
//   every compiler and device gives the same bits. The value is then rounded
//   to the experts' dtype.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SOME_PHILOX_FN __host__ __device__ __forceinline__
#else
#define SOME_PHILOX_FN inline
#endif

namespace some {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;
constexpr uint32_t kVersion = 1;  // "some-philox-v1": the mapping above

enum Tensor : uint32_t { kTensorW1 = 0, kTensorB1 = 1, kTensorW2 = 2, kTensorB2 = 3 };

struct Block {
  uint32_t v[4];
};

SOME_PHILOX_FN void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
SOME_PHILOX_FN Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                   uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    if (r > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Block{{c0, c1, c2, c3}};
}

// float32(1 / sqrt(fan_in)), the bound of nn.Linear's uniform draw.
SOME_PHILOX_FN float bound(int64_t fan_in) {
  return static_cast<float>(1.0 / ::sqrt(static_cast<double>(fan_in)));
}

// One draw from 32 random bits: (2u - 1) * bound, u = (bits >> 8) * 2^-24.
SOME_PHILOX_FN float to_uniform(uint32_t bits, float b) {
  const float u = static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // 2^-24
  const float centered = 2.0f * u - 1.0f;  // exact
  return centered * b;
}

// Elements [begin, end) of tensor `t` of expert `e`, written as dst[i - begin].
template <typename Out>
SOME_PHILOX_FN void fill_range(Out* dst, int64_t begin, int64_t end, uint32_t seed, uint32_t layer,
                               uint32_t expert, uint32_t t, float b) {
  for (int64_t i = begin; i < end;) {
    const uint64_t blk = static_cast<uint64_t>(i) >> 2;
    const Block r = philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), expert, t,
                                  seed, layer);
    for (int lane = static_cast<int>(i & 3); lane < 4 && i < end; ++lane, ++i)
      dst[i - begin] = static_cast<Out>(to_uniform(r.v[lane], b));
  }
}

}  // namespace philox
}  // namespace some
