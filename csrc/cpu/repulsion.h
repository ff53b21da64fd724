// The repulsion term of the key-store update on the CPU (docs/method.md §4),
// at matrix-product speed and in O(tile) memory:
//
//   θ  = the theta_percentile quantile (linear interpolation) of {D_ef : e < f}
//   r_e = mean over f ≠ e with D_ef < θ of (K_e − K_f) / max(D_ef, 1e-8)
//
// Distances come in square tiles of the upper triangle (e < f), one product per
// tile, D² = |K_e|² + |K_f|² − 2 K_e·K_f; every pair is computed once and serves
// both its keys, so D is symmetric by construction (a row-block product would
// compute D_ef and D_fe separately, and at θ equal to a distance — the 0th or
// 100th percentile, a single pair — the two could fall on either side of it).
// Pairs the product cannot resolve (D² below kNearFraction of |K_e|² + |K_f|²,
// where its cancellation error is no longer small against D²) are recomputed from
// their differences, so a nearly coincident pair keeps an exact distance.
//
// θ is an exact selection in two passes over the tiles: a histogram of the
// distances' leading bits finds the buckets that hold the two ranks the
// interpolation needs, and only those buckets are kept and partially sorted.
// The repulsion sums visit only the pairs under θ (theta_percentile of them),
// each from its exact difference K_e − K_f: a dense product W·K over all pairs
// would cost N²·d whatever θ, and lose every digit of a nearly coincident
// pair's difference to the cancellation of (Σ w) K_e − Σ w K_f.
//
// The tiles are kept between passes when all N² distances take at most
// 8 × the tile budget, and recomputed otherwise. The budget is
// SOME_KEYSTORE_BLOCK_BYTES (default 8 MiB), a knob for tests and benchmarks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace some {
namespace repulsion {

constexpr double kRepulsionEps = 1e-8;  // max(D, 1e-8) in the repulsion term
constexpr double kNearFraction = 1e-2;  // D² below this share of |K_e|² + |K_f|²: recompute
constexpr int64_t kDefaultBlockBytes = int64_t(8) << 20;
constexpr int kKeptMantissaBits = 7;  // histogram resolution: 1/128 of an octave

inline int64_t block_bytes() {
  if (const char* env = std::getenv("SOME_KEYSTORE_BLOCK_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return kDefaultBlockBytes;
}

// Order-preserving bucket of a non-negative float: its leading bits.
template <typename scalar_t>
struct Buckets {
  using Bits = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  static constexpr int kMantissa = sizeof(scalar_t) == 4 ? 23 : 52;
  static constexpr int kShift = kMantissa - kKeptMantissaBits;
  static constexpr int64_t kCount = static_cast<int64_t>((~Bits(0) >> 1) >> kShift) + 1;
  static int64_t of(scalar_t v) {
    Bits b;
    std::memcpy(&b, &v, sizeof b);
    return static_cast<int64_t>((b & (~Bits(0) >> 1)) >> kShift);  // −0 counts as +0
  }
};

template <typename scalar_t>
class Distances {
 public:
  explicit Distances(const at::Tensor& keys) : K_(keys), N_(keys.size(0)), d_(keys.size(1)) {
    const int64_t budget = block_bytes();
    const int64_t cells = std::max<int64_t>(budget / static_cast<int64_t>(sizeof(scalar_t)), 1);
    side_ = std::clamp<int64_t>(static_cast<int64_t>(std::sqrt(static_cast<double>(cells))), 1, N_);
    grid_ = (N_ + side_ - 1) / side_;
    for (int64_t a = 0; a < grid_; ++a)
      for (int64_t b = a; b < grid_; ++b) tiles_.push_back({a * side_, b * side_});
    cache_ = N_ * N_ * static_cast<int64_t>(sizeof(scalar_t)) <= 8 * budget;
    if (cache_) cached_.resize(tiles_.size());
    sq_ = (K_ * K_).sum(1);
  }

  struct Tile {
    int64_t r0, c0;  // first row (key e) and first column (key f); r0 <= c0
  };
  int64_t tiles() const { return static_cast<int64_t>(tiles_.size()); }
  const Tile& tile(int64_t t) const { return tiles_[t]; }
  int64_t extent(int64_t first) const { return std::min(side_, N_ - first); }
  // the tile's pairs with e < f: in a diagonal tile, columns after the row's own
  int64_t first_col(const Tile& t, int64_t i) const { return t.r0 == t.c0 ? i + 1 : 0; }

  // D of tile t: (extent(r0), extent(c0)), contiguous; only its e < f entries are meaningful.
  at::Tensor distances(int64_t t) {
    if (cache_ && cached_[t].defined()) return cached_[t];
    const Tile& tl = tiles_[t];
    const int64_t nr = extent(tl.r0), nc = extent(tl.c0);
    // scale = |K_e|² + |K_f|², then D² = scale − 2 K_rows K_colsᵀ in one product
    const at::Tensor scale = sq_.narrow(0, tl.r0, nr).unsqueeze(1) + sq_.narrow(0, tl.c0, nc).unsqueeze(0);
    at::Tensor D = at::addmm(scale, K_.narrow(0, tl.r0, nr), K_.narrow(0, tl.c0, nc).t(), 1, -2).contiguous();
    // cancellation: the pairs under kNearFraction of their scale, from the difference
    const at::Tensor near = at::nonzero(D.lt(scale * kNearFraction));
    const int64_t n_near = near.size(0);
    if (n_near > 0) {
      const int64_t* ij = near.data_ptr<int64_t>();
      scalar_t* out = D.data_ptr<scalar_t>();
      const scalar_t* k = K_.data_ptr<scalar_t>();
      at::parallel_for(0, n_near, 64, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t i = ij[2 * p], j = ij[2 * p + 1], e = tl.r0 + i, f = tl.c0 + j;
          if (f <= e) continue;  // not a pair of this tile
          scalar_t d2 = 0;
          for (int64_t c = 0; c < d_; ++c) {
            const scalar_t diff = k[e * d_ + c] - k[f * d_ + c];
            d2 += diff * diff;
          }
          out[i * nc + j] = d2;
        }
      });
    }
    D.clamp_min_(0).sqrt_();
    if (cache_) cached_[t] = D;
    return D;
  }

 private:
  at::Tensor K_;
  int64_t N_, d_, side_ = 1, grid_ = 0;
  std::vector<Tile> tiles_;
  bool cache_ = false;
  std::vector<at::Tensor> cached_;
  at::Tensor sq_;  // |K_e|²
};

// torch.lerp's two-sided formula, for the same rounding as torch.quantile.
template <typename scalar_t>
scalar_t lerp(scalar_t below, scalar_t above, scalar_t w) {
  return w < scalar_t(0.5) ? below + w * (above - below) : above - (above - below) * (scalar_t(1) - w);
}

// Calls visit(thread, e, f, D_ef) for every pair e < f of tile t, rows split over threads.
template <typename scalar_t, typename Visit>
void for_each_pair(Distances<scalar_t>& dist, int64_t t, const Visit& visit) {
  const at::Tensor D = dist.distances(t);
  const auto& tl = dist.tile(t);
  const int64_t nr = dist.extent(tl.r0), nc = dist.extent(tl.c0);
  const scalar_t* rows = D.data_ptr<scalar_t>();
  at::parallel_for(0, nr, 1, [&](int64_t i0, int64_t i1) {
    const int tid = at::get_thread_num();
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = dist.first_col(tl, i); j < nc; ++j) visit(tid, tl.r0 + i, tl.c0 + j, rows[i * nc + j]);
  });
}

