// Elementwise passes of the frozen-expert MLP, and the generator of procedural
// experts' weights, on raw float pointers.
//
// This header is compiled once per CPU capability (expert_act_default.cpp,
// expert_act_avx2.cpp): ATen's Vectorized<float> picks its SIMD width from the
// CPU_CAPABILITY macros of the translation unit, and experts.cpp chooses the
// widest build the running CPU supports. Each function handles a block of rows
// on one thread; the caller parallelizes over rows.
#pragma once

#include <cstdint>

namespace some {
namespace act {

struct ExpertActKernels {
  // pre[r, :] += b1; act[r, :] = GELU(pre[r, :])  (exact, erf-based GELU)
  void (*bias_gelu)(float* pre, float* act, const float* b1, int64_t rows, int64_t h);
  // On entry D[r, :] = dL/da (the gradient w.r.t. the activation, before the
  // gate). On exit D[r, :] = gate[r] * D * GELU'(pre) (dL/dpre), and
  // dot[r] = Σ_c D_in[r, c] * GELU(pre[r, c]) (for the gate's gradient).
  void (*gelu_grad)(const float* pre, float* D, const float* gate, float* dot, int64_t rows,
                    int64_t h, bool need_dot);
  // dst[i - begin] = element i of tensor `tensor` of expert `expert` (csrc/philox.h),
  // for i in [begin, end): the procedural experts' weights, bit-identical in every build.
  void (*philox_uniform)(float* dst, int64_t begin, int64_t end, uint32_t seed, uint32_t layer,
                         uint32_t expert, uint32_t tensor, float bound);
};

const ExpertActKernels& kernels_default();
const ExpertActKernels& kernels_avx2();  // only valid where the CPU has AVX2 and FMA

}  // namespace act
}  // namespace some
