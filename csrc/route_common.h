// Device-agnostic parts of routing (ATen calls only), shared by the CPU and
// CUDA kernels of some::route / some::route_backward.
#pragma once

#include <ATen/ATen.h>

#include <limits>

namespace some {

constexpr double kUnitNormEps = 1e-12;  // as torch.nn.functional.normalize

// Rows in the accumulation dtype, scaled to unit L2 norm (cosine scores) or
// as they are (dot scores); contiguous.
inline at::Tensor scoring_rows(const at::Tensor& t, at::ScalarType acc, bool cosine) {
  auto x = t.to(acc).contiguous();
  return cosine ? x / x.norm(2, /*dim=*/1, /*keepdim=*/true).clamp_min(kUnitNormEps) : x;
}

// top_p: the softmax denominator couples every active expert, so
// grad_q̂_t += coef_t Σ_e P_te k̂_e with P recomputed from the scores.
inline void add_top_p_coupling(at::Tensor& grad_qhat, const at::Tensor& q, const at::Tensor& kk,
                               double temperature, const c10::optional<at::Tensor>& active,
                               const at::Tensor& coef_all) {
  auto S = at::mm(q, kk.t()) / temperature;
  if (active.has_value() && active->defined())
    S = S.masked_fill(active->logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  grad_qhat.add_(at::mm(at::softmax(S, 1) * coef_all.unsqueeze(1), kk));
}

// dL/dq from dL/dq̂. Cosine: q̂ = q / max(||q||, eps), so project out the
// radial part and divide by the norm; dot: q̂ = q.
inline at::Tensor query_grad(const at::Tensor& query, const at::Tensor& q, const at::Tensor& grad_qhat,
                             at::ScalarType acc, bool cosine) {
  if (!cosine) return grad_qhat;
  auto norm = query.to(acc).norm(2, 1, true);
  auto radial = (q * grad_qhat).sum(1, true);
  return at::where(norm > kUnitNormEps, (grad_qhat - q * radial) / norm.clamp_min(kUnitNormEps),
                   grad_qhat / kUnitNormEps);
}

}  // namespace some
