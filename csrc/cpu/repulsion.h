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
// interpolation needs, and only those buckets are kept and partially sorted; the
// second pass also adds the repulsion of every pair already known to lie under θ
// (see push_sums). The repulsion sums visit only the pairs under θ (theta_percentile of them),
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

// Calls fn(thread, i) for rows i in [0, n), rows i and n − 1 − i on the same thread: the
// rows of a diagonal tile shrink from a full row of pairs to none, and the threads of a
// static split would wait for the one holding the long rows.
template <typename Fn>
void for_balanced_rows(int64_t n, const Fn& fn) {
  at::parallel_for(0, (n + 1) / 2, 1, [&](int64_t h0, int64_t h1) {
    const int tid = at::get_thread_num();
    for (int64_t h = h0; h < h1; ++h) {
      fn(tid, h);
      if (n - 1 - h != h) fn(tid, n - 1 - h);  // (the middle row of an odd count once)
    }
  });
}

template <typename scalar_t>
class Distances {
 public:
  explicit Distances(const at::Tensor& keys) : K_(keys), N_(keys.size(0)), d_(keys.size(1)) {
    const int64_t budget = block_bytes();
    const int64_t cells = std::max<int64_t>(budget / static_cast<int64_t>(sizeof(scalar_t)), 1);
    side_ = std::clamp<int64_t>(static_cast<int64_t>(std::sqrt(static_cast<double>(cells))), 1, N_);
    const int64_t grid = (N_ + side_ - 1) / side_;
    for (int64_t a = 0; a < grid; ++a)
      for (int64_t b = a; b < grid; ++b) tiles_.push_back({a * side_, b * side_});
    cache_ = N_ * N_ * static_cast<int64_t>(sizeof(scalar_t)) <= 8 * budget;
    if (cache_) cached_.resize(tiles_.size());
    sq_ = (K_ * K_).sum(1).contiguous();
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
    at::Tensor D = at::mm(K_.narrow(0, tl.r0, nr), K_.narrow(0, tl.c0, nc).t()).contiguous();  // Gram
    scalar_t* out = D.data_ptr<scalar_t>();
    const scalar_t* k = K_.data_ptr<scalar_t>();
    const scalar_t* sq = sq_.data_ptr<scalar_t>();
    const scalar_t near = static_cast<scalar_t>(kNearFraction);
    // one pass per row, written so that the compiler vectorizes its loops (keystore.cpp
    // is built with -fno-math-errno for the square roots)
    for_balanced_rows(nr, [&](int, int64_t i) {
      const int64_t e = tl.r0 + i, j0 = first_col(tl, i);
      scalar_t* row = out + i * nc;
      const scalar_t* sq_f = sq + tl.c0;
      const scalar_t sq_e = sq[e];
      for (int64_t j = j0; j < nc; ++j) row[j] = sq_e + sq_f[j] - scalar_t(2) * row[j];
      for (int64_t j = j0; j < nc; ++j) {  // cancellation: those pairs from their difference
        if (!(row[j] < near * (sq_e + sq_f[j]))) continue;
        const scalar_t* ke = k + e * d_;
        const scalar_t* kf = k + (tl.c0 + j) * d_;
        scalar_t d2 = 0;
        for (int64_t c = 0; c < d_; ++c) d2 += (ke[c] - kf[c]) * (ke[c] - kf[c]);
        row[j] = d2;
      }
      for (int64_t j = j0; j < nc; ++j) row[j] = std::sqrt(row[j] > scalar_t(0) ? row[j] : scalar_t(0));
    });
    if (cache_) cached_[t] = D;
    return D;
  }

 private:
  at::Tensor K_;
  int64_t N_, d_, side_ = 1;
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
  for_balanced_rows(nr, [&](int tid, int64_t i) {
    for (int64_t j = dist.first_col(tl, i); j < nc; ++j) visit(tid, tl.r0 + i, tl.c0 + j, rows[i * nc + j]);
  });
}

