// CPU kernels of some::route and some::route_backward (docs/method.md §3 steps 1-4).
//
// The score matrix is one GEMM (q̂ K̂ᵀ); selection and gating are per token and
// run in parallel over tokens. All arithmetic is in the accumulation type
// (float64 for float64 queries, float32 otherwise); outputs are cast back to
// the query's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../op_checks.h"
#include "../route_common.h"
#include "../route_math.h"

namespace some {
namespace {


struct RouteArgs {
  Gating gating;
  bool cosine;
  int64_t k;
  double temperature;
  double top_p;
  bool fallback_top1;
};

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// Insert (score, index) into the descending list best[0..count) of capacity
// cap. Experts are visited in ascending index order, so a strict comparison
// keeps the lower index first among equal scores (docs/method.md §3 step 3).
template <typename acc_t>
inline void insert_topk(acc_t s, int64_t e, acc_t* best_s, int64_t* best_i, int64_t& count,
                        int64_t cap) {
  if (count == cap && !(s > best_s[cap - 1])) return;
  int64_t pos = count < cap ? count++ : cap - 1;
  while (pos > 0 && s > best_s[pos - 1]) {
    best_s[pos] = best_s[pos - 1];
    best_i[pos] = best_i[pos - 1];
    --pos;
  }
  best_s[pos] = s;
  best_i[pos] = e;
}

// Top-`cap` of the eligible experts of one token's score row, descending,
// ties to the lower index. Returns how many were found.
template <typename acc_t, typename Eligible>
int64_t select_topk(const acc_t* s, int64_t N, int64_t cap, Eligible eligible, acc_t* best_s,
                    int64_t* best_i, std::vector<int64_t>& scratch) {
  if (cap <= 32) {
    int64_t count = 0;
    for (int64_t e = 0; e < N; ++e)
      if (eligible(e)) insert_topk(s[e], e, best_s, best_i, count, cap);
    return count;
  }
  // Large k (up to k = N): partial sort of the eligible indices.
  scratch.clear();
  for (int64_t e = 0; e < N; ++e)
    if (eligible(e)) scratch.push_back(e);
  const int64_t count = std::min<int64_t>(cap, scratch.size());
  std::partial_sort(scratch.begin(), scratch.begin() + count, scratch.end(),
                    [s](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
  for (int64_t j = 0; j < count; ++j) {
    best_i[j] = scratch[j];
    best_s[j] = s[scratch[j]];
  }
  return count;
}

template <typename acc_t>
void route_rows(const acc_t* S, int64_t T, int64_t N, const RouteArgs& a, const bool* active,
                const acc_t* thr, const acc_t* bias, int64_t* out_idx, acc_t* out_gate, acc_t* out_score) {
  const int64_t k = a.k;
  const acc_t tau = static_cast<acc_t>(a.temperature);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch;
    scratch.reserve(N);
    std::vector<acc_t> biased(bias ? N : 0);  // a token's scores plus the selection bias
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* s = S + t * N;
      int64_t* idx = out_idx + t * k;
      acc_t* g = out_gate + t * k;
      acc_t* sc = out_score + t * k;
      // NaN scores are never selected (as on CUDA and in the torch backend): a
      // NaN compares false with everything and would block better experts.
      auto is_active = [active, s](int64_t e) { return (active == nullptr || active[e]) && !std::isnan(s[e]); };
      int64_t count = 0;
      if (a.gating == Gating::TopAny) {
        auto fired = [&](int64_t e) { return is_active(e) && top_any_fires(s[e], tau, thr[e]); };
        count = select_topk(s, N, k, fired, sc, idx, scratch);
        if (count == 0 && a.fallback_top1) {
          count = select_topk(s, N, 1, is_active, sc, idx, scratch);
          if (count == 1) g[0] = acc_t(1);
        } else {
          for (int64_t j = 0; j < count; ++j) g[j] = top_any_gate<acc_t>(count);
        }
      } else if (bias) {
        // choose by s + b, then gate (and report) the unbiased scores of the chosen
        for (int64_t e = 0; e < N; ++e) biased[e] = s[e] + bias[e];
        count = select_topk(biased.data(), N, k, is_active, sc, idx, scratch);
        for (int64_t j = 0; j < count; ++j) sc[j] = s[idx[j]];
        gates_of_selected(a.gating, sc, count, tau, g);  // top-k gatings only (checked)
      } else {
        count = select_topk(s, N, k, is_active, sc, idx, scratch);
        switch (a.gating) {
          case Gating::TopP: {
            // P = softmax(s/τ) over all active experts; keep the best ones up
            // to and including the first where the cumulative P exceeds p.
            acc_t mx = count ? sc[0] / tau : acc_t(0), denom = 0;
            for (int64_t e = 0; e < N; ++e)
              if (is_active(e)) denom += std::exp(s[e] / tau - mx);
            acc_t cum = 0;
            int64_t kept = 0;
            while (kept < count) {
              g[kept] = top_p_probability(sc[kept], tau, mx, denom);
              cum += g[kept++];
              if (top_p_stops(cum, static_cast<acc_t>(a.top_p))) break;
            }
            count = kept;
            break;
          }
          default:
            gates_of_selected(a.gating, sc, count, tau, g);
            break;
        }
      }
      for (int64_t j = count; j < k; ++j) {
        idx[j] = -1;
        g[j] = 0;
        sc[j] = 0;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& query, const at::Tensor& keys, int64_t k, double temperature,
    c10::string_view gating_name, c10::string_view score_mode, double top_p,
    const c10::optional<at::Tensor>& thresholds, const c10::optional<at::Tensor>& active,
    bool fallback_top1, const c10::optional<at::Tensor>& selection_bias) {
  const char* op = "some.route";
  auto plan = plan_route(op, query, keys, k, temperature, gating_name, score_mode, top_p, thresholds, active,
                         selection_bias);
  const Gating gating = plan.gating;
  const bool cosine = plan.cosine;
  const int64_t T = plan.T, N = plan.N;
  const auto& S = plan.S;  // (T, N)
  auto &indices = plan.indices, &gates = plan.gates, &scores = plan.scores;
  const auto &act = plan.active, &thr = plan.thresholds;
  RouteArgs args{gating, cosine, k, temperature, top_p, fallback_top1};

  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "some_route_cpu", [&] {
    route_rows<scalar_t>(S.data_ptr<scalar_t>(), T, N, args,
                         act.defined() ? act.data_ptr<bool>() : nullptr,
                         thr.defined() ? thr.data_ptr<scalar_t>() : nullptr,
                         plan.bias.defined() ? plan.bias.data_ptr<scalar_t>() : nullptr,
                         indices.data_ptr<int64_t>(), gates.data_ptr<scalar_t>(),
                         scores.data_ptr<scalar_t>());
  });
  return {gates.to(query.scalar_type()), scores.to(query.scalar_type()), indices};
}

// d(loss)/d(score) of every selected slot, from the gate and score gradients.
// For top_p also returns coef_all[t] = -(Σ_j gg_j g_j)/τ, the weight of the
// softmax denominator's gradient that reaches every active expert.
template <typename acc_t>
void route_backward_rows(const acc_t* gg, const acc_t* gs, const int64_t* idx, const acc_t* g,
                         const acc_t* sc, const acc_t* thr, int64_t T, int64_t k, int64_t N,
                         const RouteArgs& a, acc_t* grad_s, acc_t* coef_all,
                         acc_t* grad_m /* top_any: dL/dm per slot, else unused */) {
  const acc_t tau = static_cast<acc_t>(a.temperature);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * k;
      route_backward_token(gg + o, gs + o, idx + o, g + o, sc + o, thr, k, N, a.gating, tau, grad_s + o,
                           coef_all ? coef_all + t : nullptr, grad_m ? grad_m + o : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> route_backward_cpu(
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
  const int64_t T = query.size(0), N = keys.size(0), k = indices.size(1);
  check_index_range(op, indices, N);
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
  RouteArgs args{gating, cosine, k, temperature, 0.0, false};

  auto grad_qhat = at::zeros({T, q.size(1)}, q.options());
  auto grad_thr = has_thr ? at::zeros({N}, q.options()) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "some_route_backward_cpu", [&] {
    route_backward_rows<scalar_t>(
        gg.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
        g.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
        thr.defined() ? thr.data_ptr<scalar_t>() : nullptr, T, k, N, args,
        grad_s.data_ptr<scalar_t>(), coef_all.defined() ? coef_all.data_ptr<scalar_t>() : nullptr,
        grad_m.defined() ? grad_m.data_ptr<scalar_t>() : nullptr);

    // grad_q̂_t = Σ_j grad_s_tj k̂_{I_tj}: a gather-axpy, parallel over tokens.
    const int64_t d = q.size(1);
    const scalar_t* K = kk.data_ptr<scalar_t>();
    const int64_t* I = idx.data_ptr<int64_t>();
    const scalar_t* GS = grad_s.data_ptr<scalar_t>();
    scalar_t* GQ = grad_qhat.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = I[t * k + j];
          if (e < 0 || e >= N) continue;
          const scalar_t w = GS[t * k + j];
          const scalar_t* ke = K + e * d;
          scalar_t* gq = GQ + t * d;
          for (int64_t c = 0; c < d; ++c) gq[c] += w * ke[c];
        }
    });

    if (gating == Gating::TopAny && has_thr) {
      // dL/dG_e = -σ'(G_e) Σ_{(t,j): I_tj = e} dL/dm_tj; serial, so deterministic.
      const scalar_t* TH = thr.data_ptr<scalar_t>();
      const scalar_t* GM = grad_m.data_ptr<scalar_t>();
      scalar_t* GT = grad_thr.data_ptr<scalar_t>();
      for (int64_t p = 0; p < T * k; ++p) {
        const int64_t e = I[p];
        if (e < 0 || e >= N || GM[p] == 0) continue;
        const scalar_t sg = sigmoid(TH[e]);
        GT[e] -= GM[p] * sg * (scalar_t(1) - sg);
      }
    }
  });

  if (gating == Gating::TopP) add_top_p_coupling(grad_qhat, q, kk, temperature, active, coef_all);
  const auto grad_q = query_grad(query, q, grad_qhat, acc, cosine);
  return {grad_q.to(query.scalar_type()),
          has_thr ? grad_thr.to(thresholds->scalar_type()) : grad_thr};
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace some
