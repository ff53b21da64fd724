// CUDA kernels of some::route and some::route_backward (docs/method.md §3 steps 1-4).
//
// As on the CPU (csrc/cpu/route.cpp): the score matrix is one GEMM on the
// normalized rows (at::mm, cuBLAS); selection and gating run one warp per
// token; all arithmetic is in the accumulation type (float64 for float64
// queries, float32 otherwise) and the outputs are cast to the query's dtype.
// Nothing here synchronizes with the host, but the finiteness check of a
// selection bias where one is given (csrc/op_checks.h).
//
// Selection: k rounds of a warp-wide arg-max over the token's score row, each
// round restricted to the experts ranked after the previous winner in the
// order (score descending, index ascending). That order is strict, so ties go
// to the lower index (docs/method.md §3 step 3) without a "taken" mask, and any k <= N
// works with no per-token buffer. top_p stops as soon as the cumulative
// probability exceeds p. NaN scores are never selected.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../op_checks.h"
#include "../route_common.h"
#include "../route_math.h"
#include "common.cuh"

namespace some {
namespace gpu {
namespace {

constexpr int kRouteWarpsPerBlock = 8;

// ------------------------------------------------------------ forward

template <typename acc_t>
struct Cand {
  acc_t s;
  int e;  // -1: none
};

// Does (s, e) rank before (bs, be)? Score descending, then index ascending;
// an empty candidate (be < 0) ranks last.
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t s, int e, acc_t bs, int be) {
  return be < 0 || s > bs || (s == bs && e < be);
}

// Warp-wide best candidate; every lane receives the same one (the order is
// strict and total on distinct experts, so the butterfly agrees everywhere).
template <typename acc_t>
__device__ __forceinline__ Cand<acc_t> warp_best(Cand<acc_t> c) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const acc_t os = __shfl_xor_sync(kFullMask, c.s, o);
    const int oe = __shfl_xor_sync(kFullMask, c.e, o);
    if (oe >= 0 && ranks_before(os, oe, c.s, c.e)) c = {os, oe};
  }
  return c;
}

template <typename acc_t>
struct RouteParams {
  const acc_t* scores;  // [T, N]
  int64_t T;
  int N;
  int k;
  acc_t tau;
  Gating gating;
  acc_t top_p;
  bool fallback_top1;
  const bool* active;  // [N] or nullptr
  const acc_t* thr;    // [N] (top_any) or nullptr
  const acc_t* bias;   // [N] selection bias (top-k gatings) or nullptr
  int64_t* out_idx;    // [T, k]
  acc_t* out_gate;
  acc_t* out_score;
};

