// CUDA kernels of some::experts and some::experts_backward (docs/method.md §3 step 5):
// the op entry points and the small kernels around the GEMMs. The parts, one job each:
// the token-by-expert grouping in grouping.cu (declared in common.cuh), the hand-written
// grouped GEMM in grouped_gemm.cuh, its epilogues in gemm_epilogues.cuh, where the weights
// come from (stored or Philox-generated) in expert_source.cuh, and the at::_grouped_mm
// path in grouped_mm.cuh.
//
// Plan (the CPU's, csrc/cpu/experts.cpp, without host synchronization):
//   1. group the (token, slot) pairs by expert on the device (`order`,
//      `offsets`, same meaning as the CPU's); the backward reuses them;
//   2. grouped GEMMs: every thread block computes one (row tile, column tile)
//      of one expert's segment. Blocks are mapped to (expert, tile) by a
//      device-side schedule (cumulative row-tile counts per expert, from
//      `offsets`); the grid is a host-known upper bound, ceil(P/BM) + N row
//      tiles, and blocks past the real count exit at once, so the host never
//      needs the counts. A rows are gathered through `order` while loading the
//      tile (no padded or permuted copies of x / grad_y);
//   3. fused epilogues on the accumulator tile: bias + GELU (storing the
//      pre-activation `hidden` in grouped order, as the CPU), gate * (· + b2),
//      and in the backward gate * dA * GELU'(pre) with the row dot
//      dA · GELU(pre) for the gate gradient;
//   4. per-token combine in slot order (a second pass instead of atomics), so
//      every output is bit-identical run to run.
// The experts are frozen: no weight gradient is ever computed.
//
// Math: bfloat16 uses tensor cores (WMMA 16x16x16, fp32 accumulators);
// float32 and float64 use a plain FMA tiled path in their own precision
// (fp32 stays true fp32, as on the CPU). Accumulation type: at::opmath_type.
// Every GEMM result is rounded to the input dtype before its epilogue (a
// no-op for fp32 / fp64), where the CPU's at::mm_out into bf16 buffers and
// at::_grouped_mm (bf16 output only) round it: all three paths share their
// bf16 rounding points (see grouped_gemm_kernel's epilogue).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string>

#include "../checks.h"
#include "../op_checks.h"
#include "../philox.h"
#include "common.cuh"
#include "expert_source.cuh"
#include "gemm_epilogues.cuh"
#include "grouped_gemm.cuh"
#include "grouped_mm.cuh"

namespace some {
namespace gpu {
namespace {

// =====================================================================
// Small kernels around the GEMMs
// =====================================================================

// out[t, :] = Σ_j pairs[t*k + j, :] over the valid slots, in slot order.
template <typename T, typename acc_t>
__global__ void combine_pairs_kernel(const acc_t* __restrict__ pairs,
                                     const int64_t* __restrict__ indices, int64_t k, int64_t d,
                                     int64_t num_experts, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = t * k + j, e = indices[p];
      if (e >= 0 && e < num_experts) acc += pairs[p * d + c];
    }
    out[t * d + c] = static_cast<T>(acc);
  }
}

// Rows past the valid pairs of `hidden` are defined as zeros (as the CPU).
template <typename T>
__global__ void zero_tail_rows_kernel(T* __restrict__ hidden, const int64_t* __restrict__ offsets,
                                      int num_experts, int64_t P, int64_t h) {
  const int64_t first = offsets[num_experts] * h, total = P * h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    hidden[i] = T(0);
}

// dL/dg of each valid pair: Σ over column tiles of the row dots (fixed
// order) + grad_y_t · b2_e. One warp per grouped row.
template <typename T, typename acc_t>
__global__ void gate_grad_kernel(const acc_t* __restrict__ dotpart, int64_t col_tiles,
                                 const int64_t* __restrict__ order,
                                 const int64_t* __restrict__ offsets, int num_experts,
                                 const int64_t* __restrict__ indices,
                                 const T* __restrict__ grad_y, const T* __restrict__ b2, int64_t k,
                                 int64_t d, T* __restrict__ grad_gates) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= offsets[num_experts]) return;  // whole warp
  const int64_t p = order[r], e = indices[p], t = p / k;
  acc_t acc = 0;
  for (int64_t c = lane; c < d; c += kWarpSize)
    acc += static_cast<acc_t>(grad_y[t * d + c]) * static_cast<acc_t>(b2[e * d + c]);
  acc = warp_sum(acc);
  if (lane == 0) {
    acc_t dot = 0;
    for (int64_t ct = 0; ct < col_tiles; ++ct) dot += dotpart[r * col_tiles + ct];
    grad_gates[p] = static_cast<T>(dot + acc);
  }
}

