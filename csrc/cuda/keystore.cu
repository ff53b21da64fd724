// CUDA kernels of some::keystore_stats and some::keystore_update (docs/method.md §4).
//
// keystore_stats: sums per expert from the device-side grouping (common.cuh),
// in two deterministic passes (per row tile of an expert's segment, then per
// expert over its tiles in order), so the sums are bit-identical run to run
// and no expert's token count serializes the work. The co-selection counts use
// integer atomics, whose result does not depend on their order.
//
// Differences from the CPU, both to avoid a host synchronization:
//   * keystore_stats does not raise on a non-finite query or gate: NaN/Inf
//     propagate into the statistics, and keystore_update detects them;
//   * keystore_update decides "finite?" on the device: the update kernels read
//     that flag and leave keys, velocity and usage untouched when it is false.
//     The flag is the op's (CUDA, bool) result; reading it (some.ops does,
//     to warn) is the caller's synchronization, not the op's.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../op_checks.h"
#include "../route_common.h"  // row_norm
#include "common.cuh"

namespace some {
namespace gpu {
namespace {

constexpr double kNormEps = 1e-12;
constexpr double kRepulsionEps = 1e-8;  // max(D, 1e-8) in the repulsion term

// ---------------------------------------------------------------- stats

// Rows of an expert's segment per partial sum, and the block shape of the
// partial pass: 8 row groups x 32 columns.
constexpr int kStatRows = 64;
constexpr int kStatCols = 32;
constexpr int kStatRowGroups = 8;

// partial[tile, c] = Σ_{rows of tile} g_p q̂_t[c] for c < d, and Σ g_p at
// c == d (the mass). One block per (row tile, 32 columns).
template <typename acc_t>
__global__ void stats_partial_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ g,
                                     const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ offsets,
                                     const int* __restrict__ tile_start, int num_experts,
                                     int64_t k, int64_t d, acc_t* __restrict__ partial) {
  __shared__ acc_t red[kStatRowGroups][kStatCols];
  const int tile = blockIdx.x;
  if (tile >= tile_start[num_experts]) return;  // surplus block
  const int e = expert_of_tile(tile_start, num_experts, tile);
  const int64_t r0 = offsets[e] + static_cast<int64_t>(tile - tile_start[e]) * kStatRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kStatRows), offsets[e + 1] - r0));
  const int cg = threadIdx.x % kStatCols, rg = threadIdx.x / kStatCols;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kStatCols + cg;
  acc_t acc = 0;
  for (int m = rg; m < rows; m += kStatRowGroups) {
    const int64_t p = order[r0 + m];
    const acc_t v = col < d ? q[(p / k) * d + col] : acc_t(1);
    acc += g[p] * v;
  }
  red[rg][cg] = acc;
  __syncthreads();
  if (rg == 0 && col <= d) {
    acc_t s = red[0][cg];
    for (int i = 1; i < kStatRowGroups; ++i) s += red[i][cg];
    partial[tile * (d + 1) + col] = s;
  }
}

// sum_q[e, c] (c < d) / mass[e] (c == d): Σ of expert e's tiles in order.
template <typename acc_t>
__global__ void stats_reduce_kernel(const acc_t* __restrict__ partial,
                                    const int* __restrict__ tile_start, int64_t d,
                                    acc_t* __restrict__ sum_q, acc_t* __restrict__ mass) {
  const int e = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col > d) return;
  acc_t s = 0;
  for (int64_t tile = tile_start[e]; tile < tile_start[e + 1]; ++tile) s += partial[tile * (d + 1) + col];
  if (col < d) sum_q[e * d + col] = s;
  else mass[e] = s;
}

