// CUDA kernels of some::keystore_stats and some::keystore_update (docs/method.md §4).
//
// keystore_stats: sums per expert from the device-side grouping (common.cuh),
// in two deterministic passes (per row tile of an expert's segment, then per
// expert over its tiles in order), so the sums are bit-identical run to run
// and no expert's token count serializes the work. (The co-selection counts
// are some.ops.coselect's, from the indices, on any device.)
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

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> keystore_stats_cuda(
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
  if (P == 0) {
    sum_q.zero_();
    mass.zero_();
    return {sum_q, mass, counts};
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
  return {sum_q, mass, counts};
}

// --------------------------------------------------------------- update

// The repulsion sums come from matrix products (cuBLAS, through ATen) before
// the update kernel (the peer-pull sums are the op's input); the kernel itself
// is O(N · d).
//
// Repulsion on the GPU: all N² distances at once in float64 (one product), the
// upper triangle's value serving both (e, f) and (f, e) so D is symmetric, θ by
// two exact selections (kthvalue) of the upper triangle, no host
// synchronization. The CPU (csrc/cpu/repulsion.h) works in tiles of the key
// dtype and recomputes nearly coincident pairs from their differences; here
// float64 resolves D to ~1e-8 absolute, so the two agree except for pairs
// closer than ~1e-6. Memory: a few N × N float64 buffers (N = 16,384: 2 GiB each).
std::pair<at::Tensor, at::Tensor> push_sums(const at::Tensor& keys, double theta_percentile) {
  const int64_t N = keys.size(0);
  const auto K = keys.to(at::kDouble);
  const auto sq = (K * K).sum(1);
  auto D = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * at::mm(K, K.t())).clamp_min(0).sqrt();
  const auto upper = at::ones({N, N}, keys.options().dtype(at::kBool)).triu(1);
  D = at::where(upper, D, D.t());
  const auto eye = at::eye(N, keys.options().dtype(at::kBool));
  // θ: torch.quantile's rule on {D_ef : e < f}; the ranks are known on the host
  const int64_t M = N * (N - 1) / 2;
  const double rank = theta_percentile * static_cast<double>(M - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(rank));
  const int64_t hi = std::min<int64_t>(lo + 1, M - 1);
  const auto values = D.masked_fill(upper.logical_not(), std::numeric_limits<double>::infinity()).flatten();
  const auto below = std::get<0>(values.kthvalue(lo + 1));
  const auto above = std::get<0>(values.kthvalue(hi + 1));
  const auto theta = at::lerp(below, above, rank - static_cast<double>(lo));
  const auto close = D.lt(theta).logical_and_(eye.logical_not());
  const auto W = at::where(close, D.clamp_min(kRepulsionEps).reciprocal(), at::zeros({}, D.options()));
  auto push = K * W.sum(1, /*keepdim=*/true) - at::mm(W, K);
  return {push.to(keys.scalar_type()).contiguous(), close.sum(1).contiguous()};
}

template <typename scalar_t>
struct UpdateParams {
  const scalar_t* K;
  const scalar_t* V;
  const scalar_t* SQ;
  const scalar_t* M;
  const scalar_t* pull;   // [N, d] Σ_f C_ef K_f (f ≠ e), or nullptr (β = 0)
  const int64_t* row;     // [N] Σ_f C_ef (f ≠ e), with pull
  const scalar_t* push;   // [N, d] Σ_{f close} (K_e − K_f) / max(D, eps), or nullptr (no repulsion)
  const int64_t* close;   // [N] how many f are close, with push
  int64_t N, d;
  scalar_t alpha, beta, delta, gamma;
  bool normalize;
  scalar_t* new_k;
  scalar_t* new_v;
};

// Δ_e, the new velocity and the new key of expert e (one block per expert),
// from the old keys; written to new_k / new_v, committed by commit_kernel.
template <typename scalar_t>
__global__ void update_kernel(const UpdateParams<scalar_t> a) {
  __shared__ scalar_t red_s[kWarpSize + 1];
  const int64_t e = blockIdx.x, d = a.d;
  const scalar_t* ke = a.K + e * d;
  const int64_t row = a.pull != nullptr ? a.row[e] : 0;
  const int64_t close = a.push != nullptr ? a.close[e] : 0;
  const scalar_t m = a.M[e];

  scalar_t norm2_part = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const scalar_t kc = ke[c];
    scalar_t delta_c = 0;
    if (a.alpha != 0 && m > 0)  // attraction to the gate-weighted mean query
      delta_c += a.alpha * (a.SQ[e * d + c] / m - kc);
    if (row > 0)  // peer-pull to the co-selection-weighted mean key
      delta_c += a.beta * (a.pull[e * d + c] / static_cast<scalar_t>(row) - kc);
    if (close > 0)  // push away from the keys closer than θ
      delta_c += a.delta * a.push[e * d + c] / static_cast<scalar_t>(close);
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
                                const at::Tensor& counts, const at::Tensor& peer_sum,
                                const at::Tensor& peer_count, double alpha, double beta, double delta,
                                double theta_percentile, double ema_decay, bool normalize) {
  const char* op = "some.keystore_update";
  check_keystore_update_inputs(op, keys, velocity, usage, sum_q, mass, counts, peer_sum, peer_count, alpha,
                               beta, delta, theta_percentile, ema_decay);
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
  const auto cnt = counts.contiguous();
  const auto total = cnt.sum();  // 0-dim int64, on the device
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool repel = delta != 0 && N > 1;
  const auto pull = peer_sum.contiguous();
  const auto row = peer_count.contiguous();
  at::Tensor push, close;
  if (repel) std::tie(push, close) = push_sums(keys, theta_percentile);

  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "some_keystore_update_cuda", [&] {
    auto new_k = at::empty_like(keys);
    auto new_v = at::empty_like(velocity);
    UpdateParams<scalar_t> p{keys.data_ptr<scalar_t>(),
                             velocity.data_ptr<scalar_t>(),
                             sq.data_ptr<scalar_t>(),
                             m.data_ptr<scalar_t>(),
                             beta != 0 ? pull.data_ptr<scalar_t>() : nullptr,
                             beta != 0 ? row.data_ptr<int64_t>() : nullptr,
                             repel ? push.data_ptr<scalar_t>() : nullptr,
                             repel ? close.data_ptr<int64_t>() : nullptr,
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
