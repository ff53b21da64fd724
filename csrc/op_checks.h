// Argument validation of every SoME op, shared by the CPU and CUDA kernels so
// that both raise the same exceptions with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <utility>

#include "checks.h"

namespace some {

inline void check_route_inputs(const char* op, const at::Tensor& query, const at::Tensor& keys,
                        int64_t k, double temperature, Gating gating, double top_p,
                        const c10::optional<at::Tensor>& thresholds,
                        const c10::optional<at::Tensor>& active,
                        const c10::optional<at::Tensor>& selection_bias = c10::nullopt) {
  check_defined(op, "query", query);
  check_defined(op, "keys", keys);
  check_dim(op, "query", query, 2);
  check_dim(op, "keys", keys, 2);
  check_floating(op, "query", query);
  check_floating(op, "keys", keys);
  check_same_device(op, "keys", keys, "query", query);
  const int64_t N = keys.size(0);
  TORCH_CHECK_VALUE(N >= 1, op, ": 'keys' must hold at least one expert, got shape ",
                    shape_str(keys));
  check_size(op, "keys", keys, 1, query.size(1), "the query width d");
  TORCH_CHECK_VALUE(k >= 1 && k <= N, op, ": k must be in 1..N = 1..", N, ", got k = ", k);
  // below the smallest normal float32, s / τ overflows in the kernels' precision
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= std::numeric_limits<float>::min(), op,
                    ": temperature must be a finite number >= 1.17549e-38 (the smallest normal float32), got ",
                    temperature);
  if (gating == Gating::TopP) {
    TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1], got ", top_p);
  }
  if (gating == Gating::TopAny) {
    TORCH_CHECK_VALUE(thresholds.has_value() && thresholds->defined(), op,
                      ": gating 'top_any' needs the per-expert 'thresholds' tensor of shape [N]");
  }
  if (thresholds.has_value() && thresholds->defined()) {
    const auto& th = *thresholds;
    check_dim(op, "thresholds", th, 1);
    check_size(op, "thresholds", th, 0, N, "the number of experts N");
    check_floating(op, "thresholds", th);
    check_same_device(op, "thresholds", th, "query", query);
  }
  if (active.has_value() && active->defined()) {
    const auto& a = *active;
    check_dim(op, "active", a, 1);
    check_size(op, "active", a, 0, N, "the number of experts N");
    check_dtype(op, "active", a, at::kBool);
    check_same_device(op, "active", a, "query", query);
  }
  if (selection_bias.has_value() && selection_bias->defined()) {
    const auto& b = *selection_bias;
    // the bias reorders a top-k; top_p and top_any select by the scores' own values
    TORCH_CHECK_VALUE(gating != Gating::TopP && gating != Gating::TopAny, op,
                      ": 'selection_bias' works with the top-k gatings (softmax, sigmoid, relu, avg_k), not with "
                      "gating '", gating == Gating::TopP ? "top_p" : "top_any", "'");
    check_dim(op, "selection_bias", b, 1);
    check_size(op, "selection_bias", b, 0, N, "the number of experts N");
    check_floating(op, "selection_bias", b);
    check_same_device(op, "selection_bias", b, "query", query);
    // a NaN or Inf bias (also one that overflows in the accumulation dtype) would decide the
    // selection alone. A value check: on a GPU a host sync, so there only when asked
    // (SOME_CHECK_INDICES=1, as the index checks); the layer's own bias is finite by construction.
    if (b.device().is_cpu() || device_value_checks_requested())
      TORCH_CHECK_VALUE(b.numel() == 0 || at::isfinite(b.to(stats_dtype(query.scalar_type()))).all().item<bool>(),
                        op, ": 'selection_bias' must be finite (no NaN or Inf)");
  }
}