// push (N, d): Σ_{f ≠ e, D_ef < θ} (K_e − K_f) / max(D_ef, 1e-8); close (N): how many such f.
//
// Two passes over the tiles. The first builds a histogram of the distances'
// buckets, which locates the buckets of the two ranks θ interpolates between.
// The second already knows every pair outside a narrow band of buckets around
// them: below it a pair is closer than θ whatever θ turns out to be (its
// repulsion term is added at once), above it it is not; the pairs inside the
// band are kept, θ is selected among their distances, and then their terms are
// added. (The band is one bucket wider on each side than the two ranks' buckets:
// θ, a rounded interpolation, may fall an ulp outside [D_lo, D_hi].)
//
// A close pair adds its exact difference to its row key (owned by the thread that
// visits the row) and subtracts it from its column key in that thread's buffer of
// the tile's columns, summed after each tile: no races, no N × N weights.
template <typename scalar_t>
void push_sums(const at::Tensor& keys, double theta_percentile, at::Tensor& push, std::vector<int64_t>& close) {
  using B = Buckets<scalar_t>;
  const int64_t N = keys.size(0), d = keys.size(1);
  const int64_t M = N * (N - 1) / 2;
  const double rank = theta_percentile * static_cast<double>(M - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(rank));
  const int64_t hi = std::min<int64_t>(lo + 1, M - 1);
  Distances<scalar_t> dist(keys);
  const int threads = at::get_num_threads();

  // Pass 1: histogram of the buckets (one per thread, summed after).
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
  int64_t first = -1, last = -1;  // buckets of ranks lo and hi
  for (int64_t j = 0, seen = 0; j < B::kCount && last < 0; ++j) {
    if (first < 0 && seen + hist[j] > lo) first = j;
    if (seen + hist[j] > hi) last = j;
    seen += hist[j];
  }
  TORCH_INTERNAL_ASSERT(first >= 0 && last >= first, "some.keystore_update: distance histogram");
  const int64_t band_lo = std::max<int64_t>(first - 1, 0), band_hi = std::min<int64_t>(last + 1, B::kCount - 1);
  int64_t below = 0, in_band = 0;
  for (int64_t j = 0; j < band_lo; ++j) below += hist[j];
  for (int64_t j = band_lo; j <= band_hi; ++j) in_band += hist[j];

  // Pass 2: the sure pairs' terms, and the band kept.
  push = at::zeros({N, d}, keys.options());
  close.assign(N, 0);
  scalar_t* P = push.data_ptr<scalar_t>();
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t eps = static_cast<scalar_t>(kRepulsionEps);
  struct Pair {
    int64_t e, f;
    scalar_t D;
  };
  std::vector<std::vector<Pair>> band(threads);
  std::vector<std::vector<scalar_t>> col_push(threads);
  std::vector<std::vector<int64_t>> col_close(threads);
  auto add_term = [&](scalar_t* pe, scalar_t* pf, int64_t e, int64_t f, scalar_t Dv) {
    const scalar_t inv = scalar_t(1) / std::max(Dv, eps);
    const scalar_t* ke = k + e * d;
    const scalar_t* kf = k + f * d;
    for (int64_t c = 0; c < d; ++c) {
      const scalar_t term = (ke[c] - kf[c]) * inv;
      pe[c] += term;
      pf[c] -= term;
    }
  };
  for (int64_t t = 0; t < dist.tiles(); ++t) {
    const auto& tl = dist.tile(t);
    const int64_t nc = dist.extent(tl.c0);
    for (auto& v : col_push) v.clear();
    for (auto& v : col_close) v.clear();
    for_each_pair(dist, t, [&](int tid, int64_t e, int64_t f, scalar_t Dv) {
      const int64_t j = B::of(Dv);
      if (j > band_hi) return;
      if (j >= band_lo) {
        band[tid].push_back({e, f, Dv});
        return;
      }
      auto& cp = col_push[tid];
      auto& cc = col_close[tid];
      if (cc.empty()) {
        cp.assign(nc * d, scalar_t(0));
        cc.assign(nc, 0);
      }
      add_term(P + e * d, cp.data() + (f - tl.c0) * d, e, f, Dv);
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

  // θ among the band's distances (ranks lo and hi lie in it), then the band's close pairs.
  std::vector<scalar_t> v;
  v.reserve(in_band);
  for (const auto& part : band)
    for (const auto& p : part) v.push_back(p.D);
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(v.size()) == in_band,
                        "some.keystore_update: the distances changed between the two passes");
  const int64_t at_lo = lo - below;
  std::nth_element(v.begin(), v.begin() + at_lo, v.end());
  const scalar_t v_lo = v[at_lo];
  const scalar_t v_hi = hi == lo ? v_lo : *std::min_element(v.begin() + at_lo + 1, v.end());
  const scalar_t th = lerp<scalar_t>(v_lo, v_hi, static_cast<scalar_t>(rank - static_cast<double>(lo)));
  for (const auto& part : band)
    for (const auto& p : part) {
      if (!(p.D < th)) continue;
      add_term(P + p.e * d, P + p.f * d, p.e, p.f, p.D);
      ++close[p.e];
      ++close[p.f];
    }
}

}  // namespace repulsion
}  // namespace some
