// Device-agnostic parts of routing (ATen calls only), shared by the CPU and
// CUDA kernels of some::route / some::route_backward.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "op_checks.h"

namespace some {

constexpr double kUnitNormEps = 1e-12;  // as torch.nn.functional.normalize

// L2 norm of every row without overflow or underflow: max|x| * ||x / max|x|||
// (a float32 row with entries near 1e20 has a finite norm; its square does not).
inline at::Tensor row_norm(const at::Tensor& x) {
  const auto m = x.abs().amax(/*dim=*/1, /*keepdim=*/true);
  return (x / at::where(m > 0, m, at::ones_like(m))).norm(2, /*dim=*/1, /*keepdim=*/true) * m;
}

// Rows in the accumulation dtype, scaled to unit L2 norm (cosine scores) or
// as they are (dot scores); contiguous.
inline at::Tensor scoring_rows(const at::Tensor& t, at::ScalarType acc, bool cosine) {
  auto x = t.to(acc).contiguous();
  return cosine ? x / row_norm(x).clamp_min(kUnitNormEps) : x;
}

// What the forward of some::route prepares before its selection kernel, on
// any device: parsed options (checked), the score matrix S = q̂ K̂ᵀ in the
// accumulation dtype, and the output buffers.
struct RoutePlan {
  Gating gating;
  bool cosine;
  int64_t T, N;
  at::Tensor S;                           // (T, N), accumulation dtype
  at::Tensor indices, gates, scores;      // (T, k) outputs (gates/scores in acc dtype)
  at::Tensor active, thresholds;          // contiguous, or undefined when absent / unused
  at::Tensor bias;                        // selection bias in the accumulation dtype, or undefined
};

inline RoutePlan plan_route(const char* op, const at::Tensor& query, const at::Tensor& keys, int64_t k,
                            double temperature, c10::string_view gating_name, c10::string_view score_mode,
                            double top_p, const c10::optional<at::Tensor>& thresholds,
                            const c10::optional<at::Tensor>& active,
                            const c10::optional<at::Tensor>& selection_bias) {
  RoutePlan p;
  p.gating = parse_gating(op, gating_name);
  p.cosine = parse_score_mode(op, score_mode);
  check_route_inputs(op, query, keys, k, temperature, p.gating, top_p, thresholds, active, selection_bias);
  p.T = query.size(0);
  p.N = keys.size(0);
  const auto acc = stats_dtype(query.scalar_type());
  p.S = at::mm(scoring_rows(query, acc, p.cosine), scoring_rows(keys, acc, p.cosine).t()).contiguous();
  p.indices = at::empty({p.T, k}, query.options().dtype(at::kLong));
  p.gates = at::empty({p.T, k}, query.options().dtype(acc));
  p.scores = at::empty({p.T, k}, query.options().dtype(acc));
  if (active.has_value() && active->defined()) p.active = active->contiguous();
  if (p.gating == Gating::TopAny) p.thresholds = thresholds->to(acc).contiguous();
  if (selection_bias.has_value() && selection_bias->defined()) p.bias = selection_bias->to(acc).contiguous();
  return p;
}

// top_p: the softmax denominator couples every active expert, so
// grad_q̂_t += coef_t Σ_e P_te k̂_e with P recomputed from the scores.
inline void add_top_p_coupling(at::Tensor& grad_qhat, const at::Tensor& q, const at::Tensor& kk,
                               double temperature, const c10::optional<at::Tensor>& active,
                               const at::Tensor& coef_all) {
  auto S = at::mm(q, kk.t()) / temperature;
  if (active.has_value() && active->defined())
    S = S.masked_fill(active->logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  S = S.masked_fill(at::isnan(S), -std::numeric_limits<double>::infinity());  // never selected, not in P
  // a token with no eligible expert (all masked) has P = 0, not softmax's NaN
  grad_qhat.add_(at::mm(at::softmax(S, 1).nan_to_num(0.0) * coef_all.unsqueeze(1), kk));
}

// dL/dq from dL/dq̂. Cosine: q̂ = q / max(||q||, eps), so project out the
// radial part and divide by the norm; dot: q̂ = q.
inline at::Tensor query_grad(const at::Tensor& query, const at::Tensor& q, const at::Tensor& grad_qhat,
                             at::ScalarType acc, bool cosine) {
  if (!cosine) return grad_qhat;
  auto norm = row_norm(query.to(acc));
  auto radial = (q * grad_qhat).sum(1, true);
  return at::where(norm > kUnitNormEps, (grad_qhat - q * radial) / norm.clamp_min(kUnitNormEps),
                   grad_qhat / kUnitNormEps);
}

}  // namespace some
