// The device-side grouping of the (token, slot) pairs by expert, shared by the
// CUDA kernels of every op family (experts.cu, route.cu, keystore.cu; declared
// in common.cuh): the CUDA counterpart of csrc/cpu/grouping.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../checks.h"
#include "../op_checks.h"
#include "common.cuh"

namespace some {
namespace gpu {

// =====================================================================
// Grouping of the (token, slot) pairs by expert
// =====================================================================
//
// The flat pair list is cut into tiles of `pairs_per_tile` consecutive pairs,
// one warp per tile. Three passes (plus two tiny scans):
//   count:   tile_counts[tile][e] = pairs of tile with expert e;
//   scan:    per expert, exclusive prefix over tiles (-> start of the tile's
//            run inside the expert's segment) and the expert's total;
//   scatter: order[offsets[e] + start + rank] = p, the rank within the tile
//            from __match_any_sync over each 32-pair chunk, in pair order.
// Tiles, chunks and lanes are visited in increasing pair order, so the
// grouping is stable (identical to the CPU's counting sort).

namespace {

constexpr int kGroupWarpsPerBlock = 4;

// Expert of pair p if in 0..N-1, else -1 (dropped).
__device__ __forceinline__ int pair_expert(const int64_t* indices, int64_t p, int64_t end,
                                           int num_experts) {
  if (p >= end) return -1;
  const int64_t v = indices[p];
  return (v >= 0 && v < num_experts) ? static_cast<int>(v) : -1;
}

__global__ void group_count_kernel(const int64_t* __restrict__ indices, int64_t P,
                                   int num_experts, int64_t pairs_per_tile, int64_t num_tiles,
                                   int* __restrict__ tile_counts) {
  const int64_t tile = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (tile >= num_tiles) return;  // whole warp
  const int lane = threadIdx.x % kWarpSize;
  int* cnt = tile_counts + tile * num_experts;
  const int64_t begin = tile * pairs_per_tile;
  const int64_t end = min(P, begin + pairs_per_tile);
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int e = pair_expert(indices, base + lane, end, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, e);
    // One lane per distinct expert updates its counter: no two lanes write
    // the same address, and only this warp owns row `tile`.
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();  // the next chunk sees these counts
  }
}

// One thread per expert: exclusive prefix over the tiles (in place) and the
// expert's total into offsets[e + 1].
__global__ void group_scan_tiles_kernel(int* __restrict__ tile_counts, int64_t num_tiles,
                                        int num_experts, int64_t* __restrict__ offsets) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  int run = 0;
#pragma unroll 8
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int c = tile_counts[t * num_experts + e];
    tile_counts[t * num_experts + e] = run;
    run += c;
  }
  offsets[e + 1] = run;
}

// offsets[1..N] hold the per-expert counts; turn them into prefix sums
// (offsets[0] is already 0). One block.
__global__ void offsets_scan_kernel(int64_t* __restrict__ offsets, int num_experts) {
  __shared__ int64_t scratch[kWarpSize];
  int64_t carry = 0;
  for (int base = 0; base < num_experts; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const int64_t v = i < num_experts ? offsets[i + 1] : 0;
    int64_t total;
    const int64_t s = block_inclusive_scan(v, scratch, total);
    if (i < num_experts) offsets[i + 1] = carry + s;
    carry += total;
  }
}

__global__ void group_scatter_kernel(const int64_t* __restrict__ indices, int64_t P,
                                     int num_experts, int64_t pairs_per_tile, int64_t num_tiles,
                                     int* __restrict__ tile_cursor,
                                     const int64_t* __restrict__ offsets,
                                     int64_t* __restrict__ order) {
  const int64_t tile = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (tile >= num_tiles) return;
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  int* cursor = tile_cursor + tile * num_experts;
  const int64_t begin = tile * pairs_per_tile;
  const int64_t end = min(P, begin + pairs_per_tile);
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t p = base + lane;
    const int e = pair_expert(indices, p, end, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int leader = __ffs(peers) - 1;
    int run = 0;
    if (e >= 0 && lane == leader) {
      run = cursor[e];
      cursor[e] = run + __popc(peers);
    }
    run = __shfl_sync(kFullMask, run, leader);
    if (e >= 0) order[offsets[e] + run + __popc(peers & lanes_below)] = p;
    __syncwarp();
  }
}