// route_backward: the forward's arguments and outputs, as route returned them.
inline void check_route_backward_inputs(const char* op, const at::Tensor& grad_gates, const at::Tensor& grad_scores,
                                        const at::Tensor& query, const at::Tensor& keys, const at::Tensor& indices,
                                        const at::Tensor& gates, const at::Tensor& scores, double temperature,
                                        Gating gating, const c10::optional<at::Tensor>& thresholds,
                                        const c10::optional<at::Tensor>& active) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_gates", &grad_gates},
                         {"grad_scores", &grad_scores}, {"query", &query}, {"keys", &keys}, {"indices", &indices},
                         {"gates", &gates}, {"scores", &scores}})
    check_defined(op, name, *t);
  check_dim(op, "indices", indices, 2);
  check_dtype(op, "indices", indices, at::kLong);
  const int64_t k = indices.size(1);
  check_route_inputs(op, query, keys, k, temperature, gating, 0.5, thresholds, active);
  const int64_t T = query.size(0);
  check_size(op, "indices", indices, 0, T, "the number of tokens T (rows of query)");
  check_same_device(op, "indices", indices, "query", query);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_gates", &grad_gates},
                         {"grad_scores", &grad_scores}, {"gates", &gates}, {"scores", &scores}}) {
    check_dim(op, name, *t, 2);
    TORCH_CHECK_VALUE(t->size(0) == T && t->size(1) == k, op, ": '", name, "' must have shape [T, k] = [", T,
                      ", ", k, "], got ", shape_str(*t));
    check_floating(op, name, *t);
    check_same_device(op, name, *t, "query", query);
  }
}

inline void check_expert_inputs(const char* op, const at::Tensor& x, const at::Tensor& indices,
                         const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x}, {"indices", &indices},
                         {"gates", &gates}, {"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}})
    check_defined(op, name, *t);
  check_dim(op, "x", x, 2);
  check_floating(op, "x", x);
  check_dim(op, "indices", indices, 2);
  check_dtype(op, "indices", indices, at::kLong);
  check_dim(op, "gates", gates, 2);
  check_dim(op, "w1", w1, 3);
  check_dim(op, "b1", b1, 2);
  check_dim(op, "w2", w2, 3);
  check_dim(op, "b2", b2, 2);
  const int64_t T = x.size(0), d = x.size(1), N = w1.size(0), h = w1.size(1);
  check_size(op, "indices", indices, 0, T, "the number of tokens T (rows of x)");
  TORCH_CHECK_VALUE(gates.sizes() == indices.sizes(), op, ": 'gates' has shape ",
                    shape_str(gates), " but 'indices' has shape ", shape_str(indices),
                    "; both must be [T, k]");
  check_size(op, "w1", w1, 2, d, "the model width d (columns of x)");
  check_size(op, "b1", b1, 0, N, "the number of experts N (w1.shape[0])");
  check_size(op, "b1", b1, 1, h, "the expert width h (w1.shape[1])");
  check_size(op, "w2", w2, 0, N, "the number of experts N (w1.shape[0])");
  check_size(op, "w2", w2, 1, d, "the model width d");
  check_size(op, "w2", w2, 2, h, "the expert width h (w1.shape[1])");
  check_size(op, "b2", b2, 0, N, "the number of experts N (w1.shape[0])");
  check_size(op, "b2", b2, 1, d, "the model width d");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"gates", &gates},
                         {"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}}) {
    check_same_dtype(op, name, *t, "x", x);
    check_same_device(op, name, *t, "x", x);
  }
  check_same_device(op, "indices", indices, "x", x);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"w1", &w1}, {"b1", &b1},
                         {"w2", &w2}, {"b2", &b2}})
    check_contiguous(op, name, *t);
}

// The grouping tensors returned by the forward (hidden [P, h], order [P], offsets [N + 1], int64).
inline void check_grouping_shapes(const char* op, const at::Tensor& hidden, const at::Tensor& order,
                                  const at::Tensor& offsets, int64_t P, int64_t N, int64_t h) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && hidden.size(0) == P && hidden.size(1) == h, op,
                    ": 'hidden' must have shape [T*k, h] = [", P, ", ", h, "], got ", shape_str(hidden));
  TORCH_CHECK_VALUE(order.dim() == 1 && order.numel() == P && offsets.dim() == 1 && offsets.numel() == N + 1, op,
                    ": 'order'/'offsets' do not match this call (expected shapes [", P, "] and [", N + 1,
                    "], got ", shape_str(order), " and ", shape_str(offsets),
                    "); pass the tensors returned by the forward op");
  check_dtype(op, "order", order, at::kLong);
  check_dtype(op, "offsets", offsets, at::kLong);
}

