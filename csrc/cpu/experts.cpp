// CPU kernels of some::experts and some::experts_backward (docs/method.md §3 step 5),
// and of their procedural twins, whose expert weights are never stored but
// regenerated from the seed where they are used (docs/method.md §9, csrc/philox.h).
//
// Plan, shared by forward and backward:
//   1. group the (token, slot) pairs by expert with a stable counting sort
//      (`order`, `offsets`); index -1 slots are dropped;
//   2. per expert, gather its rows and run the two GEMMs through BLAS
//      (called directly, small_gemm.h: with many experts of a few rows each,
//      at::mm's per-call bookkeeping would come with every one of them);
//   3. bias + GELU (forward) and GELU' + gate (backward) in one fused
//      vectorized pass per expert, parallel over rows;
//   4. combine per token (parallel over tokens, so no atomics and
//      bit-identical results run to run).
// The experts are frozen: the backward computes dL/dx and dL/dgates only,
// two GEMMs, so forward+backward costs twice the forward.
//
// Where the weights come from is a template parameter: `StoredExperts` reads
// the (N, h, d) tensors, `ProceduralExperts` generates expert e's matrices
// into a per-thread scratch buffer just before its GEMMs. Everything else is
// the same code, so both storages give bit-identical results.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../op_checks.h"
#include "../philox.h"
#include "grouping.h"
#include "small_gemm.h"
#include "kernels/expert_act.h"

namespace some {
namespace {

const act::ExpertActKernels& act_kernels() {
  static const act::ExpertActKernels& k = [] () -> const act::ExpertActKernels& {
#if defined(__x86_64__) && defined(SOME_HAVE_AVX2_KERNELS)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return act::kernels_avx2();
#endif
    return act::kernels_default();
  }();
  return k;
}

// ---------------------------------------------------------------- weights

// Writes elements [0, n) of one expert's tensor in `dtype` (through float32,
// the generator's precision) into `dst`, a contiguous tensor of n elements.
void generate_tensor(at::Tensor& dst, uint32_t seed, uint32_t layer, int64_t expert, uint32_t tensor,
                     int64_t fan_in) {
  const int64_t n = dst.numel();
  const float bound = philox::bound(fan_in);
  const auto e = static_cast<uint32_t>(expert);
  if (dst.scalar_type() == at::kFloat) {
    act_kernels().philox_uniform(dst.data_ptr<float>(), 0, n, seed, layer, e, tensor, bound);
    return;
  }
  auto tmp = at::empty({n}, dst.options().dtype(at::kFloat));
  act_kernels().philox_uniform(tmp.data_ptr<float>(), 0, n, seed, layer, e, tensor, bound);
  dst.view({n}).copy_(tmp);  // round to the experts' dtype (bfloat16: to nearest even)
}

// The stored experts: slices of w1 (N, h, d), b1 (N, h), w2 (N, d, h), b2 (N, d).
struct StoredExperts {
  const at::Tensor &w1_, &b1_, &w2_, &b2_;
  struct Scratch {
    Scratch(const StoredExperts&, const at::TensorOptions&) {}
  };
  at::Tensor w1(int64_t e, Scratch&) const { return w1_[e]; }
  at::Tensor w2(int64_t e, Scratch&) const { return w2_[e]; }
  at::Tensor b1(int64_t e, Scratch&) const { return b1_[e]; }
  const at::Tensor& all_b2() const { return b2_; }
};

// Procedural experts: expert e's tensors generated into per-thread buffers
// when first asked for (each is used by one expert's GEMMs, then replaced).
struct ProceduralExperts {
  uint32_t seed, layer;
  int64_t d, h;
  at::Tensor b2_;  // (N, d): small, generated once per call (the combine reads every expert's)
  struct Scratch {
    at::Tensor w1, w2, b1;
    int64_t e_w1 = -1, e_w2 = -1, e_b1 = -1;
    Scratch(const ProceduralExperts& src, const at::TensorOptions& opts)
        : w1(at::empty({src.h, src.d}, opts)), w2(at::empty({src.d, src.h}, opts)), b1(at::empty({src.h}, opts)) {}
  };
  at::Tensor w1(int64_t e, Scratch& s) const {
    if (s.e_w1 != e) generate_tensor(s.w1, seed, layer, e, philox::kTensorW1, d), s.e_w1 = e;
    return s.w1;
  }
  at::Tensor w2(int64_t e, Scratch& s) const {
    if (s.e_w2 != e) generate_tensor(s.w2, seed, layer, e, philox::kTensorW2, h), s.e_w2 = e;
    return s.w2;
  }
  at::Tensor b1(int64_t e, Scratch& s) const {
    if (s.e_b1 != e) generate_tensor(s.b1, seed, layer, e, philox::kTensorB1, d), s.e_b1 = e;
    return s.b1;
  }
  const at::Tensor& all_b2() const { return b2_; }
};

ProceduralExperts procedural_source(int64_t seed, int64_t layer, int64_t N, int64_t d, int64_t h,
                                    const at::TensorOptions& opts) {
  ProceduralExperts src{static_cast<uint32_t>(seed), static_cast<uint32_t>(layer), d, h, at::empty({N, d}, opts)};
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t end) {
    for (int64_t e = b; e < end; ++e) {
      auto row = src.b2_[e];
      generate_tensor(row, src.seed, src.layer, e, philox::kTensorB2, h);
    }
  });
  return src;
}