template <typename acc_t>
__global__ void route_select_kernel(const RouteParams<acc_t> a) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (t >= a.T) return;  // whole warp
  const int lane = threadIdx.x % kWarpSize;
  const acc_t* s = a.scores + t * a.N;
  int64_t* idx = a.out_idx + t * a.k;
  acc_t* g = a.out_gate + t * a.k;
  acc_t* sc = a.out_score + t * a.k;
  const acc_t tau = a.tau;

  // The best eligible expert ranked after `prev` (all of them when prev.e < 0).
  auto next = [&](Cand<acc_t> prev, bool need_fired) -> Cand<acc_t> {
    Cand<acc_t> best{acc_t(0), -1};
    for (int e = lane; e < a.N; e += kWarpSize) {
      if (!(s[e] == s[e])) continue;  // NaN
      // ranked by the biased score where a selection bias is given (finite: checked)
      const acc_t v = a.bias != nullptr ? s[e] + a.bias[e] : s[e];
      if (a.active != nullptr && !a.active[e]) continue;
      if (need_fired && !top_any_fires(v, tau, a.thr[e])) continue;
      if (prev.e >= 0 && !ranks_before(prev.s, prev.e, v, e)) continue;
      if (ranks_before(v, e, best.s, best.e)) best = {v, e};
    }
    return warp_best(best);
  };

  // All lanes run the same control flow (every decision below depends only
  // on warp-uniform values); lane 0 writes the outputs.
  int count = 0;
  Cand<acc_t> c{acc_t(0), -1};
  if (a.gating == Gating::TopAny) {
    while (count < a.k) {
      c = next(c, true);
      if (c.e < 0) break;
      if (lane == 0) {
        idx[count] = c.e;
        sc[count] = c.s;
      }
      ++count;
    }
    if (count == 0 && a.fallback_top1) {
      c = next(Cand<acc_t>{acc_t(0), -1}, false);
      if (c.e >= 0) {
        if (lane == 0) {
          idx[0] = c.e;
          sc[0] = c.s;
          g[0] = acc_t(1);
        }
        count = 1;
      }
    } else if (lane == 0) {
      for (int j = 0; j < count; ++j) g[j] = top_any_gate<acc_t>(count);
    }
  } else if (a.gating == Gating::TopP) {
    // P = softmax(s/τ) over the active experts; keep the best ones up to and
    // including the first where the cumulative P exceeds p (strictly).
    c = next(c, false);
    if (c.e >= 0) {
      const acc_t mx = c.s / tau;
      acc_t part = 0;
      for (int e = lane; e < a.N; e += kWarpSize)
        if ((a.active == nullptr || a.active[e]) && s[e] == s[e]) part += dev_exp(s[e] / tau - mx);  // no NaN
      const acc_t denom = warp_sum(part);
      acc_t cum = 0;
      while (true) {
        const acc_t p = top_p_probability(c.s, tau, mx, denom);
        if (lane == 0) {
          idx[count] = c.e;
          sc[count] = c.s;
          g[count] = p;
        }
        ++count;
        cum += p;
        if (top_p_stops(cum, a.top_p) || count == a.k) break;
        c = next(c, false);
        if (c.e < 0) break;
      }
    }
  } else {
    while (count < a.k) {
      c = next(c, false);
      if (c.e < 0) break;
      if (lane == 0) {
        idx[count] = c.e;
        sc[count] = s[c.e];  // the unbiased score (c.s holds the biased one with a selection bias)
      }
      ++count;
    }
    if (lane == 0) gates_of_selected(a.gating, sc, int64_t(count), tau, g);  // sequential, as the CPU
  }
  if (lane == 0) {
    for (int j = count; j < a.k; ++j) {
      idx[j] = -1;
      g[j] = 0;
      sc[j] = 0;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& query, const at::Tensor& keys, int64_t k, double temperature,
    c10::string_view gating_name, c10::string_view score_mode, double top_p,
    const c10::optional<at::Tensor>& thresholds, const c10::optional<at::Tensor>& active,
    bool fallback_top1, const c10::optional<at::Tensor>& selection_bias) {
  const char* op = "some.route";
  auto plan = plan_route(op, query, keys, k, temperature, gating_name, score_mode, top_p, thresholds, active,
                         selection_bias);
  const Gating gating = plan.gating;
  const int64_t T = plan.T, N = plan.N;
  const auto& S = plan.S;  // (T, N)
  auto &indices = plan.indices, &gates = plan.gates, &scores = plan.scores;
  const auto &act = plan.active, &thr = plan.thresholds;
  // (the ATen calls above guard their own device; the kernels below need it)
  c10::cuda::CUDAGuard guard(query.device());

  if (T > 0) {
    const int threads = kRouteWarpsPerBlock * kWarpSize;
    const auto blocks = static_cast<unsigned>(ceil_div(T, kRouteWarpsPerBlock));
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "some_route_cuda", [&] {
      RouteParams<scalar_t> p{S.data_ptr<scalar_t>(),
                              T,
                              static_cast<int>(N),
                              static_cast<int>(k),
                              static_cast<scalar_t>(temperature),
                              gating,
                              static_cast<scalar_t>(top_p),
                              fallback_top1,
                              act.defined() ? act.data_ptr<bool>() : nullptr,
                              thr.defined() ? thr.data_ptr<scalar_t>() : nullptr,
                              plan.bias.defined() ? plan.bias.data_ptr<scalar_t>() : nullptr,
                              indices.data_ptr<int64_t>(),
                              gates.data_ptr<scalar_t>(),
                              scores.data_ptr<scalar_t>()};
      route_select_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gates.to(query.scalar_type()), scores.to(query.scalar_type()), indices};
}

// ----------------------------------------------------------- backward

// d(loss)/d(score) of every selected slot (one thread per token), the
// port of the CPU's route_backward_rows: for top_p also
// coef_all[t] = -(Σ_j gg_j g_j)/τ, and for top_any dL/dm per slot.
template <typename acc_t>
__global__ void route_backward_rows_kernel(const acc_t* __restrict__ gg, const acc_t* __restrict__ gs,
                                           const int64_t* __restrict__ idx,
                                           const acc_t* __restrict__ g, const acc_t* __restrict__ sc,
                                           const acc_t* __restrict__ thr, int64_t T, int64_t k, int64_t N,
                                           Gating gating, acc_t tau, acc_t* __restrict__ grad_s,
                                           acc_t* __restrict__ coef_all, acc_t* __restrict__ grad_m) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int64_t o = t * k;
  route_backward_token(gg + o, gs + o, idx + o, g + o, sc + o, thr, k, N, gating, tau, grad_s + o,
                       coef_all ? coef_all + t : nullptr, grad_m ? grad_m + o : nullptr);
}

// grad_q̂[t, c] = Σ_j grad_s[t, j] k̂[I_tj, c], slots in order (deterministic).
template <typename acc_t>
__global__ void gather_axpy_kernel(const acc_t* __restrict__ grad_s, const int64_t* __restrict__ idx,
                                   const acc_t* __restrict__ keys, int64_t k, int64_t d, int64_t N,
                                   acc_t* __restrict__ grad_qhat) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j];
      if (e >= 0 && e < N) acc += grad_s[t * k + j] * keys[e * d + c];
    }
    grad_qhat[t * d + c] = acc;
  }
}