inline void check_experts_backward_inputs(const char* op, const at::Tensor& grad_y_in,
                                          const at::Tensor& indices_in, const at::Tensor& gates_in,
                                          const at::Tensor& w1, const at::Tensor& w2,
                                          const at::Tensor& b2, const at::Tensor& hidden,
                                          const at::Tensor& order, const at::Tensor& offsets) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_y", &grad_y_in},
                         {"indices", &indices_in}, {"gates", &gates_in}, {"w1", &w1}, {"w2", &w2},
                         {"b2", &b2}, {"hidden", &hidden}, {"order", &order}, {"offsets", &offsets}})
    check_defined(op, name, *t);
  check_dim(op, "grad_y", grad_y_in, 2);
  check_dim(op, "indices", indices_in, 2);
  check_dim(op, "w1", w1, 3);
  check_floating(op, "w1", w1);
  const int64_t T = indices_in.size(0), d = w1.size(2), k = indices_in.size(1), N = w1.size(0),
                h = w1.size(1), P = T * k;
  TORCH_CHECK_VALUE(grad_y_in.size(0) == T && grad_y_in.size(1) == d, op,
                    ": 'grad_y' must have shape [T, d] = [", T, ", ", d, "], got ",
                    shape_str(grad_y_in));
  TORCH_CHECK_VALUE(gates_in.sizes() == indices_in.sizes(), op, ": 'gates' has shape ",
                    shape_str(gates_in), " but 'indices' has shape ", shape_str(indices_in),
                    "; both must be [T, k]");
  check_dim(op, "w2", w2, 3);
  check_size(op, "w2", w2, 0, N, "the number of experts N (w1.shape[0])");
  check_size(op, "w2", w2, 1, d, "the model width d (w1.shape[2])");
  check_size(op, "w2", w2, 2, h, "the expert width h (w1.shape[1])");
  check_dim(op, "b2", b2, 2);
  check_size(op, "b2", b2, 0, N, "the number of experts N (w1.shape[0])");
  check_size(op, "b2", b2, 1, d, "the model width d (w1.shape[2])");
  check_same_dtype(op, "grad_y", grad_y_in, "w1", w1);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"w2", &w2}, {"b2", &b2}})
    check_same_dtype(op, name, *t, "w1", w1);
  check_grouping_shapes(op, hidden, order, offsets, P, N, h);
  check_dtype(op, "indices", indices_in, at::kLong);
  check_same_dtype(op, "gates", gates_in, "w1", w1);
  check_same_dtype(op, "hidden", hidden, "w1", w1);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"indices", &indices_in},
                         {"gates", &gates_in}, {"w1", &w1}, {"w2", &w2}, {"b2", &b2},
                         {"hidden", &hidden}, {"order", &order}, {"offsets", &offsets}})
    check_same_device(op, name, *t, "grad_y", grad_y_in);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"w1", &w1}, {"w2", &w2},
                         {"b2", &b2}})
    check_contiguous(op, name, *t);
}

// The generator's parameters of procedural experts (csrc/philox.h).
inline void check_generator_args(const char* op, int64_t seed, int64_t layer) {
  TORCH_CHECK_VALUE(seed >= 0 && seed <= 0xffffffffLL, op, ": seed must be in 0..2^32-1, got ", seed);
  TORCH_CHECK_VALUE(layer >= 0 && layer <= 0xffffffffLL, op, ": layer must be in 0..2^32-1, got ", layer);
}