// ------------------------------------------------------------- helpers

// position[p] = row of pair p in the grouped order, or -1 for an empty slot.
std::vector<int64_t> inverse_order(const at::Tensor& order, int64_t valid, int64_t P) {
  std::vector<int64_t> pos(P, -1);
  const int64_t* ord = order.data_ptr<int64_t>();
  for (int64_t r = 0; r < valid; ++r) pos[ord[r]] = r;
  return pos;
}

// Rows dst[r] = src[order[r] / k] for r in 0..rows.
template <typename scalar_t>
void gather_rows(const scalar_t* src, scalar_t* dst, const int64_t* ord, int64_t rows,
                 int64_t k, int64_t width) {
  at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      std::copy_n(src + (ord[r] / k) * width, width, dst + r * width);
  });
}

// Runs fn(e_begin, e_end) over contiguous groups of experts.
//
// The per-expert GEMMs are small (a few hundred rows), and threading each of
// them inside BLAS costs a fork/join per GEMM. Instead each thread takes a
// contiguous group of experts holding about the same number of rows and runs
// single-threaded GEMMs plus the elementwise passes on its own cache-hot
// buffers (BLAS and nested parallel_for run serially inside a parallel
// region). With too few busy experts to balance, the experts run one after
// the other and BLAS threads each GEMM instead.
template <typename F>
void for_expert_groups(const int64_t* off, int64_t N, F&& fn) {
  const int64_t threads = at::get_num_threads();
  int64_t busy = 0;
  for (int64_t e = 0; e < N; ++e) busy += off[e + 1] > off[e];
  if (threads <= 1 || busy < 4 * threads) {
    fn(0, N);
    return;
  }
  const int64_t total = off[N];
  std::vector<int64_t> bounds{0};
  for (int64_t g = 1; g < threads; ++g) {
    const int64_t target = total * g / threads;
    int64_t e = std::lower_bound(off, off + N + 1, target) - off;  // off[e] >= target
    if (e > 0 && target - off[e - 1] < off[e] - target) --e;     // nearer boundary
    bounds.push_back(std::clamp(e, bounds.back(), N));
  }
  bounds.push_back(N);
  at::parallel_for(0, threads, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g)
      if (bounds[g] < bounds[g + 1]) fn(bounds[g], bounds[g + 1]);
  });
}

inline int64_t max_rows_in(const int64_t* off, int64_t e_begin, int64_t e_end) {
  int64_t m = 0;
  for (int64_t e = e_begin; e < e_end; ++e) m = std::max(m, off[e + 1] - off[e]);
  return m;
}

// Fallback elementwise passes for float64 and bfloat16 (scalar, fp32/fp64 math).
// bfloat16: GELU and GELU' are both taken at the rounded pre-activation that
// `hidden` stores, so the backward differentiates exactly the forward's function.
template <typename scalar_t>
void bias_gelu_generic(scalar_t* pre, scalar_t* act, const scalar_t* b1, int64_t rows,
                       int64_t h) {
  using opmath = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < h; ++c) {
      const scalar_t stored = static_cast<scalar_t>(static_cast<opmath>(pre[r * h + c]) + static_cast<opmath>(b1[c]));
      const opmath v = static_cast<opmath>(stored);
      pre[r * h + c] = stored;
      act[r * h + c] = static_cast<scalar_t>(opmath(0.5) * v * (opmath(1) + std::erf(v * opmath(M_SQRT1_2))));
    }
}

