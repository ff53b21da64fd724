// The experts through PyTorch's at::_grouped_mm (CUTLASS, sm_90) for bfloat16
// (csrc/cuda/experts.cu, its only includer): when it applies, and the small kernels around it.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <torch/version.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common.cuh"
#include "expert_source.cuh"

namespace some {
namespace gpu {
namespace {

// =====================================================================
// The CUTLASS path: at::_grouped_mm (TMA + wgmma on sm_90) for bfloat16
// =====================================================================
//
// Two grouped GEMMs per direction through PyTorch's grouped GEMM over the
// device-side grouping, with small fused kernels around them. Rows of the
// grouped buffers are in `order`; rows past the valid pairs are never read
// (at::_grouped_mm leaves its output rows past the last group end unwritten).
//
// Rounding: the same points as the kernels above (each GEMM result rounded to
// bf16, then bias / GELU / gate in fp32), but CUTLASS sums every dot product in
// another order than the WMMA tiles, so a GEMM output can differ by one bf16
// ulp (2^-8 relative) and everything downstream by its consequences: stored
// experts on this path match procedural experts (always the kernels) and the
// kernels' own results to bf16 rounding, not bit for bit.

// Whether at::_grouped_mm takes the bf16 calls below (2d x 3d, int32 group ends)
// on its CUTLASS kernel, without raising or synchronizing. Its limits, read in
// PyTorch's source (aten/src/ATen/native/cuda/GroupedBlas.cpp _grouped_mm_cuda,
// GroupMM.cu bf16bf16_grouped_gemm_impl_sm90_sm100, GroupMMCommon.cuh
// prepare_grouped_gemm_data, aten/src/ATen/native/GroupedMMUtils.h):
//  * at most 1,023 groups: TORCH_CHECK(group_count < 1024, "Can't process more
//    than 1024 groups") (its argument kernel runs one thread per group in one block);
//  * every operand row stride a multiple of 16 bytes and every data pointer
//    16-byte aligned (check_valid_strides_and_return_transposed): d and h
//    multiples of 8, and not 0 (a zero-width contiguous operand has stride 1 and
//    is refused); then its output (P, h) / (P, d) is unpadded
//    (create_grouped_gemm_output_tensor pads rows to 16 bytes), as the kernels
//    around it index it. Our grouped buffers are fresh allocations (aligned);
//    w1 / w2 are contiguous (checked) but may start anywhere;
//  * empty groups are fine for 2d x 3d: prepare_grouped_gemm_data asserts
//    delta > 0 only for a ragged K (2d x 2d);
//  * torch builds that CUTLASS kernel only off Windows with CUDA >= 12
//    (BUILD_GG_KERNEL in GroupMM.cu), else the call raises; checked against our
//    toolkit, which is assumed to be torch's major version.
// The device (checked in grouped_mm_path): the no-sync path is taken for
// compute capability major 9 (newer torch: also 10), and GroupMM.cu is compiled
// as sm_90a, which runs on 9.0 only; anywhere else _grouped_mm_fallback copies
// the group ends to the host (a synchronization) and loops over the groups.
// at::_grouped_mm exists from torch 2.8 on: older builds always take the own kernels.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define SOME_HAVE_GROUPED_MM 1
#else
#define SOME_HAVE_GROUPED_MM 0
#endif

at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends) {
#if SOME_HAVE_GROUPED_MM
  return at::_grouped_mm(a, b, ends);
#else
  TORCH_CHECK(false, "some: at::_grouped_mm needs torch >= 2.8 (grouped_mm_fits should have refused)");
#endif
}

bool grouped_mm_fits(const ExpertSource& src, int64_t N, int64_t d, int64_t h) {
#if !SOME_HAVE_GROUPED_MM || defined(_WIN32) || !defined(CUDART_VERSION) || CUDART_VERSION < 12000
  return false;
#else
  return N >= 1 && N < 1024 && d > 0 && h > 0 && d % 8 == 0 && h % 8 == 0 && aligned16(src.w1.data_ptr()) &&
         aligned16(src.w2.data_ptr());
#endif
}

bool grouped_mm_path(const at::Tensor& x, const ExpertSource& src, int64_t N, int64_t d, int64_t h) {
  const char* v = std::getenv("SOME_CUDA_GEMM");  // kernels | grouped_mm | auto (default)
  const std::string choice = v == nullptr ? "auto" : v;
  if (choice == "kernels" || src.procedural() || x.scalar_type() != at::kBFloat16) return false;
  if (!grouped_mm_fits(src, N, d, h)) return false;
  // Forced: any GPU (off compute capability 9.0, torch's synchronizing loop; a testing aid).
  if (choice == "grouped_mm") return true;
  int major = 0, minor = 0;
  const int dev = x.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;  // sm_90 exactly (see grouped_mm_fits)
}

// dst[r] = src[order[r] / k] (or zeros for the dropped tail), rows of width w.
template <typename T>
__global__ void gather_grouped_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ order, int64_t k,
                                           int64_t w, T* __restrict__ dst) {
  const int64_t r = blockIdx.x, p = order[r];
  for (int64_t c = threadIdx.x; c < w; c += blockDim.x) dst[r * w + c] = p >= 0 ? src[(p / k) * w + c] : T(0);
}

// hidden = pre = acc + b1_e (rounded to T), act = GELU(pre) from the rounded value.
template <typename T>
__global__ void bias_gelu_rows_kernel(const T* __restrict__ acc, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ indices, const T* __restrict__ b1, int64_t h,
                                      int64_t num_experts, T* __restrict__ hidden, T* __restrict__ act) {
  using acc_t = at::opmath_type<T>;
  const int64_t r = blockIdx.x, p = order[r];
  const int64_t e = p >= 0 ? indices[p] : -1;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    if (e < 0 || e >= num_experts) {
      hidden[r * h + c] = T(0);
      act[r * h + c] = T(0);
      continue;
    }
    const T stored = static_cast<T>(static_cast<acc_t>(acc[r * h + c]) + static_cast<acc_t>(b1[e * h + c]));
    const acc_t v = static_cast<acc_t>(stored);
    hidden[r * h + c] = stored;
    act[r * h + c] = static_cast<T>(v * gelu_cdf(v));
  }
}

