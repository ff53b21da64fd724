// Implementation of expert_act.h for one CPU capability; included by exactly
// one translation unit per capability, with SOME_ACT_KERNELS_NAME set to the
// accessor it defines.
#include <ATen/cpu/vec/vec.h>

#include <cmath>

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

}  // namespace

const ExpertActKernels& SOME_ACT_KERNELS_NAME() {
  static const ExpertActKernels k{&bias_gelu, &gelu_grad};
  return k;
}

}  // namespace act
}  // namespace some
