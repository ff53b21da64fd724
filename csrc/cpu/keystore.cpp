// CPU kernels of some::keystore_stats and some::keystore_update (docs/method.md §4).
//
// Statistics are computed per expert from the pairs grouped by expert, so
// each thread owns whole rows of the outputs: no atomics, and the sums are
// bit-identical run to run. The update computes every Δ_e from the old keys
// and then writes keys, velocity and usage together.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../op_checks.h"
#include "../route_common.h"  // row_norm
#include "grouping.h"
#include "repulsion.h"

namespace some {
namespace {

constexpr double kNormEps = 1e-12;

std::tuple<at::Tensor, at::Tensor, at::Tensor> keystore_stats_cpu(
    const at::Tensor& query, const at::Tensor& indices, const at::Tensor& gates,
    int64_t num_experts) {
  const char* op = "some.keystore_stats";
  check_keystore_stats_inputs(op, query, indices, gates, num_experts);
  TORCH_CHECK_VALUE(at::isfinite(query).all().item<bool>(), op,
                    ": 'query' contains NaN or Inf; the key-store statistics would be "
                    "corrupted, so nothing was computed (the keys are untouched)");
  TORCH_CHECK_VALUE(at::isfinite(gates).all().item<bool>(), op,
                    ": 'gates' contains NaN or Inf; nothing was computed (the keys are untouched)");

  const int64_t d = query.size(1), k = indices.size(1), N = num_experts;
  const auto acc = stats_dtype(query.scalar_type());
  auto q = query.to(acc).contiguous();
  q = q / row_norm(q).clamp_min(kNormEps);
  const auto g = gates.to(acc).contiguous();
  const auto idx = indices.contiguous();
  auto [order, offsets] = group_by_expert(op, idx, N);

  auto sum_q = at::zeros({N, d}, q.options());
  auto mass = at::zeros({N}, q.options());
  auto counts = at::zeros({N}, idx.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc, "some_keystore_stats_cpu", [&] {
    const scalar_t* Q = q.data_ptr<scalar_t>();
    const scalar_t* G = g.data_ptr<scalar_t>();
    scalar_t* SQ = sum_q.data_ptr<scalar_t>();
    scalar_t* M = mass.data_ptr<scalar_t>();
    int64_t* C = counts.data_ptr<int64_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        scalar_t* sq = SQ + e * d;
        for (int64_t r = off[e]; r < off[e + 1]; ++r) {
          const int64_t p = ord[r], t = p / k;
          const scalar_t w = G[p];
          M[e] += w;
          const scalar_t* qt = Q + t * d;
          for (int64_t c = 0; c < d; ++c) sq[c] += w * qt[c];
        }
        C[e] = off[e + 1] - off[e];
      }
    });
  });
  return {sum_q, mass, counts};
}