template <typename scalar_t>
void gelu_grad_generic(const scalar_t* pre, scalar_t* D, const scalar_t* gate, at::opmath_type<scalar_t>* dot,
                       int64_t rows, int64_t h) {
  using opmath = at::opmath_type<scalar_t>;
  const opmath inv_sqrt_2pi = opmath(0.3989422804014327);
  for (int64_t r = 0; r < rows; ++r) {
    opmath acc = 0;
    const opmath g = static_cast<opmath>(gate[r]);
    for (int64_t c = 0; c < h; ++c) {
      const opmath x = static_cast<opmath>(pre[r * h + c]), dv = static_cast<opmath>(D[r * h + c]);
      const opmath cdf = opmath(0.5) * (opmath(1) + std::erf(x * opmath(M_SQRT1_2)));
      const opmath pdf = inv_sqrt_2pi * std::exp(opmath(-0.5) * x * x);
      acc += dv * x * cdf;
      D[r * h + c] = static_cast<scalar_t>(g * dv * (cdf + x * pdf));
    }
    dot[r] = acc;
  }
}

// ------------------------------------------------------------- forward

template <typename Src>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_forward(
    const char* op, const at::Tensor& x_in, const at::Tensor& indices, const at::Tensor& gates_in,
    const Src& src, int64_t N, int64_t h) {
  const auto x = x_in.contiguous();
  const auto gates = gates_in.contiguous();
  const auto idx = indices.contiguous();  // kept alive: the combine pass reads it
  const int64_t T = x.size(0), d = x.size(1), k = indices.size(1), P = T * k;
  auto [order, offsets] = group_by_expert(op, idx, N);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t valid = off[N];

  auto hidden = at::empty({P, h}, x.options());
  if (valid < P) hidden.narrow(0, valid, P - valid).zero_();
  auto y = at::empty({T, d}, x.options());
  if (valid == 0) {
    y.zero_();
    return {y, hidden, order, offsets};
  }
  auto out = at::empty({valid, d}, x.options());  // expert outputs without b2, grouped

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "some_experts_cpu", [&] {
    for_expert_groups(off, N, [&](int64_t e_begin, int64_t e_end) {
      const int64_t rows = max_rows_in(off, e_begin, e_end);
      auto xg = at::empty({rows, d}, x.options());  // this expert's x rows
      auto act = at::empty({rows, h}, x.options());  // GELU(pre), input of the 2nd GEMM
      typename Src::Scratch scratch(src, x.options());
      scalar_t* xg_p = xg.data_ptr<scalar_t>();
      scalar_t* act_p = act.data_ptr<scalar_t>();
      for (int64_t e = e_begin; e < e_end; ++e) {
        const int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        scalar_t* pre_p = hidden.data_ptr<scalar_t>() + r0 * h;
        gather_rows(x.data_ptr<scalar_t>(), xg_p, ord + r0, n, k, d);
        small_gemm::product(pre_p, xg_p, src.w1(e, scratch).template data_ptr<scalar_t>(), n, h, d,
                            /*b_transposed=*/true, x.options());  // (n, d) @ (d, h)
        const auto b1_e = src.b1(e, scratch);
        const scalar_t* b1_p = b1_e.template data_ptr<scalar_t>();
        at::parallel_for(0, n, 8, [&](int64_t b, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, float>)
            act_kernels().bias_gelu(pre_p + b * h, act_p + b * h, b1_p, end - b, h);
          else
            bias_gelu_generic(pre_p + b * h, act_p + b * h, b1_p, end - b, h);
        });
        small_gemm::product(out.data_ptr<scalar_t>() + r0 * d, act_p, src.w2(e, scratch).template data_ptr<scalar_t>(),
                            n, d, h, /*b_transposed=*/true, x.options());  // (n, h) @ (h, d)
      }
    });
    // y_t = Σ_j g_tj (out[pos(t, j)] + b2_e), accumulated in opmath.
    using opmath = at::opmath_type<scalar_t>;
    const auto pos = inverse_order(order, valid, P);
    const int64_t* I = idx.data_ptr<int64_t>();
    const scalar_t* G = gates.data_ptr<scalar_t>();
    const scalar_t* O = out.data_ptr<scalar_t>();
    const scalar_t* B2 = src.all_b2().template data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t b, int64_t end) {
      std::vector<opmath> acc(d);
      for (int64_t t = b; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), opmath(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = t * k + j, r = pos[p];
          if (r < 0) continue;
          const opmath g = static_cast<opmath>(G[p]);
          const scalar_t* o = O + r * d;
          const scalar_t* bb = B2 + I[p] * d;
          for (int64_t c = 0; c < d; ++c)
            acc[c] += g * (static_cast<opmath>(o[c]) + static_cast<opmath>(bb[c]));
        }
        for (int64_t c = 0; c < d; ++c) Y[t * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return {y, hidden, order, offsets};
}

// ------------------------------------------------------------ backward

template <typename Src>
std::tuple<at::Tensor, at::Tensor> experts_backward_impl(
    const char* op, const at::Tensor& grad_y_in, const at::Tensor& indices, const at::Tensor& gates_in,
    const Src& src, int64_t N, int64_t h, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const int64_t T = indices.size(0), d = grad_y_in.size(1), k = indices.size(1), P = T * k;
  const auto& x = grad_y_in;  // dtype and device of the gradients
  const auto grad_y = grad_y_in.contiguous();
  const auto gates = gates_in.contiguous();
  const auto hid = hidden.contiguous();
  check_contiguous(op, "order", order);
  check_contiguous(op, "offsets", offsets);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  check_grouping(op, indices, ord, off, N);
  const int64_t valid = off[N];

  // grad_x is written row by row by the combine pass; only grad_gates needs
  // zeros (for the empty slots).
  auto grad_x = need_grad_x ? at::empty({T, d}, x.options()) : at::empty({0}, x.options());
  auto grad_gates =
      need_grad_gates ? at::zeros({T, k}, gates.options()) : at::empty({0}, gates.options());
  if (valid == 0 || (!need_grad_x && !need_grad_gates)) {
    grad_x.zero_();
    return {grad_x, grad_gates};
  }

  auto xpair = need_grad_x ? at::empty({valid, d}, x.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "some_experts_bwd_cpu", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const scalar_t* G = gates.data_ptr<scalar_t>();
    const scalar_t* B2 = src.all_b2().template data_ptr<scalar_t>();
    scalar_t* GG = need_grad_gates ? grad_gates.data_ptr<scalar_t>() : nullptr;
    for_expert_groups(off, N, [&](int64_t e_begin, int64_t e_end) {
      const int64_t rows = max_rows_in(off, e_begin, e_end);
      auto gy = at::empty({rows, d}, x.options());    // this expert's grad_y rows
      auto dbuf = at::empty({rows, h}, x.options());  // dL/da, then dL/dpre
      std::vector<scalar_t> gate_rows(rows);
      std::vector<opmath> dot_rows(rows);
      typename Src::Scratch scratch(src, x.options());
      scalar_t* gy_p = gy.data_ptr<scalar_t>();
      scalar_t* d_p = dbuf.data_ptr<scalar_t>();
      for (int64_t e = e_begin; e < e_end; ++e) {
        const int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        gather_rows(grad_y.data_ptr<scalar_t>(), gy_p, ord + r0, n, k, d);
        small_gemm::product(d_p, gy_p, src.w2(e, scratch).template data_ptr<scalar_t>(), n, h, d,
                            /*b_transposed=*/false, x.options());  // dL/da (before the gate): (n, d) @ (d, h)
        for (int64_t r = 0; r < n; ++r) gate_rows[r] = G[ord[r0 + r]];
        const scalar_t* pre_p = hid.data_ptr<scalar_t>() + r0 * h;
        at::parallel_for(0, n, 8, [&](int64_t b, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, float>)
            act_kernels().gelu_grad(pre_p + b * h, d_p + b * h, gate_rows.data() + b, dot_rows.data() + b,
                                    end - b, h, need_grad_gates);
          else
            gelu_grad_generic(pre_p + b * h, d_p + b * h, gate_rows.data() + b,
                              dot_rows.data() + b, end - b, h);
        });
        if (need_grad_gates) {
          // dL/dg_tj = dL/dy_t · E_e(x_t) = (dL/da)·GELU(pre) + dL/dy_t · b2_e
          const scalar_t* b2_p = B2 + e * d;
          for (int64_t r = 0; r < n; ++r) {
            opmath acc = dot_rows[r];
            for (int64_t c = 0; c < d; ++c)
              acc += static_cast<opmath>(gy_p[r * d + c]) * static_cast<opmath>(b2_p[c]);
            GG[ord[r0 + r]] = static_cast<scalar_t>(acc);
          }
        }
        if (need_grad_x)
          small_gemm::product(xpair.data_ptr<scalar_t>() + r0 * d, d_p, src.w1(e, scratch).template data_ptr<scalar_t>(),
                              n, d, h, /*b_transposed=*/false, x.options());  // (n, h) @ (h, d)
      }
    });
    if (need_grad_x) {
      const auto pos = inverse_order(order, valid, P);
      const scalar_t* XP = xpair.data_ptr<scalar_t>();
      scalar_t* GX = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, T, 64, [&](int64_t b, int64_t end) {
        std::vector<opmath> acc(d);
        for (int64_t t = b; t < end; ++t) {
          std::fill(acc.begin(), acc.end(), opmath(0));
          for (int64_t j = 0; j < k; ++j) {
            const int64_t r = pos[t * k + j];
            if (r < 0) continue;
            for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<opmath>(XP[r * d + c]);
          }
          for (int64_t c = 0; c < d; ++c) GX[t * d + c] = static_cast<scalar_t>(acc[c]);
        }
      });
    }
  });
  return {grad_x, grad_gates};
}

