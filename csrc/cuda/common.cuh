// Shared pieces of the CUDA kernels (csrc/cuda/*.cu).
//
// * device helpers: warp/block reductions and scans with a fixed combination
//   order (so every result is bit-identical run to run), exact-GELU pieces;
// * host entry points of the device-side token-by-expert grouping and of the
//   grouped tile schedule. They are defined once in grouping.cu and used by
//   experts.cu, route.cu and keystore.cu; they never synchronize with the host.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <type_traits>

#include "../checks.h"

namespace some {
namespace gpu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- math

template <typename acc_t>
__device__ __forceinline__ acc_t dev_exp(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return expf(x);
  else return exp(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t dev_erf(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return erff(x);
  else return erf(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t dev_sqrt(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) return sqrtf(x);
  else return sqrt(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + dev_exp(-x));
}

// Φ(x), the standard normal CDF: GELU(x) = x Φ(x) (exact, erf-based, as the CPU).
template <typename acc_t>
__device__ __forceinline__ acc_t gelu_cdf(acc_t x) {
  return acc_t(0.5) * (acc_t(1) + dev_erf(x * acc_t(0.70710678118654752440)));
}

// φ(x), the standard normal density: GELU'(x) = Φ(x) + x φ(x).
template <typename acc_t>
__device__ __forceinline__ acc_t gelu_pdf(acc_t x) {
  return acc_t(0.39894228040143267794) * dev_exp(acc_t(-0.5) * x * x);
}

// ------------------------------------------------------- warp / block

// Butterfly sum: every lane ends with the same, bitwise identical value
// (each step adds two values commutatively), so the result is deterministic.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const T n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Inclusive scan over the whole block (blockDim.x a multiple of 32, at most
// 1024); `total` receives the block's sum. `scratch` holds 32 values in
// shared memory. All threads must call it.
template <typename T>
__device__ __forceinline__ T block_inclusive_scan(T v, T* scratch, T& total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_inclusive_scan(v);
  if (lane == kWarpSize - 1) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? scratch[lane] : T(0);
    w = warp_inclusive_scan(w);
    scratch[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += scratch[warp - 1];
  total = scratch[nwarps - 1];
  __syncthreads();  // scratch may be reused right away
  return v;
}

// Deterministic block sum: warp butterflies, then warp 0 adds the per-warp
// sums in warp order. Every thread receives the result. `scratch` holds 33
// values in shared memory. All threads must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T s = scratch[0];
    for (int w = 1; w < nwarps; ++w) s += scratch[w];
    scratch[kWarpSize] = s;
  }
  __syncthreads();
  const T s = scratch[kWarpSize];
  __syncthreads();
  return s;
}

// ----------------------------------------------- grouped tile schedule

// The expert whose row tiles contain `tile`, from the cumulative tile counts
// tile_start[0..N] (tile_start[0] = 0, non-decreasing). The caller has checked
// tile < tile_start[N]; experts with no rows own no tile and are skipped.
__device__ __forceinline__ int expert_of_tile(const int* tile_start, int num_experts, int tile) {
  int lo = 0, hi = num_experts;  // invariant: tile_start[lo] <= tile < tile_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid] <= tile) lo = mid;
    else hi = mid;
  }
  return lo;
}

// An upper bound of Σ_e ceil(n_e / rows_per_tile) for P rows over N experts,
// known on the host without reading the counts: the grid size of a grouped
// launch whose surplus blocks exit at once.
inline int64_t max_row_tiles(int64_t P, int64_t N, int64_t rows_per_tile) {
  return ceil_div(P, rows_per_tile) + std::min(N, P);
}

// ------------------------------------------------ host entry points
// (defined in experts.cu)

// Stable grouping of the flat (token, slot) pairs by expert, on the device,
// with the CPU's meaning (csrc/cpu/grouping.h): `order` [T*k] lists the pairs
// of expert 0, then expert 1, ..., each in increasing pair order, and ends
// with -1 for the dropped (-1) slots; `offsets` [N+1] are the prefix sums of
// the per-expert counts. No host synchronization.
//
// Indices outside -1..N-1 cannot be reported without a synchronization: they
// are dropped like -1 slots (never dereferenced). With the environment
// variable SOME_CHECK_INDICES=1 a synchronous check raises the CPU's
// IndexError instead (a debugging aid).
std::tuple<at::Tensor, at::Tensor> group_by_expert_cuda(const char* op, const at::Tensor& indices,
                                                        int64_t num_experts);

// tile_start [N+1] (int32): cumulative number of `rows_per_tile`-row tiles of
// the experts' segments in `offsets`, computed on the device.
at::Tensor tile_schedule_cuda(const at::Tensor& offsets, int64_t num_experts,
                              int64_t rows_per_tile);

}  // namespace gpu
}  // namespace some
