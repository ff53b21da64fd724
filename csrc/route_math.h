// Per-token maths of some::route_backward, shared by the CPU kernel (called
// in a parallel loop over tokens) and the CUDA kernel (one thread per token).
#pragma once

#include <cmath>
#include <cstdint>

#include "checks.h"  // Gating

#if defined(__CUDACC__)
#define SOME_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SOME_HOST_DEVICE inline
#endif

namespace some {
// The CPU and CUDA translation units each keep their own copy (the
// SOME_HOST_DEVICE qualifiers differ between them).
namespace {

// The forward's gating rules that depend on the selection itself, shared by the CPU
// selection loop and the CUDA warp selection (gates_of_selected below has the others):
// top_any fires expert e when σ(s/τ) > σ(G_e), i.e. s/τ > G_e (DynMoE), each of the
// `count` fired experts gated 1/count; top_p's probability of a score against the
// softmax's max and denominator, and its stop: the selection ends with the first slot
// where the cumulative probability exceeds p, strictly (at a tie the next one is kept,
// as the authors' code).
template <typename acc_t>
SOME_HOST_DEVICE bool top_any_fires(acc_t s, acc_t tau, acc_t threshold) { return s / tau > threshold; }
template <typename acc_t>
SOME_HOST_DEVICE acc_t top_any_gate(int64_t count) { return acc_t(1) / acc_t(count); }
template <typename acc_t>
SOME_HOST_DEVICE acc_t top_p_probability(acc_t s, acc_t tau, acc_t mx, acc_t denom) {
  using std::exp;
  return exp(s / tau - mx) / denom;
}
template <typename acc_t>
SOME_HOST_DEVICE bool top_p_stops(acc_t cumulative, acc_t p) { return cumulative > p; }

// Gates of one token's `count` selected slots (scores `sc`, best first) for the
// gatings whose gates depend on the selected scores alone: softmax over the
// selected, sigmoid, relu, avg_k (top_p and top_any need the selection itself
// and are computed where it happens).
template <typename acc_t>
SOME_HOST_DEVICE void gates_of_selected(Gating gating, const acc_t* sc, int64_t count, acc_t tau, acc_t* g) {
  using std::exp;
  switch (gating) {
    case Gating::Softmax: {
      // the largest selected score, so exp never overflows (sc[0] unless a selection
      // bias chose the slots in another order)
      acc_t mx = count ? sc[0] / tau : acc_t(0);
      for (int64_t j = 1; j < count; ++j) mx = sc[j] / tau > mx ? sc[j] / tau : mx;
      acc_t sum = 0;
      for (int64_t j = 0; j < count; ++j) sum += (g[j] = exp(sc[j] / tau - mx));
      for (int64_t j = 0; j < count; ++j) g[j] /= sum;
      break;
    }
    case Gating::Sigmoid:
      for (int64_t j = 0; j < count; ++j) g[j] = acc_t(1) / (acc_t(1) + exp(-(sc[j] / tau)));
      break;
    case Gating::Relu:
      for (int64_t j = 0; j < count; ++j) g[j] = sc[j] > acc_t(0) ? sc[j] : acc_t(0);
      break;
    case Gating::AvgK:  // EMoE's one-score gate: the layer sums its k experts
      for (int64_t j = 0; j < count; ++j) g[j] = acc_t(1);
      break;
    default:
      break;
  }
}

// d(loss)/d(score) of every selected slot of one token (k slots, empty ones
// last with index -1), from the gate and score gradients. For top_p also
// *coef = -(Σ_j gg_j g_j)/τ, the weight with which the softmax denominator's
// gradient reaches every active expert; for top_any grad_m[j] = dL/dm_j of
// the straight-through mask (0 for a fallback slot).
template <typename acc_t>
SOME_HOST_DEVICE void route_backward_token(const acc_t* gg, const acc_t* gs, const int64_t* idx,
                                           const acc_t* g, const acc_t* sc, const acc_t* thr,
                                           int64_t k, int64_t N, Gating gating, acc_t tau, acc_t* grad_s,
                                           acc_t* coef, acc_t* grad_m) {
  using std::exp;
  // The selected slots come first; an index outside 0..N-1 ends them (the
  // host checks the range where it can: this keeps every read in bounds).
  int64_t count = 0;
  while (count < k && idx[count] >= 0 && idx[count] < N) ++count;
  acc_t dot = 0;  // Σ_j gg_j g_j over the selected slots
  for (int64_t j = 0; j < count; ++j) dot += gg[j] * g[j];
  for (int64_t j = 0; j < k; ++j) {
    grad_s[j] = 0;
    if (grad_m) grad_m[j] = 0;
  }
  if (coef) *coef = 0;
  for (int64_t j = 0; j < count; ++j) {
    const acc_t s = sc[j], gj = g[j], ggj = gg[j];
    acc_t ds = gs[j];
    switch (gating) {
      case Gating::Softmax:
        ds += gj * (ggj - dot) / tau;
        break;
      case Gating::Sigmoid:
        ds += ggj * gj * (acc_t(1) - gj) / tau;
        break;
      case Gating::Relu:
        ds += s > 0 ? ggj : acc_t(0);
        break;
      case Gating::AvgK:
        break;
      case Gating::TopP:
        ds += ggj * gj / tau;
        break;
      case Gating::TopAny: {
        // Straight-through mask m_j of fired experts, gates m_j / k(x) with the
        // fired count k(x) a constant (DynMoE divides by the detached count), so
        // dL/dm_j = gg_j / k(x): one fired expert still gets a gradient.
        // A fallback top-1 slot (nothing fired, evaluation) has no gradient.
        const int64_t e = idx[j];
        if (top_any_fires(s, tau, thr[e])) {
          const acc_t dm = ggj / acc_t(count);
          const acc_t sg = acc_t(1) / (acc_t(1) + exp(-s / tau));
          ds += dm * sg * (acc_t(1) - sg) / tau;
          grad_m[j] = dm;
        }
        break;
      }
    }
    grad_s[j] = ds;
  }
  if (gating == Gating::TopP && coef) *coef = -dot / tau;
}

}  // namespace
}  // namespace some