// coselect[e, f] += 1 for every slot pair (j, j') of a token with experts
// e != f (as the CPU, which counts per selected pair). Integer atomics: the
// result does not depend on their order.
__global__ void coselect_kernel(const int64_t* __restrict__ idx, int64_t P, int64_t k, int64_t N,
                                unsigned long long* __restrict__ coselect) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const int64_t e = idx[p];
  if (e < 0 || e >= N) return;
  const int64_t t = p / k;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t f = idx[t * k + j];
    if (f >= 0 && f < N && f != e) atomicAdd(coselect + e * N + f, 1ull);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> keystore_stats_cuda(
    const at::Tensor& query, const at::Tensor& indices, const at::Tensor& gates,
    int64_t num_experts) {
  const char* op = "some.keystore_stats";
  // The non-finite check of the CPU is left out (see the top of this file).
  check_keystore_stats_inputs(op, query, indices, gates, num_experts);
  c10::cuda::CUDAGuard guard(query.device());

  const int64_t T = query.size(0), d = query.size(1), k = indices.size(1), N = num_experts,
                P = T * k;
  const auto acc = stats_dtype(query.scalar_type());
  auto q = query.to(acc).contiguous();
  q = q / row_norm(q).clamp_min(kNormEps);
  const auto g = gates.to(acc).contiguous();
  const auto idx = indices.contiguous();
  at::Tensor order, offsets;
  std::tie(order, offsets) = group_by_expert_cuda(op, idx, N);

  auto sum_q = at::empty({N, d}, q.options());
  auto mass = at::empty({N}, q.options());
  auto counts = offsets.narrow(0, 1, N) - offsets.narrow(0, 0, N);
  auto coselect = at::zeros({N, N}, idx.options());
  if (P == 0) {
    sum_q.zero_();
    mass.zero_();
    return {sum_q, mass, counts, coselect};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto tile_start = tile_schedule_cuda(offsets, N, kStatRows);
  const int64_t tiles = max_row_tiles(P, N, kStatRows);
  AT_DISPATCH_FLOATING_TYPES(acc, "some_keystore_stats_cuda", [&] {
    auto partial = at::empty({tiles, d + 1}, q.options());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(d + 1, kStatCols)));
    stats_partial_kernel<scalar_t><<<grid, kStatCols * kStatRowGroups, 0, stream>>>(
        q.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
        offsets.data_ptr<int64_t>(), tile_start.data_ptr<int>(), static_cast<int>(N), k, d,
        partial.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 rgrid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(d + 1, 128)));
    stats_reduce_kernel<scalar_t><<<rgrid, 128, 0, stream>>>(
        partial.data_ptr<scalar_t>(), tile_start.data_ptr<int>(), d, sum_q.data_ptr<scalar_t>(),
        mass.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  coselect_kernel<<<static_cast<unsigned>(ceil_div(P, 256)), 256, 0, stream>>>(
      idx.data_ptr<int64_t>(), P, k, N,
      reinterpret_cast<unsigned long long*>(coselect.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_q, mass, counts, coselect};
}

// --------------------------------------------------------------- update

// Pairwise key distances D (full [N, N], zero diagonal) and the upper
// triangle {D_ef : e < f} in row-major order, one warp per pair e < f.
template <typename scalar_t>
__global__ void distances_kernel(const scalar_t* __restrict__ K, int64_t N, int64_t d,
                                 scalar_t* __restrict__ D, scalar_t* __restrict__ upper) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (w >= N * N) return;
  const int64_t e = w / N, f = w % N;
  if (e == f) {
    if (lane == 0) D[e * N + f] = 0;
    return;
  }
  if (f < e) return;  // written by the warp of (f, e)
  scalar_t s = 0;
  for (int64_t c = lane; c < d; c += kWarpSize) {
    const scalar_t diff = K[e * d + c] - K[f * d + c];
    s += diff * diff;
  }
  s = warp_sum(s);
  if (lane == 0) {
    const scalar_t dist = dev_sqrt(s);
    D[e * N + f] = dist;
    D[f * N + e] = dist;
    // position of (e, f) in the row-major upper triangle
    upper[e * N - e * (e + 1) / 2 + (f - e - 1)] = dist;
  }
}

template <typename scalar_t>
struct UpdateParams {
  const scalar_t* K;
  const scalar_t* V;
  const scalar_t* SQ;
  const scalar_t* M;
  const int64_t* CS;
  const scalar_t* D;      // [N, N] or nullptr (no repulsion)
  const scalar_t* theta;  // 0-dim, with D
  int64_t N, d;
  scalar_t alpha, beta, delta, gamma;
  bool normalize;
  scalar_t* new_k;
  scalar_t* new_v;
};

// Δ_e, the new velocity and the new key of expert e (one block per expert),
// from the old keys; written to new_k / new_v, committed by commit_kernel.
// Per column the sums run over the experts in index order, as on the CPU.
template <typename scalar_t>
__global__ void update_kernel(const UpdateParams<scalar_t> a) {
  __shared__ scalar_t red_s[kWarpSize + 1];
  __shared__ int64_t red_i[kWarpSize + 1];
  const int64_t e = blockIdx.x, N = a.N, d = a.d;
  const scalar_t* ke = a.K + e * d;

  // Row sum of the co-selection counts, and how many keys lie closer than θ.
  int64_t row_part = 0, close_part = 0;
  const scalar_t theta = a.D != nullptr ? *a.theta : scalar_t(0);
  for (int64_t f = threadIdx.x; f < N; f += blockDim.x) {
    if (f == e) continue;
    row_part += a.CS[e * N + f];
    if (a.D != nullptr && a.D[e * N + f] < theta) ++close_part;
  }
  const int64_t row = block_sum(row_part, red_i);
  const int64_t close = block_sum(close_part, red_i);
  const scalar_t m = a.M[e];

  scalar_t norm2_part = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const scalar_t kc = ke[c];
    scalar_t delta_c = 0;
    if (a.alpha != 0 && m > 0)  // attraction to the gate-weighted mean query
      delta_c += a.alpha * (a.SQ[e * d + c] / m - kc);
    if (a.beta != 0 && row > 0) {  // peer-pull to the co-selection-weighted mean key
      scalar_t pull = 0;
      for (int64_t f = 0; f < N; ++f) {
        const int64_t w = f == e ? 0 : a.CS[e * N + f];
        if (w != 0) pull += static_cast<scalar_t>(w) * a.K[f * d + c];
      }
      delta_c += a.beta * (pull / static_cast<scalar_t>(row) - kc);
    }
    if (a.D != nullptr && close > 0) {  // push away from the keys closer than θ
      scalar_t push = 0;
      for (int64_t f = 0; f < N; ++f) {
        if (f == e) continue;
        const scalar_t D = a.D[e * N + f];
        if (!(D < theta)) continue;
        const scalar_t inv = scalar_t(1) / (D > scalar_t(kRepulsionEps) ? D : scalar_t(kRepulsionEps));
        push += (kc - a.K[f * d + c]) * inv;
      }
      delta_c += a.delta * push / static_cast<scalar_t>(close);
    }
    const scalar_t v = a.gamma * a.V[e * d + c] + (scalar_t(1) - a.gamma) * delta_c;
    const scalar_t nk = kc + v;
    a.new_v[e * d + c] = v;
    a.new_k[e * d + c] = nk;
    norm2_part += nk * nk;
  }
  if (a.normalize) {
    const scalar_t norm = dev_sqrt(block_sum(norm2_part, red_s));
    const scalar_t inv = scalar_t(1) / (norm > scalar_t(kNormEps) ? norm : scalar_t(kNormEps));
    // each thread rescales the columns it wrote itself
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) a.new_k[e * d + c] *= inv;
  }
}