// tile_start[e + 1] = Σ_{e' <= e} ceil(n_e' / rows_per_tile). One block.
__global__ void tile_schedule_kernel(const int64_t* __restrict__ offsets, int num_experts,
                                     int rows_per_tile, int* __restrict__ tile_start) {
  __shared__ int scratch[kWarpSize];
  if (threadIdx.x == 0) tile_start[0] = 0;
  int carry = 0;
  for (int base = 0; base < num_experts; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const int v = i < num_experts
                      ? static_cast<int>(ceil_div(offsets[i + 1] - offsets[i], rows_per_tile))
                      : 0;
    int total;
    const int s = block_inclusive_scan(v, scratch, total);
    if (i < num_experts) tile_start[i + 1] = carry + s;
    carry += total;
  }
}

// The CPU's IndexError, at the price of a synchronization (opt-in).
void check_index_range_sync(const char* op, const at::Tensor& idx, int64_t N) {
  const auto flat = idx.reshape({-1});
  const auto bad = flat.lt(-1).logical_or(flat.ge(N));
  if (!bad.any().item<bool>()) return;
  const int64_t p = bad.to(at::kByte).argmax().item<int64_t>();  // first bad position
  const int64_t e = flat[p].item<int64_t>();
  TORCH_CHECK_INDEX(false, op, ": indices must be in -1..N-1 = -1..", N - 1, ", found ", e,
                    " at flat position ", p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> group_by_expert_cuda(const char* op, const at::Tensor& indices,
                                                        int64_t N) {
  const auto idx = indices.contiguous();
  const int64_t P = idx.numel();
  TORCH_CHECK_VALUE(P < INT_MAX, op, ": at most ", INT_MAX - 1, " (token, slot) pairs are supported on CUDA, got ", P);
  TORCH_CHECK_VALUE(N >= 0 && N < INT_MAX, op, ": too many experts (", N, ")");
  if (device_value_checks_requested()) check_index_range_sync(op, idx, N);
  c10::cuda::CUDAGuard guard(idx.device());
  auto offsets = at::zeros({N + 1}, idx.options());
  auto order = at::full({P}, -1, idx.options());
  if (P == 0 || N == 0) return {order, offsets};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // About 256 pairs per warp, but at most 4M tile counters in all.
  int64_t num_tiles = std::min<int64_t>(ceil_div(P, 256), std::max<int64_t>(1, (int64_t{1} << 22) / N));
  const int64_t pairs_per_tile = ceil_div(ceil_div(P, num_tiles), kWarpSize) * kWarpSize;
  num_tiles = ceil_div(P, pairs_per_tile);
  auto tile_counts = at::zeros({num_tiles, N}, idx.options().dtype(at::kInt));

  const int threads = kGroupWarpsPerBlock * kWarpSize;
  const auto blocks = static_cast<unsigned>(ceil_div(num_tiles, kGroupWarpsPerBlock));
  const int64_t* I = idx.data_ptr<int64_t>();
  int* TC = tile_counts.data_ptr<int>();
  int64_t* off = offsets.data_ptr<int64_t>();
  const int n = static_cast<int>(N);

  group_count_kernel<<<blocks, threads, 0, stream>>>(I, P, n, pairs_per_tile, num_tiles, TC);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_scan_tiles_kernel<<<static_cast<unsigned>(ceil_div(N, 256)), 256, 0, stream>>>(TC, num_tiles, n, off);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  offsets_scan_kernel<<<1, 1024, 0, stream>>>(off, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_scatter_kernel<<<blocks, threads, 0, stream>>>(I, P, n, pairs_per_tile, num_tiles, TC, off,
                                                       order.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, offsets};
}

at::Tensor tile_schedule_cuda(const at::Tensor& offsets, int64_t N, int64_t rows_per_tile) {
  c10::cuda::CUDAGuard guard(offsets.device());
  auto tile_start = at::empty({N + 1}, offsets.options().dtype(at::kInt));
  tile_schedule_kernel<<<1, 1024, 0, c10::cuda::getCurrentCUDAStream()>>>(
      offsets.data_ptr<int64_t>(), static_cast<int>(N), static_cast<int>(rows_per_tile),
      tile_start.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tile_start;
}

}  // namespace gpu
}  // namespace some
