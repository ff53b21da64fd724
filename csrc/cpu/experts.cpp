// CPU kernels of some::experts and some::experts_backward (SPEC §3 step 5).
//
// Plan, shared by forward and backward:
//   1. group the (token, slot) pairs by expert with a stable counting sort
//      (`order`, `offsets`); index -1 slots are dropped;
//   2. per expert, gather its rows and run the two GEMMs through BLAS
//      (at::mm_out into slices of one buffer; BLAS threads the GEMM);
//   3. bias + GELU (forward) and GELU' + gate (backward) in one fused
//      vectorized pass per expert, parallel over rows;
//   4. combine per token (parallel over tokens, so no atomics and
//      bit-identical results run to run).
// The experts are frozen: the backward computes dL/dx and dL/dgates only,
// two GEMMs, so forward+backward costs twice the forward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../op_checks.h"
#include "grouping.h"
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
template <typename scalar_t>
void bias_gelu_generic(scalar_t* pre, scalar_t* act, const scalar_t* b1, int64_t rows,
                       int64_t h) {
  using opmath = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < h; ++c) {
      const opmath v = static_cast<opmath>(pre[r * h + c]) + static_cast<opmath>(b1[c]);
      pre[r * h + c] = static_cast<scalar_t>(v);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_cpu(
    const at::Tensor& x_in, const at::Tensor& indices, const at::Tensor& gates_in,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const char* op = "some.experts";
  check_expert_inputs(op, x_in, indices, gates_in, w1, b1, w2, b2);
  const auto x = x_in.contiguous();
  const auto gates = gates_in.contiguous();
  const auto idx = indices.contiguous();  // kept alive: the combine pass reads it
  const int64_t T = x.size(0), d = x.size(1), k = indices.size(1), N = w1.size(0),
                h = w1.size(1), P = T * k;
  auto [order, offsets] = group_by_expert(op, indices, N);
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
      for (int64_t e = e_begin; e < e_end; ++e) {
        const int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        auto xg_e = xg.narrow(0, 0, n);
        auto act_e = act.narrow(0, 0, n);
        auto pre_e = hidden.narrow(0, r0, n);
        auto out_e = out.narrow(0, r0, n);
        gather_rows(x.data_ptr<scalar_t>(), xg_e.data_ptr<scalar_t>(), ord + r0, n, k, d);
        at::mm_out(pre_e, xg_e, w1[e].t());  // (n, d) @ (d, h)
        scalar_t* pre_p = pre_e.data_ptr<scalar_t>();
        scalar_t* act_p = act_e.data_ptr<scalar_t>();
        const scalar_t* b1_p = b1.data_ptr<scalar_t>() + e * h;
        at::parallel_for(0, n, 8, [&](int64_t b, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, float>)
            // (the casts are no-ops: this branch only runs for float)
            act_kernels().bias_gelu(reinterpret_cast<float*>(pre_p + b * h),
                                    reinterpret_cast<float*>(act_p + b * h),
                                    reinterpret_cast<const float*>(b1_p), end - b, h);
          else
            bias_gelu_generic(pre_p + b * h, act_p + b * h, b1_p, end - b, h);
        });
        at::mm_out(out_e, act_e, w2[e].t());  // (n, h) @ (h, d)
      }
    });
    // y_t = Σ_j g_tj (out[pos(t, j)] + b2_e), accumulated in opmath.
    using opmath = at::opmath_type<scalar_t>;
    const auto pos = inverse_order(order, valid, P);
    const int64_t* I = idx.data_ptr<int64_t>();
    const scalar_t* G = gates.data_ptr<scalar_t>();
    const scalar_t* O = out.data_ptr<scalar_t>();
    const scalar_t* B2 = b2.data_ptr<scalar_t>();
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