// ------------------------------------------------------------- the ops

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_cpu(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const char* op = "some.experts";
  check_expert_inputs(op, x, indices, gates, w1, b1, w2, b2);
  return experts_forward(op, x, indices, gates, StoredExperts{w1, b1, w2, b2}, w1.size(0), w1.size(1));
}

std::tuple<at::Tensor, at::Tensor> experts_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& indices, const at::Tensor& gates, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.experts_backward";
  check_experts_backward_inputs(op, grad_y, indices, gates, w1, w2, b2, hidden, order, offsets);
  const at::Tensor unused;
  return experts_backward_impl(op, grad_y, indices, gates, StoredExperts{w1, unused, w2, b2}, w1.size(0),
                               w1.size(1), hidden, order, offsets, need_grad_x, need_grad_gates);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> procedural_experts_cpu(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates, int64_t seed, int64_t layer,
    int64_t num_experts, int64_t d_ffn) {
  const char* op = "some.procedural_experts";
  check_procedural_expert_inputs(op, x, indices, gates, seed, layer, num_experts, d_ffn);
  const auto src = procedural_source(seed, layer, num_experts, x.size(1), d_ffn, x.options());
  return experts_forward(op, x, indices, gates, src, num_experts, d_ffn);
}

std::tuple<at::Tensor, at::Tensor> procedural_experts_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& indices, const at::Tensor& gates, int64_t seed, int64_t layer,
    int64_t num_experts, int64_t d_ffn, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.procedural_experts_backward";
  check_procedural_backward_inputs(op, grad_y, indices, gates, seed, layer, num_experts, d_ffn, hidden, order,
                                   offsets);
  const auto src = procedural_source(seed, layer, num_experts, grad_y.size(1), d_ffn, grad_y.options());
  return experts_backward_impl(op, grad_y, indices, gates, src, num_experts, d_ffn, hidden, order, offsets,
                               need_grad_x, need_grad_gates);
}