inline void check_procedural_expert_inputs(const char* op, const at::Tensor& x, const at::Tensor& indices,
                                           const at::Tensor& gates, int64_t seed, int64_t layer,
                                           int64_t num_experts, int64_t d_ffn) {
  check_defined(op, "x", x);
  check_defined(op, "indices", indices);
  check_defined(op, "gates", gates);
  check_dim(op, "x", x, 2);
  check_floating(op, "x", x);
  check_dim(op, "indices", indices, 2);
  check_dtype(op, "indices", indices, at::kLong);
  check_size(op, "indices", indices, 0, x.size(0), "the number of tokens T (rows of x)");
  TORCH_CHECK_VALUE(gates.sizes() == indices.sizes(), op, ": 'gates' has shape ", shape_str(gates),
                    " but 'indices' has shape ", shape_str(indices), "; both must be [T, k]");
  check_same_dtype(op, "gates", gates, "x", x);
  check_same_device(op, "gates", gates, "x", x);
  check_same_device(op, "indices", indices, "x", x);
  check_generator_args(op, seed, layer);
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts < (int64_t{1} << 31), op,
                    ": num_experts must be in 1..2^31-1, got ", num_experts);
  TORCH_CHECK_VALUE(d_ffn >= 1 && d_ffn < (int64_t{1} << 31), op, ": d_ffn must be in 1..2^31-1, got ", d_ffn);
}

inline void check_procedural_backward_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& indices,
                                             const at::Tensor& gates, int64_t seed, int64_t layer,
                                             int64_t num_experts, int64_t d_ffn, const at::Tensor& hidden,
                                             const at::Tensor& order, const at::Tensor& offsets) {
  check_procedural_expert_inputs(op, grad_y, indices, gates, seed, layer, num_experts, d_ffn);
  check_defined(op, "hidden", hidden);
  check_defined(op, "order", order);
  check_defined(op, "offsets", offsets);
  check_grouping_shapes(op, hidden, order, offsets, indices.numel(), num_experts, d_ffn);
  check_same_dtype(op, "hidden", hidden, "grad_y", grad_y);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"hidden", &hidden}, {"order", &order},
                         {"offsets", &offsets}})
    check_same_device(op, name, *t, "grad_y", grad_y);
}

inline void check_fill_expert_weights_inputs(const char* op, const at::Tensor& w1, const at::Tensor& b1,
                                             const at::Tensor& w2, const at::Tensor& b2, int64_t seed,
                                             int64_t layer, int64_t first_expert) {
  check_defined(op, "w1", w1);
  check_dim(op, "w1", w1, 3);
  check_floating(op, "w1", w1);
  const int64_t n = w1.size(0), h = w1.size(1), d = w1.size(2);
  check_dim(op, "b1", b1, 2);
  check_size(op, "b1", b1, 0, n, "the number of experts (w1.shape[0])");
  check_size(op, "b1", b1, 1, h, "the expert width h (w1.shape[1])");
  check_dim(op, "w2", w2, 3);
  check_size(op, "w2", w2, 0, n, "the number of experts (w1.shape[0])");
  check_size(op, "w2", w2, 1, d, "the model width d (w1.shape[2])");
  check_size(op, "w2", w2, 2, h, "the expert width h (w1.shape[1])");
  check_dim(op, "b2", b2, 2);
  check_size(op, "b2", b2, 0, n, "the number of experts (w1.shape[0])");
  check_size(op, "b2", b2, 1, d, "the model width d (w1.shape[2])");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"b1", &b1}, {"w2", &w2}, {"b2", &b2}}) {
    check_same_dtype(op, name, *t, "w1", w1);
    check_same_device(op, name, *t, "w1", w1);
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"w1", &w1}, {"b1", &b1}, {"w2", &w2},
                         {"b2", &b2}})
    check_contiguous(op, name, *t);
  check_generator_args(op, seed, layer);
  TORCH_CHECK_VALUE(first_expert >= 0 && first_expert + n <= (int64_t{1} << 32), op,
                    ": experts first_expert .. first_expert + n - 1 must be in 0..2^32-1, got first_expert = ",
                    first_expert, ", n = ", n);
}

