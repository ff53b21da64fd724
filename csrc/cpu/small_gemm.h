// The experts' per-expert products on the CPU, called straight into torch's BLAS.
//
// With many experts each one gets a few rows (N = 2048, k = 4, T = 2048: four on
// average), and at::mm_out on views of slices adds dispatch, shape checks and tensor
// bookkeeping to every one of those small products (4 per expert and layer). (Measured on
// the `small` preset at N = 2048: the step did not measurably change, since MKL packs each
// expert's weights for a product of a few rows; see the README.) These helpers call the BLAS that at::mm itself calls for float32 and
// float64 (sgemm_/dgemm_, which torch's libtorch_cpu exports where it is built with
// MKL or OpenBLAS) with the arguments at::mm passes for the same row-major operands, so
// the results are the bits at::mm gives in the same place (tests/test_ops.py compares
// them with torch.mm on one thread); where torch exports no such symbol (weak references
// resolve to null), for bfloat16 and for empty or 2^31-sized products, they fall back to
// at::mm_out. (The bits are at::mm's as long as at::mm itself takes BLAS for these dtypes: not
// where float32 matmul precision below "highest" sends it to oneDNN, nor where another BLAS
// loaded first provides the symbols.)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <type_traits>

extern "C" {
// Fortran BLAS, column-major. Weak: resolved from libtorch_cpu when it has them.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace some {
namespace small_gemm {

template <typename scalar_t>
constexpr bool has_blas_type = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// Whether the direct BLAS path serves scalar_t (float/double with the symbol present).
template <typename scalar_t>
bool direct() {
  if constexpr (std::is_same_v<scalar_t, float>) return sgemm_ != nullptr;
  if constexpr (std::is_same_v<scalar_t, double>) return dgemm_ != nullptr;
  return false;
}

// ... and for a product of these sizes: BLAS takes 32-bit sizes, and an empty product (a zero
// width) is left to at::mm, which writes the zeros BLAS would refuse to.
inline bool direct_sizes(int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  return m > 0 && n > 0 && k > 0 && m <= kMax && n <= kMax && k <= kMax;
}

// Column-major C (m × n, ldc) = op(A) · op(B), as at::mm hands it to BLAS.
template <typename scalar_t>
void blas(char ta, char tb, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
          int64_t ldb, scalar_t* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const scalar_t one = 1, zero = 0;
  if constexpr (std::is_same_v<scalar_t, float>)
    sgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
  else
    dgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
}

inline at::Tensor view(const void* p, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, opts);
}

// C (m × n) = A (m × k) · B, all row-major and contiguous; B is stored (k × n), or (n × k)
// with b_transposed (the product then takes Bᵀ).
template <typename scalar_t>
void product(scalar_t* c, const scalar_t* a, const scalar_t* b, int64_t m, int64_t n, int64_t k, bool b_transposed,
             const at::TensorOptions& opts) {
  if constexpr (has_blas_type<scalar_t>) {
    if (direct<scalar_t>() && direct_sizes(m, n, k)) {
      // row-major C is column-major Cᵀ (n × m) = op(B) · Aᵀ, A's row-major storage being Aᵀ
      // column-major ('N'); B stored (k × n) row-major is column-major (n × k) ('N', ld n),
      // stored (n × k) its rows are columns of length k ('T', ld k)
      blas<scalar_t>(b_transposed ? 't' : 'n', 'n', n, m, k, b, b_transposed ? k : n, a, k, c, n);
      return;
    }
  }
  auto out = view(c, m, n, opts);
  at::mm_out(out, view(a, m, k, opts), b_transposed ? view(b, n, k, opts).t() : view(b, k, n, opts));
}

}  // namespace small_gemm
}  // namespace some