// w1 (n, h, d), b1 (n, h), w2 (n, d, h), b2 (n, d) of experts first .. first + n - 1, in place.
void fill_expert_weights_cpu(at::Tensor& w1, at::Tensor& b1, at::Tensor& w2, at::Tensor& b2, int64_t seed,
                             int64_t layer, int64_t first_expert) {
  const char* op = "some.fill_expert_weights";
  check_fill_expert_weights_inputs(op, w1, b1, w2, b2, seed, layer, first_expert);
  const int64_t n = w1.size(0), h = w1.size(1), d = w1.size(2);
  const auto s = static_cast<uint32_t>(seed), l = static_cast<uint32_t>(layer);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const int64_t e = first_expert + i;
      auto w1_e = w1[i], b1_e = b1[i], w2_e = w2[i], b2_e = b2[i];
      generate_tensor(w1_e, s, l, e, philox::kTensorW1, d);
      generate_tensor(b1_e, s, l, e, philox::kTensorB1, d);
      generate_tensor(w2_e, s, l, e, philox::kTensorW2, h);
      generate_tensor(b2_e, s, l, e, philox::kTensorB2, h);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CPU, m) {
  m.impl("experts", &experts_cpu);
  m.impl("experts_backward", &experts_backward_cpu);
  m.impl("procedural_experts", &procedural_experts_cpu);
  m.impl("procedural_experts_backward", &procedural_experts_backward_cpu);
  m.impl("fill_expert_weights", &fill_expert_weights_cpu);
}

}  // namespace some