// dL/dG_e = -σ'(G_e) Σ_{(t,j): I_tj = e} dL/dm_tj over expert e's grouped
// pairs: one warp per expert, fixed order (deterministic, no atomics).
template <typename acc_t>
__global__ void threshold_grad_kernel(const acc_t* __restrict__ grad_m, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ offsets, const acc_t* __restrict__ thr,
                                      int num_experts, acc_t* __restrict__ grad_thr) {
  const int e = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
  if (e >= num_experts) return;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t sg = sigmoid(thr[e]);
  const acc_t dsg = sg * (acc_t(1) - sg);
  acc_t acc = 0;
  for (int64_t r = offsets[e] + lane; r < offsets[e + 1]; r += kWarpSize) acc += grad_m[order[r]] * dsg;
  acc = warp_sum(acc);
  if (lane == 0) grad_thr[e] = -acc;
}

std::tuple<at::Tensor, at::Tensor> route_backward_cuda(
    const at::Tensor& grad_gates, const at::Tensor& grad_scores, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& scores, double temperature, c10::string_view gating_name,
    c10::string_view score_mode, const c10::optional<at::Tensor>& thresholds,
    const c10::optional<at::Tensor>& active) {
  const char* op = "some.route_backward";
  const Gating gating = parse_gating(op, gating_name);
  const bool cosine = parse_score_mode(op, score_mode);
  check_route_backward_inputs(op, grad_gates, grad_scores, query, keys, indices, gates, scores, temperature,
                              gating, thresholds, active);
  // (index values are not read on the host: out-of-range ones end a token's slots in the kernels)
  const int64_t T = query.size(0), N = keys.size(0), d = query.size(1), k = indices.size(1);
  check_same_device(op, "indices", indices, "query", query);
  c10::cuda::CUDAGuard guard(query.device());
  const auto acc = stats_dtype(query.scalar_type());
  const auto q = scoring_rows(query, acc, cosine);
  const auto kk = scoring_rows(keys, acc, cosine);
  const auto gg = grad_gates.to(acc).contiguous(), gs = grad_scores.to(acc).contiguous();
  const auto g = gates.to(acc).contiguous(), sc = scores.to(acc).contiguous();
  const auto idx = indices.contiguous();
  at::Tensor thr;
  const bool has_thr = thresholds.has_value() && thresholds->defined();
  if (has_thr) thr = thresholds->to(acc).contiguous();

  auto grad_s = at::empty({T, k}, q.options());
  auto coef_all = gating == Gating::TopP ? at::empty({T}, q.options()) : at::Tensor();
  auto grad_m = gating == Gating::TopAny ? at::empty({T, k}, q.options()) : at::Tensor();
  auto grad_qhat = at::empty({T, d}, q.options());
  auto grad_thr = has_thr ? at::zeros({N}, q.options()) : at::empty({0}, q.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "some_route_backward_cuda", [&] {
      route_backward_rows_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(T, 128)), 128, 0, stream>>>(
          gg.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          g.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
          thr.defined() ? thr.data_ptr<scalar_t>() : nullptr, T, k, N, gating,
          static_cast<scalar_t>(temperature), grad_s.data_ptr<scalar_t>(),
          coef_all.defined() ? coef_all.data_ptr<scalar_t>() : nullptr,
          grad_m.defined() ? grad_m.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (d > 0) {
        gather_axpy_kernel<scalar_t><<<static_cast<unsigned>(T), 128, 0, stream>>>(
            grad_s.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), kk.data_ptr<scalar_t>(), k, d, N,
            grad_qhat.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (gating == Gating::TopAny && has_thr) {
        at::Tensor order, offsets;
        std::tie(order, offsets) = group_by_expert_cuda(op, idx, N);
        const int warps_per_block = 8;
        threshold_grad_kernel<scalar_t>
            <<<static_cast<unsigned>(ceil_div(N, warps_per_block)), warps_per_block * kWarpSize, 0, stream>>>(
                grad_m.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                thr.data_ptr<scalar_t>(), static_cast<int>(N), grad_thr.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  if (gating == Gating::TopP) add_top_p_coupling(grad_qhat, q, kk, temperature, active, coef_all);
  const auto grad_q = query_grad(query, q, grad_qhat, acc, cosine);
  return {grad_q.to(query.scalar_type()),
          has_thr ? grad_thr.to(thresholds->scalar_type()) : grad_thr};
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
}

}  // namespace gpu
}  // namespace some