// =====================================================================
// Host side
// =====================================================================

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_forward_cuda(
    const char* op, const at::Tensor& x_in, const at::Tensor& indices_in, const at::Tensor& gates_in,
    const ExpertSource& src, int64_t N, int64_t h) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = aligned_contiguous(x_in);
  const auto gates = gates_in.contiguous();
  const auto indices = indices_in.contiguous();
  const int64_t T = x.size(0), d = x.size(1), k = indices.size(1), P = T * k;
  at::Tensor order, offsets;  // (not a structured binding: the dispatch lambda captures them)
  std::tie(order, offsets) = group_by_expert_cuda(op, indices, N);
  auto hidden = at::empty({P, h}, x.options());
  auto y = at::empty({T, d}, x.options());
  if (T == 0) return {y, hidden, order, offsets};
  if (P == 0 || N == 0) {  // k == 0 or no experts: nothing selected
    hidden.zero_();
    y.zero_();
    return {y, hidden, order, offsets};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "some_experts_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Tile = TileFor<scalar_t>;
    const auto opts_acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto act = at::empty({P, h}, x.options());  // GELU(pre), grouped rows
    auto ypair = at::empty({P, d}, opts_acc);   // g * E_e(x_t) per flat pair
    const int64_t* ord = order.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t* I = indices.data_ptr<int64_t>();

    if (grouped_mm_path(x, src, N, d, h)) {
      const auto ends = group_ends(offsets, N);
      auto xg = at::empty({P, d}, x.options());
      gather_grouped_rows_kernel<scalar_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
          x.data_ptr<scalar_t>(), ord, k, d, xg.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto up = grouped_mm(xg, src.w1.transpose(1, 2), ends);  // (P, h)
      bias_gelu_rows_kernel<scalar_t><<<static_cast<unsigned>(P), 256, 0, stream>>>(
          up.data_ptr<scalar_t>(), ord, I, src.b1.data_ptr<scalar_t>(), h, N, hidden.data_ptr<scalar_t>(),
          act.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto down = grouped_mm(act, src.w2.transpose(1, 2), ends);  // (P, d)
      ypair.zero_();  // dropped slots stay 0 (the combine skips them anyway)
      gate_bias_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
          down.data_ptr<scalar_t>(), ord, I, gates.data_ptr<scalar_t>(), src.b2.data_ptr<scalar_t>(), d, N,
          ypair.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const auto tile_start = tile_schedule_cuda(offsets, N, Tile::kBM);
      const int64_t row_tiles = max_row_tiles(P, N, Tile::kBM);
      const int* ts = tile_start.data_ptr<int>();
      const scalar_t* w1p = src.procedural() ? nullptr : src.w1.data_ptr<scalar_t>();
      const scalar_t* w2p = src.procedural() ? nullptr : src.w2.data_ptr<scalar_t>();

      // pre = x[token] W1_e^T + b1_e, act = GELU(pre)      (B = W1_e, [h][d])
      GemmArgs<scalar_t> up{x.data_ptr<scalar_t>(), ord, k, w1p, h * d, static_cast<int>(d), static_cast<int>(h),
                            off, ts, static_cast<int>(N), src.seed, src.layer, philox::kTensorW1, philox::bound(d)};
      EpiBiasGelu<scalar_t> up_epi{hidden.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                                   src.b1.data_ptr<scalar_t>(), h};
      launch_grouped_gemm</*gather*/ true, /*B transposed*/ true>(up, up_epi, row_tiles, stream);

      // ypair[p] = g_p (act W2_e^T + b2_e)                  (B = W2_e, [d][h])
      GemmArgs<scalar_t> down{act.data_ptr<scalar_t>(), ord, k, w2p, d * h, static_cast<int>(h),
                              static_cast<int>(d), off, ts, static_cast<int>(N), src.seed, src.layer,
                              philox::kTensorW2, philox::bound(h)};
      EpiGateBias<scalar_t> down_epi{ypair.data_ptr<acc_t>(), src.b2.data_ptr<scalar_t>(),
                                     gates.data_ptr<scalar_t>(), d};
      launch_grouped_gemm<false, true>(down, down_epi, row_tiles, stream);
    }

    if (d > 0) {
      combine_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), 128, 0, stream>>>(
          ypair.data_ptr<acc_t>(), I, k, d, N, y.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (h > 0) {
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(P * h, 256), 1024));
      zero_tail_rows_kernel<scalar_t><<<blocks, 256, 0, stream>>>(hidden.data_ptr<scalar_t>(), off,
                                                                  static_cast<int>(N), P, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, hidden, order, offsets};
}

// The backward trusts no grouping it is given: it regroups `indices` on the
// device (a few small kernels, no synchronization; stable, so identical to the
// forward's) and only checks that the given order/offsets have its shapes.
// Stale or foreign grouping tensors can therefore never make a kernel read or
// write outside a tensor.
std::tuple<at::Tensor, at::Tensor> experts_backward_cuda_impl(
    const char* op, const at::Tensor& grad_y_in, const at::Tensor& indices_in, const at::Tensor& gates_in,
    const ExpertSource& src, int64_t N, int64_t h, const at::Tensor& hidden, bool need_grad_x,
    bool need_grad_gates) {
  const int64_t T = indices_in.size(0), d = grad_y_in.size(1), k = indices_in.size(1), P = T * k;
  c10::cuda::CUDAGuard guard(grad_y_in.device());
  const auto grad_y = aligned_contiguous(grad_y_in);
  const auto gates = gates_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto hid = hidden.contiguous();
  at::Tensor ord_t, off_t;
  std::tie(ord_t, off_t) = group_by_expert_cuda(op, indices, N);

  auto grad_x = need_grad_x ? at::empty({T, d}, grad_y.options()) : at::empty({0}, grad_y.options());
  auto grad_gates =
      need_grad_gates ? at::zeros({T, k}, gates.options()) : at::empty({0}, gates.options());
  if ((!need_grad_x && !need_grad_gates) || T == 0) return {grad_x, grad_gates};
  if (P == 0 || N == 0) {
    grad_x.zero_();
    return {grad_x, grad_gates};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_y.scalar_type(), "some_experts_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Tile = TileFor<scalar_t>;
    const auto opts_acc = grad_y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t* ord = ord_t.data_ptr<int64_t>();
    const int64_t* off = off_t.data_ptr<int64_t>();
    const int64_t* I = indices.data_ptr<int64_t>();
    auto grad_pre = need_grad_x ? at::empty({P, h}, grad_y.options()) : at::Tensor();
    at::Tensor xpair = need_grad_x ? at::empty({P, d}, opts_acc) : at::Tensor();
    at::Tensor dotpart;
    int64_t col_tiles = 0;

    if (grouped_mm_path(grad_y, src, N, d, h)) {
      const auto ends = group_ends(off_t, N);
      auto gyg = at::empty({P, d}, grad_y.options());
      gather_grouped_rows_kernel<scalar_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
          grad_y.data_ptr<scalar_t>(), ord, k, d, gyg.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto dA = grouped_mm(gyg, src.w2, ends);  // (P, h): dL/da before the gate
      col_tiles = 1;
      dotpart = need_grad_gates ? at::empty({P, 1}, opts_acc) : at::Tensor();
      const int warps = 8;
      gelu_grad_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(ceil_div(P, warps)), warps * kWarpSize, 0,
                                               stream>>>(
          dA.data_ptr<scalar_t>(), hid.data_ptr<scalar_t>(), ord, off, static_cast<int>(N),
          gates.data_ptr<scalar_t>(), h, need_grad_x ? grad_pre.data_ptr<scalar_t>() : nullptr,
          need_grad_gates ? dotpart.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad_x) {
        const auto rows = grouped_mm(grad_pre, src.w1, ends);  // (P, d)
        xpair.zero_();
        scatter_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
            rows.data_ptr<scalar_t>(), ord, d, xpair.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      const auto tile_start = tile_schedule_cuda(off_t, N, Tile::kBM);
      const int64_t row_tiles = max_row_tiles(P, N, Tile::kBM);
      const int* ts = tile_start.data_ptr<int>();
      col_tiles = ceil_div(h, Tile::kBN);
      dotpart = need_grad_gates ? at::empty({P, col_tiles}, opts_acc) : at::Tensor();
      const scalar_t* w1p = src.procedural() ? nullptr : src.w1.data_ptr<scalar_t>();
      const scalar_t* w2p = src.procedural() ? nullptr : src.w2.data_ptr<scalar_t>();

      // dA = grad_y[token] W2_e (before the gate), fused GELU' and row dots.
      // (B = W2_e stored [d][h] = [K][ncols])
      GemmArgs<scalar_t> da{grad_y.data_ptr<scalar_t>(), ord, k, w2p, d * h, static_cast<int>(d),
                            static_cast<int>(h), off, ts, static_cast<int>(N), src.seed, src.layer,
                            philox::kTensorW2, philox::bound(h)};
      EpiGeluGrad<scalar_t> da_epi{hid.data_ptr<scalar_t>(), need_grad_x ? grad_pre.data_ptr<scalar_t>() : nullptr,
                                   gates.data_ptr<scalar_t>(),
                                   need_grad_gates ? dotpart.data_ptr<acc_t>() : nullptr, h, col_tiles};
      launch_grouped_gemm<true, false>(da, da_epi, row_tiles, stream);
      if (need_grad_x && d > 0) {
        // per-pair dL/dx = grad_pre W1_e     (B = W1_e stored [h][d] = [K][ncols])
        GemmArgs<scalar_t> dx{h > 0 ? grad_pre.data_ptr<scalar_t>() : nullptr, ord, k, w1p, h * d,
                              static_cast<int>(h), static_cast<int>(d), off, ts, static_cast<int>(N), src.seed,
                              src.layer, philox::kTensorW1, philox::bound(d)};
        EpiScatter<scalar_t> dx_epi{xpair.data_ptr<acc_t>(), d};
        launch_grouped_gemm<false, false>(dx, dx_epi, row_tiles, stream);
      }
    }

    if (need_grad_gates) {
      const int warps_per_block = 8;
      gate_grad_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(ceil_div(P, warps_per_block)), warps_per_block * kWarpSize, 0, stream>>>(
              h > 0 ? dotpart.data_ptr<acc_t>() : nullptr, h > 0 ? col_tiles : 0, ord, off,
              static_cast<int>(N), I, grad_y.data_ptr<scalar_t>(), src.b2.data_ptr<scalar_t>(), k, d,
              grad_gates.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_grad_x && d > 0) {
      combine_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), 128, 0, stream>>>(
          xpair.data_ptr<acc_t>(), I, k, d, N, grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (need_grad_x) {
      grad_x.zero_();
    }
  });
  return {grad_x, grad_gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_cuda(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const char* op = "some.experts";
  check_expert_inputs(op, x, indices, gates, w1, b1, w2, b2);
  ExpertSource src{w1, b1, w2, b2};
  return experts_forward_cuda(op, x, indices, gates, src, w1.size(0), w1.size(1));
}

std::tuple<at::Tensor, at::Tensor> experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& hidden,
    const at::Tensor& order, const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.experts_backward";
  check_experts_backward_inputs(op, grad_y, indices, gates, w1, w2, b2, hidden, order, offsets);
  ExpertSource src{w1, at::Tensor(), w2, b2};
  return experts_backward_cuda_impl(op, grad_y, indices, gates, src, w1.size(0), w1.size(1), hidden, need_grad_x,
                                    need_grad_gates);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> procedural_experts_cuda(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates, int64_t seed, int64_t layer,
    int64_t num_experts, int64_t d_ffn) {
  const char* op = "some.procedural_experts";
  check_procedural_expert_inputs(op, x, indices, gates, seed, layer, num_experts, d_ffn);
  c10::cuda::CUDAGuard guard(x.device());
  const auto src = procedural_source(seed, layer, num_experts, x.size(1), d_ffn, x.options(),
                                     c10::cuda::getCurrentCUDAStream());
  return experts_forward_cuda(op, x, indices, gates, src, num_experts, d_ffn);
}

std::tuple<at::Tensor, at::Tensor> procedural_experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& indices, const at::Tensor& gates, int64_t seed, int64_t layer,
    int64_t num_experts, int64_t d_ffn, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.procedural_experts_backward";
  check_procedural_backward_inputs(op, grad_y, indices, gates, seed, layer, num_experts, d_ffn, hidden, order,
                                   offsets);
  c10::cuda::CUDAGuard guard(grad_y.device());
  const auto src = procedural_source(seed, layer, num_experts, grad_y.size(1), d_ffn, grad_y.options(),
                                     c10::cuda::getCurrentCUDAStream());
  return experts_backward_cuda_impl(op, grad_y, indices, gates, src, num_experts, d_ffn, hidden, need_grad_x,
                                    need_grad_gates);
}

void fill_expert_weights_cuda(at::Tensor& w1, at::Tensor& b1, at::Tensor& w2, at::Tensor& b2, int64_t seed,
                              int64_t layer, int64_t first_expert) {
  const char* op = "some.fill_expert_weights";
  check_fill_expert_weights_inputs(op, w1, b1, w2, b2, seed, layer, first_expert);
  c10::cuda::CUDAGuard guard(w1.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t h = w1.size(1), d = w1.size(2);
  const auto s = static_cast<uint32_t>(seed), l = static_cast<uint32_t>(layer);
  fill_expert_tensor(w1, first_expert, s, l, philox::kTensorW1, d, stream);
  fill_expert_tensor(b1, first_expert, s, l, philox::kTensorB1, d, stream);
  fill_expert_tensor(w2, first_expert, s, l, philox::kTensorW2, h, stream);
  fill_expert_tensor(b2, first_expert, s, l, philox::kTensorB2, h, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CUDA, m) {
  m.impl("experts", &experts_cuda);
  m.impl("experts_backward", &experts_backward_cuda);
  m.impl("procedural_experts", &procedural_experts_cuda);
  m.impl("procedural_experts_backward", &procedural_experts_backward_cuda);
  m.impl("fill_expert_weights", &fill_expert_weights_cuda);
}

}  // namespace gpu
}  // namespace some
