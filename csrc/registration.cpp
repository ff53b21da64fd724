// The one place where the SoME op schemas are declared, and the pybind11
// module `some._C` that reports how this binary was built.
//
// Kernels register themselves per dispatch key in their own files
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fake kernels and autograd
// live in some/ops/native.py.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/repulsion.h"
#include "cpu/small_gemm.h"
#include "philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(some, m) {
  // docs/method.md §3 steps 1-4: scores, top-k selection and gates. (Float outputs come
  // first; some.ops.route returns them as (indices, gates, scores).) selection_bias (N,):
  // added to the scores for choosing the top-k only (docs/method.md §4.1, balance_bias); the gates,
  // the returned scores and the backward use the unbiased scores.
  m.def(
      "route(Tensor query, Tensor keys, int k, float temperature, str gating='softmax', "
      "str score_mode='cosine', float top_p=0.4, Tensor? thresholds=None, "
      "Tensor? active=None, bool fallback_top1=False, Tensor? selection_bias=None) "
      "-> (Tensor gates, Tensor scores, Tensor indices)");
  m.def(
      "route_backward(Tensor grad_gates, Tensor grad_scores, Tensor query, Tensor keys, "
      "Tensor indices, Tensor gates, Tensor scores, float temperature, str gating, "
      "str score_mode, Tensor? thresholds, Tensor? active) "
      "-> (Tensor grad_query, Tensor grad_thresholds)");

  // docs/method.md §3 step 5: y_t = sum_j g_tj E_{I_tj}(x_t) with frozen experts.
  // `hidden` (pre-activations, grouped by expert), `order` and `offsets` (the
  // token-by-expert grouping) are computed once and reused by the backward.
  m.def(
      "experts(Tensor x, Tensor indices, Tensor gates, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2) -> (Tensor y, Tensor hidden, Tensor order, Tensor offsets)");
  m.def(
      "experts_backward(Tensor grad_y, Tensor indices, Tensor gates, Tensor w1, "
      "Tensor w2, Tensor b2, Tensor hidden, Tensor order, Tensor offsets, bool need_grad_x, "
      "bool need_grad_gates) -> (Tensor grad_x, Tensor grad_gates)");

  // docs/method.md §9: the same with procedural experts, never stored: element i of
  // tensor t of expert e is a pure function of (seed, layer, e, t, i)
  // (csrc/philox.h), generated where the kernels use it, in x's dtype.
  m.def(
      "procedural_experts(Tensor x, Tensor indices, Tensor gates, int seed, int layer, "
      "int num_experts, int d_ffn) -> (Tensor y, Tensor hidden, Tensor order, Tensor offsets)");
  m.def(
      "procedural_experts_backward(Tensor grad_y, Tensor indices, Tensor gates, int seed, int layer, "
      "int num_experts, int d_ffn, Tensor hidden, Tensor order, Tensor offsets, bool need_grad_x, "
      "bool need_grad_gates) -> (Tensor grad_x, Tensor grad_gates)");
  // The stored experts filled from the same generator (bit-identical to the
  // procedural ones): experts first_expert .. first_expert + w1.size(0) - 1.
  m.def(
      "fill_expert_weights(Tensor(a!) w1, Tensor(b!) b1, Tensor(c!) w2, Tensor(d!) b2, int seed, "
      "int layer, int first_expert) -> ()");

  // docs/method.md §4: sufficient statistics (sums, so they can be all-reduced) and the
  // in-place self-organization step. `keystore_update` returns a bool scalar
  // that is False when non-finite statistics made it leave the store untouched.
  // The co-selection C enters as what peer-pull reads of it, peer_sum = Σ_f C_ef K_f
  // (N, d) and peer_count = Σ_f C_ef (N), f ≠ e: some.ops.coselect makes both from a
  // dense or a compact C, so no N × N matrix has to exist (some.ops.keystore_stats /
  // keystore_update keep the (…, coselect) signatures of docs/method.md §5).
  m.def(
      "keystore_stats(Tensor query, Tensor indices, Tensor gates, int num_experts) "
      "-> (Tensor sum_q, Tensor mass, Tensor counts)");
  m.def(
      "keystore_update(Tensor(a!) keys, Tensor(b!) velocity, Tensor(c!) usage, Tensor sum_q, "
      "Tensor mass, Tensor counts, Tensor peer_sum, Tensor peer_count, float alpha, float beta, "
      "float delta, float theta_percentile, float ema_decay, bool normalize=True) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Build facts of the some extension; the ops live in torch.ops.some.";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = SOME_VERSION;
#ifdef SOME_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
    info["omp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["omp_max_threads"] = 1;
#endif
    info["torch_version"] = SOME_TORCH_VERSION;
    info["expert_generator"] = "philox4x32-10/some-philox-v" + std::to_string(some::philox::kVersion);
    // the CPU experts' per-expert products: straight into torch's BLAS, or through at::mm
    info["cpu_expert_gemm"] = some::small_gemm::direct<float>() ? "blas" : "at::mm";
    return info;
  });
  m.def("keystore_selection_counts", []() {
    py::dict counts;  // since the extension was loaded (csrc/cpu/repulsion.h)
    counts["sampled"] = some::repulsion::sampled_passes.load();
    counts["fallback"] = some::repulsion::sampled_fallbacks.load();
    return counts;
  });
}