// out[pair] = g * (acc + b2_e), per flat pair, in acc precision (combine input).
template <typename T, typename acc_t>
__global__ void gate_bias_pairs_kernel(const T* __restrict__ acc, const int64_t* __restrict__ order,
                                       const int64_t* __restrict__ indices, const T* __restrict__ gates,
                                       const T* __restrict__ b2, int64_t d, int64_t num_experts,
                                       acc_t* __restrict__ out) {
  const int64_t r = blockIdx.x, p = order[r];
  if (p < 0) return;
  const int64_t e = indices[p];
  if (e < 0 || e >= num_experts) return;
  const acc_t g = static_cast<acc_t>(gates[p]);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    out[p * d + c] = g * (static_cast<acc_t>(acc[r * d + c]) + static_cast<acc_t>(b2[e * d + c]));
}

// grad_pre = g * dA * GELU'(pre); dotpart[r] = Σ_c dA * GELU(pre) (one warp per row).
// Only the valid rows r < offsets[N] (the bound read here, no host sync): rows
// of dA past the last group end were never written by at::_grouped_mm, and
// uninitialized memory can hold NaN (NaN * 0 = NaN). The rows of grad_pre and
// dotpart past it stay unwritten too; nothing reads them (the second grouped
// GEMM stops at offsets[N], scatter_pairs_kernel and gate_grad_kernel skip them).
template <typename T, typename acc_t>
__global__ void gelu_grad_rows_kernel(const T* __restrict__ dA, const T* __restrict__ hidden,
                                      const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                      int num_experts, const T* __restrict__ gates, int64_t h,
                                      T* __restrict__ grad_pre, acc_t* __restrict__ dotpart) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= offsets[num_experts]) return;  // whole warp
  const int64_t p = order[r];
  const acc_t g = p >= 0 ? static_cast<acc_t>(gates[p]) : acc_t(0);  // (defensive: p >= 0 on valid rows)
  acc_t dot = 0;
  for (int64_t c = lane; c < h; c += kWarpSize) {
    const acc_t x = static_cast<acc_t>(hidden[r * h + c]), dv = static_cast<acc_t>(dA[r * h + c]);
    const acc_t cdf = gelu_cdf(x);
    if (grad_pre != nullptr) grad_pre[r * h + c] = static_cast<T>(g * dv * (cdf + x * gelu_pdf(x)));
    dot += dv * x * cdf;
  }
  dot = warp_sum(dot);
  if (lane == 0 && dotpart != nullptr) dotpart[r] = dot;
}

// xpair[pair] = rows[r] (acc precision), per flat pair.
template <typename T, typename acc_t>
__global__ void scatter_pairs_kernel(const T* __restrict__ rows, const int64_t* __restrict__ order, int64_t d,
                                     acc_t* __restrict__ out) {
  const int64_t r = blockIdx.x, p = order[r];
  if (p < 0) return;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) out[p * d + c] = static_cast<acc_t>(rows[r * d + c]);
}

// The group ends of at::_grouped_mm: offsets[1..N] as int32, on the device.
at::Tensor group_ends(const at::Tensor& offsets, int64_t N) { return offsets.narrow(0, 1, N).to(at::kInt); }

}  // namespace
}  // namespace gpu
}  // namespace some