// θ: the q-quantile of the upper-triangle distances, exact, two passes.
template <typename scalar_t>
scalar_t theta(Distances<scalar_t>& dist, int64_t N, double q) {
  using B = Buckets<scalar_t>;
  const int64_t M = N * (N - 1) / 2;
  const double rank = q * static_cast<double>(M - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(rank));
  const int64_t hi = std::min<int64_t>(lo + 1, M - 1);

  // Pass 1: histogram of the buckets (one per thread, summed after).
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local(threads);
  for (int64_t t = 0; t < dist.tiles(); ++t)
    for_each_pair(dist, t, [&](int tid, int64_t, int64_t, scalar_t v) {
      auto& h = local[tid];
      if (h.empty()) h.assign(B::kCount, 0);
      ++h[B::of(v)];
    });
  std::vector<int64_t> hist(B::kCount, 0);
  for (const auto& h : local)
    if (!h.empty())
      for (int64_t j = 0; j < B::kCount; ++j) hist[j] += h[j];
  // buckets of ranks lo and hi, and how many values lie below the first
  int64_t below = 0, first = -1, last = -1;
  for (int64_t j = 0, seen = 0; j < B::kCount; ++j) {
    if (first < 0 && seen + hist[j] > lo) {
      first = j;
      below = seen;
    }
    if (seen + hist[j] > hi) {
      last = j;
      break;
    }
    seen += hist[j];
  }
  TORCH_INTERNAL_ASSERT(first >= 0 && last >= first, "some.keystore_update: distance histogram");
  int64_t expected = 0;
  for (int64_t j = first; j <= last; ++j) expected += hist[j];

  // Pass 2: the values in buckets first..last, then a partial sort of those only.
  std::vector<std::vector<scalar_t>> kept(threads);
  for (int64_t t = 0; t < dist.tiles(); ++t)
    for_each_pair(dist, t, [&](int tid, int64_t, int64_t, scalar_t v) {
      const int64_t j = B::of(v);
      if (j >= first && j <= last) kept[tid].push_back(v);
    });
  std::vector<scalar_t> v;
  v.reserve(expected);
  for (const auto& part : kept) v.insert(v.end(), part.begin(), part.end());
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(v.size()) == expected,
                        "some.keystore_update: the distances changed between the two passes");
  const int64_t at_lo = lo - below;
  std::nth_element(v.begin(), v.begin() + at_lo, v.end());
  const scalar_t v_lo = v[at_lo];
  const scalar_t v_hi = hi == lo ? v_lo : *std::min_element(v.begin() + at_lo + 1, v.end());
  return lerp<scalar_t>(v_lo, v_hi, static_cast<scalar_t>(rank - static_cast<double>(lo)));
}