// keys, velocity <- new values and the usage EMA, only when the statistics
// and the store are finite (*ok); otherwise nothing is written.
template <typename scalar_t>
__global__ void commit_kernel(const bool* __restrict__ ok, const scalar_t* __restrict__ new_k,
                              const scalar_t* __restrict__ new_v, const int64_t* __restrict__ counts,
                              const int64_t* __restrict__ total, scalar_t gamma, int64_t N, int64_t d,
                              scalar_t* __restrict__ keys, scalar_t* __restrict__ velocity,
                              scalar_t* __restrict__ usage) {
  if (!*ok) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N * d) {
    keys[i] = new_k[i];
    velocity[i] = new_v[i];
  }
  if (i < N) {
    const int64_t all = *total;
    const scalar_t share = all > 0 ? static_cast<scalar_t>(counts[i]) / static_cast<scalar_t>(all) : scalar_t(0);
    usage[i] = gamma * usage[i] + (scalar_t(1) - gamma) * share;
  }
}

at::Tensor keystore_update_cuda(at::Tensor& keys, at::Tensor& velocity, at::Tensor& usage,
                                const at::Tensor& sum_q, const at::Tensor& mass,
                                const at::Tensor& counts, const at::Tensor& coselect, double alpha,
                                double beta, double delta, double theta_percentile,
                                double ema_decay, bool normalize) {
  const char* op = "some.keystore_update";
  check_keystore_update_inputs(op, keys, velocity, usage, sum_q, mass, counts, coselect, alpha, beta,
                               delta, theta_percentile, ema_decay);
  const int64_t N = keys.size(0), d = keys.size(1);
  c10::cuda::CUDAGuard guard(keys.device());

  // Non-finite statistics (or a store already corrupted) leave everything
  // untouched: a device flag, read by commit_kernel.
  auto ok = at::isfinite(sum_q).all()
                .logical_and(at::isfinite(mass).all())
                .logical_and(at::isfinite(keys).all())
                .logical_and(at::isfinite(velocity).all());
  if (N == 0) return ok;

  const auto sq = sum_q.contiguous();
  const auto m = mass.contiguous();
  const auto cs = coselect.contiguous();
  const auto cnt = counts.contiguous();
  const auto total = cnt.sum();  // 0-dim int64, on the device
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool repel = delta != 0 && N > 1;

  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "some_keystore_update_cuda", [&] {
    at::Tensor dist, theta;
    if (repel) {
      // Distances and θ, the theta_percentile quantile of {D_ef : e < f} with
      // linear interpolation (torch.quantile's rule and torch.lerp's
      // two-sided formula, like the CPU). The rank is known on the host.
      dist = at::empty({N, N}, keys.options());
      const int64_t n_upper = N * (N - 1) / 2;
      auto upper = at::empty({n_upper}, keys.options());
      const int warps_per_block = 8;
      distances_kernel<scalar_t>
          <<<static_cast<unsigned>(ceil_div(N * N, warps_per_block)), warps_per_block * kWarpSize, 0, stream>>>(
              keys.data_ptr<scalar_t>(), N, d, dist.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto sorted = std::get<0>(upper.sort());
      const double rank = theta_percentile * static_cast<double>(n_upper - 1);
      const int64_t lo = static_cast<int64_t>(std::floor(rank));
      const int64_t hi = std::min<int64_t>(lo + 1, n_upper - 1);
      const double w = rank - static_cast<double>(lo);
      theta = at::lerp(sorted[lo], sorted[hi], w).contiguous();
    }
    auto new_k = at::empty_like(keys);
    auto new_v = at::empty_like(velocity);
    UpdateParams<scalar_t> p{keys.data_ptr<scalar_t>(),
                             velocity.data_ptr<scalar_t>(),
                             sq.data_ptr<scalar_t>(),
                             m.data_ptr<scalar_t>(),
                             cs.data_ptr<int64_t>(),
                             repel ? dist.data_ptr<scalar_t>() : nullptr,
                             repel ? theta.data_ptr<scalar_t>() : nullptr,
                             N,
                             d,
                             static_cast<scalar_t>(alpha),
                             static_cast<scalar_t>(beta),
                             static_cast<scalar_t>(delta),
                             static_cast<scalar_t>(ema_decay),
                             normalize,
                             new_k.data_ptr<scalar_t>(),
                             new_v.data_ptr<scalar_t>()};
    update_kernel<scalar_t><<<static_cast<unsigned>(N), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // an update that overflows would leave a non-finite store: not committed either
    ok = ok.logical_and(at::isfinite(new_k).all()).logical_and(at::isfinite(new_v).all());
    const int64_t n_commit = std::max(N * d, N);
    commit_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(n_commit, 256)), 256, 0, stream>>>(
        ok.data_ptr<bool>(), new_k.data_ptr<scalar_t>(), new_v.data_ptr<scalar_t>(),
        cnt.data_ptr<int64_t>(), total.data_ptr<int64_t>(), static_cast<scalar_t>(ema_decay), N, d,
        keys.data_ptr<scalar_t>(), velocity.data_ptr<scalar_t>(), usage.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ok;
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CUDA, m) {
  m.impl("keystore_stats", &keystore_stats_cuda);
  m.impl("keystore_update", &keystore_update_cuda);
}

}  // namespace gpu
}  // namespace some
