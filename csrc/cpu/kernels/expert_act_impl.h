// Implementation of expert_act.h for one CPU capability; included by exactly
// one translation unit per capability, with SOME_ACT_KERNELS_NAME set to the
// accessor it defines.
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../../philox.h"
#include "expert_act.h"

namespace some {
namespace act {
namespace {

using Vec = at::vec::Vectorized<float>;

inline float hsum(const Vec& v) {
  float buf[Vec::size()];
  v.store(buf);
  float s = 0;
  for (int i = 0; i < Vec::size(); ++i) s += buf[i];
  return s;
}

void bias_gelu(float* pre, float* act, const float* b1, int64_t rows, int64_t h) {
  const Vec half(0.5f), one(1.0f), inv_sqrt2(static_cast<float>(M_SQRT1_2));
  for (int64_t r = 0; r < rows; ++r) {
    float* p = pre + r * h;
    float* a = act + r * h;
    int64_t c = 0;
    for (; c + Vec::size() <= h; c += Vec::size()) {
      Vec v = Vec::loadu(p + c) + Vec::loadu(b1 + c);
      v.store(p + c);
      (half * v * (one + (v * inv_sqrt2).erf())).store(a + c);
    }
    for (; c < h; ++c) {
      const float v = p[c] + b1[c];
      p[c] = v;
      a[c] = 0.5f * v * (1.0f + std::erf(v * static_cast<float>(M_SQRT1_2)));
    }
  }
}

void gelu_grad(const float* pre, float* D, const float* gate, float* dot, int64_t rows,
               int64_t h, bool need_dot) {
  constexpr float kInvSqrt2Pi = 0.3989422804014327f;
  const Vec half(0.5f), one(1.0f), inv_sqrt2(static_cast<float>(M_SQRT1_2)),
      minus_half(-0.5f), inv_sqrt_2pi(kInvSqrt2Pi);
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = pre + r * h;
    float* d = D + r * h;
    const Vec g(gate[r]);
    Vec acc(0.0f);
    float acc_tail = 0;
    int64_t c = 0;
    for (; c + Vec::size() <= h; c += Vec::size()) {
      const Vec x = Vec::loadu(p + c), dv = Vec::loadu(d + c);
      const Vec cdf = half * (one + (x * inv_sqrt2).erf());
      const Vec pdf = inv_sqrt_2pi * (minus_half * x * x).exp();
      if (need_dot) acc = at::vec::fmadd(dv, x * cdf, acc);
      (g * dv * (cdf + x * pdf)).store(d + c);
    }
    for (; c < h; ++c) {
      const float x = p[c], dv = d[c];
      const float cdf = 0.5f * (1.0f + std::erf(x * static_cast<float>(M_SQRT1_2)));
      const float pdf = kInvSqrt2Pi * std::exp(-0.5f * x * x);
      acc_tail += dv * x * cdf;
      d[c] = gate[r] * dv * (cdf + x * pdf);
    }
    if (need_dot) dot[r] = hsum(acc) + acc_tail;
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// 32-bit x 32-bit -> (hi, lo) in each of the 8 lanes.
inline __m256i mulhilo8(__m256i a, __m256i m, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6 as 64 bits
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);   // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256 uniform8(__m256i bits, __m256 scale, __m256 bound) {
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8)), scale);  // exact
  const __m256 centered = _mm256_sub_ps(_mm256_add_ps(u, u), _mm256_set1_ps(1.0f));      // exact
  return _mm256_mul_ps(centered, bound);                                                   // one rounding
}

// 8 Philox blocks (32 consecutive elements from block `blk`) per iteration.
void philox_uniform(float* dst, int64_t begin, int64_t end, uint32_t seed, uint32_t layer, uint32_t expert,
                    uint32_t tensor, float bound) {
  int64_t i = begin;
  const int64_t head = std::min<int64_t>(end, (begin + 3) & ~int64_t{3});
  philox::fill_range(dst, i, head, seed, layer, expert, tensor, bound);
  i = head;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 scale = _mm256_set1_ps(5.9604644775390625e-08f), vb = _mm256_set1_ps(bound);
  for (; i + 32 <= end; i += 32) {
    const uint64_t blk = static_cast<uint64_t>(i) >> 2;
    if ((blk >> 32) != ((blk + 7) >> 32)) break;  // the high counter word changes inside: scalar tail
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk))), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk >> 32)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(expert));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(tensor));
    uint32_t k0 = seed, k1 = layer;
    for (int r = 0; r < philox::kRounds; ++r) {
      if (r > 0) {
        k0 += philox::kWeyl0;
        k1 += philox::kWeyl1;
      }
      __m256i lo0, lo1;
      const __m256i hi0 = mulhilo8(c0, m0, lo0), hi1 = mulhilo8(c2, m1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    // lane j of f0..f3 is element 4j + 0..3: transpose to 32 consecutive floats
    const __m256 f0 = uniform8(c0, scale, vb), f1 = uniform8(c1, scale, vb);
    const __m256 f2 = uniform8(c2, scale, vb), f3 = uniform8(c3, scale, vb);
    const __m256 t0 = _mm256_unpacklo_ps(f0, f1), t1 = _mm256_unpackhi_ps(f0, f1);
    const __m256 t2 = _mm256_unpacklo_ps(f2, f3), t3 = _mm256_unpackhi_ps(f2, f3);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    float* o = dst + (i - begin);
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
  philox::fill_range(dst + (i - begin), i, end, seed, layer, expert, tensor, bound);
}
#else
void philox_uniform(float* dst, int64_t begin, int64_t end, uint32_t seed, uint32_t layer, uint32_t expert,
                    uint32_t tensor, float bound) {
  philox::fill_range(dst, begin, end, seed, layer, expert, tensor, bound);
}
#endif

}  // namespace

const ExpertActKernels& SOME_ACT_KERNELS_NAME() {
  static const ExpertActKernels k{&bias_gelu, &gelu_grad, &philox_uniform};
  return k;
}

}  // namespace act
}  // namespace some