inline void check_keystore_stats_inputs(const char* op, const at::Tensor& query,
                                        const at::Tensor& indices, const at::Tensor& gates,
                                        int64_t num_experts) {
  check_defined(op, "query", query);
  check_defined(op, "indices", indices);
  check_defined(op, "gates", gates);
  check_dim(op, "query", query, 2);
  check_floating(op, "query", query);
  check_dim(op, "indices", indices, 2);
  check_dtype(op, "indices", indices, at::kLong);
  check_size(op, "indices", indices, 0, query.size(0), "the number of tokens T (rows of query)");
  TORCH_CHECK_VALUE(gates.sizes() == indices.sizes(), op, ": 'gates' has shape ",
                    shape_str(gates), " but 'indices' has shape ", shape_str(indices),
                    "; both must be [T, k]");
  check_floating(op, "gates", gates);
  check_same_device(op, "indices", indices, "query", query);
  check_same_device(op, "gates", gates, "query", query);
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
}

inline void check_keystore_update_inputs(const char* op, const at::Tensor& keys,
                                         const at::Tensor& velocity, const at::Tensor& usage,
                                         const at::Tensor& sum_q, const at::Tensor& mass,
                                         const at::Tensor& counts, const at::Tensor& peer_sum,
                                         const at::Tensor& peer_count, double alpha, double beta,
                                         double delta, double theta_percentile, double ema_decay) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"keys", &keys}, {"velocity", &velocity},
                         {"usage", &usage}, {"sum_q", &sum_q}, {"mass", &mass}, {"counts", &counts},
                         {"peer_sum", &peer_sum}, {"peer_count", &peer_count}})
    check_defined(op, name, *t);
  check_dim(op, "keys", keys, 2);
  const int64_t N = keys.size(0);
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kDouble, op,
                   ": 'keys' must be float32 or float64 (the key store is kept in full "
                   "precision), got ", keys.scalar_type());
  TORCH_CHECK_VALUE(velocity.sizes() == keys.sizes(), op, ": 'velocity' has shape ",
                    shape_str(velocity), " but 'keys' has shape ", shape_str(keys));
  TORCH_CHECK_VALUE(sum_q.sizes() == keys.sizes(), op, ": 'sum_q' has shape ",
                    shape_str(sum_q), " but 'keys' has shape ", shape_str(keys));
  TORCH_CHECK_VALUE(peer_sum.sizes() == keys.sizes(), op, ": 'peer_sum' has shape ",
                    shape_str(peer_sum), " but 'keys' has shape ", shape_str(keys));
  check_dim(op, "usage", usage, 1);
  check_size(op, "usage", usage, 0, N, "the number of experts N");
  check_dim(op, "mass", mass, 1);
  check_size(op, "mass", mass, 0, N, "the number of experts N");
  check_dim(op, "counts", counts, 1);
  check_size(op, "counts", counts, 0, N, "the number of experts N");
  check_dim(op, "peer_count", peer_count, 1);
  check_size(op, "peer_count", peer_count, 0, N, "the number of experts N");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"velocity", &velocity},
                         {"usage", &usage}, {"sum_q", &sum_q}, {"mass", &mass},
                         {"peer_sum", &peer_sum}}) {
    check_same_dtype(op, name, *t, "keys", keys);
  }
  check_dtype(op, "counts", counts, at::kLong);
  check_dtype(op, "peer_count", peer_count, at::kLong);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"velocity", &velocity},
                         {"usage", &usage}, {"sum_q", &sum_q}, {"mass", &mass},
                         {"counts", &counts}, {"peer_sum", &peer_sum}, {"peer_count", &peer_count}})
    check_same_device(op, name, *t, "keys", keys);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"keys", &keys},
                         {"velocity", &velocity}, {"usage", &usage}})
    check_contiguous(op, name, *t);
  for (auto [name, v] : {std::pair<const char*, double>{"alpha", alpha}, {"beta", beta},
                         {"delta", delta}})
    TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
  TORCH_CHECK_VALUE(!velocity.is_alias_of(keys) && !usage.is_alias_of(keys) && !usage.is_alias_of(velocity), op,
                    ": 'keys', 'velocity' and 'usage' are updated in place and must not share memory");
  TORCH_CHECK_VALUE(theta_percentile >= 0 && theta_percentile <= 1, op,
                    ": theta_percentile must be in [0, 1], got ", theta_percentile);
  TORCH_CHECK_VALUE(ema_decay >= 0 && ema_decay <= 1, op, ": ema_decay must be in [0, 1], got ",
                    ema_decay);
}

}  // namespace some
