// Where the experts' weights come from (csrc/cuda/experts.cu, its only includer): stored
// tensors, or the Philox generator of csrc/philox.h (procedural experts, and the stored ones
// filled from it by fill_expert_weights).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../philox.h"
#include "common.cuh"
#include "grouped_gemm.cuh"  // aligned16

namespace some {
namespace gpu {
namespace {

// =====================================================================
// Procedural experts, and the stored ones filled from the generator
// =====================================================================

// Experts first .. first + n - 1 of one tensor kind: dst [n, per] from the generator.
template <typename T>
__global__ void fill_expert_kernel(T* __restrict__ dst, int64_t per, int64_t n, int64_t first, uint32_t seed,
                                   uint32_t layer, uint32_t tensor, float bound) {
  const int64_t blocks_per = ceil_div(per, 4), total = n * blocks_per;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride) {
    const int64_t e = g / blocks_per, blk = g % blocks_per;
    const philox::Block r = philox::philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(static_cast<uint64_t>(blk) >> 32),
                                                  static_cast<uint32_t>(first + e), tensor, seed, layer);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = blk * 4 + l;
      if (i < per) dst[e * per + i] = static_cast<T>(philox::to_uniform(r.v[l], bound));
    }
  }
}

void fill_expert_tensor(at::Tensor& t, int64_t first, uint32_t seed, uint32_t layer, uint32_t tensor,
                        int64_t fan_in, cudaStream_t stream) {
  if (t.numel() == 0) return;
  const int64_t n = t.size(0), per = t.numel() / n;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n * ceil_div(per, 4), 256), 65535));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "some_fill_experts_cuda", [&] {
    fill_expert_kernel<scalar_t><<<blocks, 256, 0, stream>>>(t.data_ptr<scalar_t>(), per, n, first, seed, layer,
                                                             tensor, philox::bound(fan_in));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Where the experts come from: stored tensors, or the generator (w1 and w2
// undefined: generated inside the GEMM loads; b1, b2 generated into small
// [N, h] / [N, d] buffers).
struct ExpertSource {
  at::Tensor w1, b1, w2, b2;
  uint32_t seed = 0, layer = 0;
  bool procedural() const { return !w1.defined(); }
};

ExpertSource procedural_source(int64_t seed, int64_t layer, int64_t N, int64_t d, int64_t h,
                               const at::TensorOptions& opts, cudaStream_t stream) {
  ExpertSource src;
  src.seed = static_cast<uint32_t>(seed);
  src.layer = static_cast<uint32_t>(layer);
  src.b1 = at::empty({N, h}, opts);
  src.b2 = at::empty({N, d}, opts);
  fill_expert_tensor(src.b1, 0, src.seed, src.layer, philox::kTensorB1, d, stream);
  fill_expert_tensor(src.b2, 0, src.seed, src.layer, philox::kTensorB2, h, stream);
  return src;
}

// A contiguous tensor whose data starts 16-byte aligned (a view with an
// offset is copied), so the 16-byte load path applies.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  auto c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

}  // namespace
}  // namespace gpu
}  // namespace some