std::tuple<at::Tensor, at::Tensor> experts_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& indices,
    const at::Tensor& gates_in, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& hidden, const at::Tensor& order, const at::Tensor& offsets,
    bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.experts_backward";
  check_experts_backward_inputs(op, grad_y_in, indices, gates_in, w1, w2, b2, hidden, order, offsets);
  const int64_t T = indices.size(0), d = w1.size(2), k = indices.size(1), N = w1.size(0),
                h = w1.size(1), P = T * k;
  const auto& x = grad_y_in;  // dtype and device of the gradients
  const auto grad_y = grad_y_in.contiguous();
  const auto gates = gates_in.contiguous();
  const auto hid = hidden.contiguous();
  check_contiguous(op, "order", order);
  check_contiguous(op, "offsets", offsets);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t valid = off[N];
  // The grouping comes from the forward; a corrupted one must not read out of bounds.
  bool grouping_ok = off[0] == 0 && valid <= P;
  for (int64_t e = 0; e < N && grouping_ok; ++e) grouping_ok = off[e + 1] >= off[e];
  for (int64_t r = 0; r < valid && grouping_ok; ++r) grouping_ok = ord[r] >= 0 && ord[r] < P;
  TORCH_CHECK_VALUE(grouping_ok, op, ": 'order'/'offsets' are not a valid grouping of the ",
                    P, " (token, slot) pairs; pass the tensors returned by some.experts");

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
    scalar_t* GG = need_grad_gates ? grad_gates.data_ptr<scalar_t>() : nullptr;
    for_expert_groups(off, N, [&](int64_t e_begin, int64_t e_end) {
      const int64_t rows = max_rows_in(off, e_begin, e_end);
      auto gy = at::empty({rows, d}, x.options());    // this expert's grad_y rows
      auto dbuf = at::empty({rows, h}, x.options());  // dL/da, then dL/dpre
      std::vector<scalar_t> gate_rows(rows);
      std::vector<opmath> dot_rows(rows);
      for (int64_t e = e_begin; e < e_end; ++e) {
        const int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        auto gy_e = gy.narrow(0, 0, n);
        auto d_e = dbuf.narrow(0, 0, n);
        gather_rows(grad_y.data_ptr<scalar_t>(), gy_e.data_ptr<scalar_t>(), ord + r0, n, k, d);
        at::mm_out(d_e, gy_e, w2[e]);  // dL/da (before the gate): (n, d) @ (d, h)
        for (int64_t r = 0; r < n; ++r) gate_rows[r] = G[ord[r0 + r]];
        const scalar_t* pre_p = hid.data_ptr<scalar_t>() + r0 * h;
        scalar_t* d_p = d_e.data_ptr<scalar_t>();
        at::parallel_for(0, n, 8, [&](int64_t b, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, float>)
            act_kernels().gelu_grad(reinterpret_cast<const float*>(pre_p + b * h),
                                    reinterpret_cast<float*>(d_p + b * h),
                                    reinterpret_cast<const float*>(gate_rows.data() + b),
                                    reinterpret_cast<float*>(dot_rows.data() + b), end - b, h,
                                    need_grad_gates);
          else
            gelu_grad_generic(pre_p + b * h, d_p + b * h, gate_rows.data() + b,
                              dot_rows.data() + b, end - b, h);
        });
        if (need_grad_gates) {
          // dL/dg_tj = dL/dy_t · E_e(x_t) = (dL/da)·GELU(pre) + dL/dy_t · b2_e
          const scalar_t* gy_p = gy_e.data_ptr<scalar_t>();
          const scalar_t* b2_p = b2.data_ptr<scalar_t>() + e * d;
          for (int64_t r = 0; r < n; ++r) {
            opmath acc = dot_rows[r];
            for (int64_t c = 0; c < d; ++c)
              acc += static_cast<opmath>(gy_p[r * d + c]) * static_cast<opmath>(b2_p[c]);
            GG[ord[r0 + r]] = static_cast<scalar_t>(acc);
          }
        }
        if (need_grad_x) {
          auto xpair_e = xpair.narrow(0, r0, n);
          at::mm_out(xpair_e, d_e, w1[e]);  // (n, h) @ (h, d)
        }
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

}  // namespace

TORCH_LIBRARY_IMPL(some, CPU, m) {
  m.impl("experts", &experts_cpu);
  m.impl("experts_backward", &experts_backward_cpu);
}

}  // namespace some