at::Tensor keystore_update_cpu(at::Tensor& keys, at::Tensor& velocity, at::Tensor& usage,
                               const at::Tensor& sum_q, const at::Tensor& mass,
                               const at::Tensor& counts, const at::Tensor& peer_sum,
                               const at::Tensor& peer_count, double alpha, double beta, double delta,
                               double theta_percentile, double ema_decay, bool normalize) {
  const char* op = "some.keystore_update";
  check_keystore_update_inputs(op, keys, velocity, usage, sum_q, mass, counts, peer_sum, peer_count, alpha,
                               beta, delta, theta_percentile, ema_decay);
  const int64_t N = keys.size(0), d = keys.size(1);

  // Non-finite statistics (or a store already corrupted) leave everything untouched.
  const bool finite = at::isfinite(sum_q).all().item<bool>() &&
                      at::isfinite(mass).all().item<bool>() &&
                      at::isfinite(keys).all().item<bool>() &&
                      at::isfinite(velocity).all().item<bool>();
  if (!finite) return at::scalar_tensor(false, keys.options().dtype(at::kBool));

  const auto sq = sum_q.contiguous();
  const auto m = mass.contiguous();
  const auto pull = peer_sum.contiguous();
  const auto pull_n = peer_count.contiguous();
  const auto cnt = counts.contiguous();
  bool result_finite = true;
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "some_keystore_update_cpu", [&] {
    const scalar_t* K = keys.data_ptr<scalar_t>();
    const scalar_t* SQ = sq.data_ptr<scalar_t>();
    const scalar_t* M = m.data_ptr<scalar_t>();
    const scalar_t* PULL = pull.data_ptr<scalar_t>();
    const int64_t* PULL_N = pull_n.data_ptr<int64_t>();
    scalar_t* V = velocity.data_ptr<scalar_t>();
    scalar_t* U = usage.data_ptr<scalar_t>();
    const int64_t* C = cnt.data_ptr<int64_t>();

    // Repulsion: Σ over the keys closer than θ, and how many (csrc/cpu/repulsion.h).
    const bool repel = delta != 0 && N > 1;
    at::Tensor push;
    std::vector<int64_t> close;
    if (repel) repulsion::push_sums<scalar_t>(keys, theta_percentile, push, close);
    const scalar_t* PUSH = repel ? push.data_ptr<scalar_t>() : nullptr;

    const scalar_t a = alpha, bt = beta, dl = delta, gamma = ema_decay;
    std::vector<scalar_t> new_k(N * d), new_v(N * d);
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e_end) {
      std::vector<scalar_t> delta_e(d);
      for (int64_t e = b; e < e_end; ++e) {
        const scalar_t* ke = K + e * d;
        std::fill(delta_e.begin(), delta_e.end(), scalar_t(0));
        if (a != 0 && M[e] > 0) {  // attraction to the gate-weighted mean query
          for (int64_t c = 0; c < d; ++c) delta_e[c] += a * (SQ[e * d + c] / M[e] - ke[c]);
        }
        if (bt != 0 && PULL_N[e] > 0) {  // peer-pull to the co-selection-weighted mean key
          const scalar_t row = static_cast<scalar_t>(PULL_N[e]);
          for (int64_t c = 0; c < d; ++c) delta_e[c] += bt * (PULL[e * d + c] / row - ke[c]);
        }
        if (repel && close[e] > 0) {  // push away from the keys closer than θ
          for (int64_t c = 0; c < d; ++c)
            delta_e[c] += dl * PUSH[e * d + c] / static_cast<scalar_t>(close[e]);
        }
        scalar_t norm2 = 0;
        for (int64_t c = 0; c < d; ++c) {
          const scalar_t v = gamma * V[e * d + c] + (scalar_t(1) - gamma) * delta_e[c];
          new_v[e * d + c] = v;
          const scalar_t nk = ke[c] + v;
          new_k[e * d + c] = nk;
          norm2 += nk * nk;
        }
        if (normalize) {
          const scalar_t inv = scalar_t(1) / std::max(std::sqrt(norm2), static_cast<scalar_t>(kNormEps));
          for (int64_t c = 0; c < d; ++c) new_k[e * d + c] *= inv;
        }
      }
    });
    // An update that overflows (finite but huge statistics or coefficients)
    // would leave a non-finite store: refuse it like non-finite statistics.
    for (int64_t i = 0; i < N * d && result_finite; ++i)
      result_finite = std::isfinite(new_k[i]) && std::isfinite(new_v[i]);
    if (!result_finite) return;
    std::copy(new_k.begin(), new_k.end(), keys.data_ptr<scalar_t>());
    std::copy(new_v.begin(), new_v.end(), V);

    int64_t total = 0;
    for (int64_t e = 0; e < N; ++e) total += C[e];
    for (int64_t e = 0; e < N; ++e) {
      const scalar_t share = total > 0 ? static_cast<scalar_t>(C[e]) / static_cast<scalar_t>(total) : scalar_t(0);
      U[e] = gamma * U[e] + (scalar_t(1) - gamma) * share;
    }
  });
  return at::scalar_tensor(result_finite, keys.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CPU, m) {
  m.impl("keystore_stats", &keystore_stats_cpu);
  m.impl("keystore_update", &keystore_update_cpu);
}

}  // namespace some