// push (N, d): Σ_{f ≠ e, D_ef < θ} (K_e − K_f) / max(D_ef, 1e-8); close (N): how many such f.
// Each close pair of a tile adds its exact difference to its row key (owned by the
// thread that visits the row) and subtracts it from its column key in that thread's
// buffer of the tile's columns, summed after: no races, no N × N weights.
template <typename scalar_t>
void push_sums(const at::Tensor& keys, double theta_percentile, at::Tensor& push, std::vector<int64_t>& close) {
  const int64_t N = keys.size(0), d = keys.size(1);
  Distances<scalar_t> dist(keys);
  const scalar_t th = theta<scalar_t>(dist, N, theta_percentile);
  push = at::zeros({N, d}, keys.options());
  close.assign(N, 0);
  scalar_t* P = push.data_ptr<scalar_t>();
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t eps = static_cast<scalar_t>(kRepulsionEps);
  const int threads = at::get_num_threads();
  std::vector<std::vector<scalar_t>> col_push(threads);
  std::vector<std::vector<int64_t>> col_close(threads);
  for (int64_t t = 0; t < dist.tiles(); ++t) {
    const auto& tl = dist.tile(t);
    const int64_t nc = dist.extent(tl.c0);
    for (auto& v : col_push) v.clear();
    for (auto& v : col_close) v.clear();
    for_each_pair(dist, t, [&](int tid, int64_t e, int64_t f, scalar_t Dv) {
      if (!(Dv < th)) return;
      auto& cp = col_push[tid];
      auto& cc = col_close[tid];
      if (cc.empty()) {
        cp.assign(nc * d, scalar_t(0));
        cc.assign(nc, 0);
      }
      const scalar_t inv = scalar_t(1) / std::max(Dv, eps);
      scalar_t* pe = P + e * d;
      scalar_t* pf = cp.data() + (f - tl.c0) * d;
      const scalar_t* ke = k + e * d;
      const scalar_t* kf = k + f * d;
      for (int64_t c = 0; c < d; ++c) {
        const scalar_t term = (ke[c] - kf[c]) * inv;
        pe[c] += term;
        pf[c] -= term;
      }
      ++close[e];  // row e belongs to this thread
      ++cc[f - tl.c0];
    });
    for (int tid = 0; tid < threads; ++tid) {
      if (col_close[tid].empty()) continue;
      const auto& cp = col_push[tid];
      for (int64_t j = 0; j < nc; ++j) {
        close[tl.c0 + j] += col_close[tid][j];
        scalar_t* pf = P + (tl.c0 + j) * d;
        for (int64_t c = 0; c < d; ++c) pf[c] += cp[j * d + c];
      }
    }
  }
}

}  // namespace repulsion
}  // namespace some
