// The epilogues of the experts' grouped GEMMs (csrc/cuda/experts.cu, its only includer):
// what each GEMM does with its finished accumulator tile (bias, GELU, gate, the row dot of
// the gate gradient), one functor per GEMM of the forward and the backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common.cuh"

namespace some {
namespace gpu {
namespace {

// ---- epilogues -------------------------------------------------------
// `acc` / `v` / `dv` below: the GEMM result already rounded to T (grouped_gemm_kernel, grouped_gemm.cuh).

// Forward up-projection: pre = acc + b1_e (stored as `hidden`, grouped rows),
// act = GELU(pre) (input of the down-projection).
template <typename T>
struct EpiBiasGelu {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = false;
  T* hidden;
  T* act;
  const T* b1;
  int64_t h;
  __device__ acc_t row_scale(int64_t) const { return acc_t(1); }
  __device__ acc_t apply(int e, int64_t r, int64_t, int col, acc_t v, acc_t) const {
    // act from the stored (rounded) pre-activation: the backward takes GELU' there
    const T stored = static_cast<T>(v + static_cast<acc_t>(b1[e * h + col]));
    v = static_cast<acc_t>(stored);
    hidden[r * h + col] = stored;
    act[r * h + col] = static_cast<T>(v * gelu_cdf(v));
    return acc_t(0);
  }
  __device__ void row_done(int64_t, int, acc_t) const {}
};

// Forward down-projection: out[pair] = g * (acc + b2_e), in acc precision,
// indexed by the flat pair so that the combine reads a token's slots in order.
template <typename T>
struct EpiGateBias {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = false;
  acc_t* out;
  const T* b2;
  const T* gates;
  int64_t d;
  __device__ acc_t row_scale(int64_t pair) const { return static_cast<acc_t>(gates[pair]); }
  __device__ acc_t apply(int e, int64_t, int64_t pair, int col, acc_t v, acc_t g) const {
    out[pair * d + col] = g * (v + static_cast<acc_t>(b2[e * d + col]));
    return acc_t(0);
  }
  __device__ void row_done(int64_t, int, acc_t) const {}
};

// Backward first GEMM, acc = dL/da (before the gate): grad_pre = g * dA *
// GELU'(pre) (grouped rows, input of the second GEMM) and the partial row dot
// Σ_col dA · GELU(pre) of this column tile (for dL/dg).
template <typename T>
struct EpiGeluGrad {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = true;
  const T* hidden;
  T* grad_pre;    // nullptr when grad_x is not needed
  const T* gates;
  acc_t* dotpart; // [P, col_tiles]; nullptr when grad_gates is not needed
  int64_t h;
  int64_t col_tiles;
  __device__ acc_t row_scale(int64_t pair) const { return static_cast<acc_t>(gates[pair]); }
  __device__ acc_t apply(int, int64_t r, int64_t, int col, acc_t dv, acc_t g) const {
    const acc_t x = static_cast<acc_t>(hidden[r * h + col]);
    const acc_t cdf = gelu_cdf(x);
    if (grad_pre != nullptr) grad_pre[r * h + col] = static_cast<T>(g * dv * (cdf + x * gelu_pdf(x)));
    return dv * x * cdf;
  }
  __device__ void row_done(int64_t r, int col_tile, acc_t dot) const {
    if (dotpart != nullptr) dotpart[r * col_tiles + col_tile] = dot;
  }
};

// Backward second GEMM: per-pair dL/dx rows, indexed by the flat pair.
template <typename T>
struct EpiScatter {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = false;
  acc_t* out;
  int64_t d;
  __device__ acc_t row_scale(int64_t) const { return acc_t(1); }
  __device__ acc_t apply(int, int64_t, int64_t pair, int col, acc_t v, acc_t) const {
    out[pair * d + col] = v;
    return acc_t(0);
  }
  __device__ void row_done(int64_t, int, acc_t) const {}
};

}  // namespace
}  // namespace gpu
}  // namespace some
