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
// θ is an exact selection. With many pairs (kSampledMinPairs and up) it takes one
// pass over the tiles: a sample of pairs brackets the two ranks the interpolation
// needs between bounds [a, b]; the pass adds the repulsion of every pair under a
// at once, keeps the pairs in [a, b] and only counts the rest; θ is then selected
// among the kept pairs. Whether the bounds held is checked from the exact counts,
// and if they did not (a rare sample), the update falls back to the two-pass
// selection that small stores always use: a histogram of the distances' leading
// bits finds the buckets that hold the two ranks, and only those buckets are kept
// and partially sorted (see push_sums). The repulsion sums visit only the pairs under θ (theta_percentile of them),
// each from its exact difference K_e − K_f: a dense product W·K over all pairs
// would cost N²·d whatever θ, and lose every digit of a nearly coincident
// pair's difference to the cancellation of (Σ w) K_e − Σ w K_f.
//
// The two-pass selection keeps the tiles between its passes when all N² distances
// take at most 8 × the tile budget, and recomputes them otherwise. The budget is
// SOME_KEYSTORE_BLOCK_BYTES (default 8 MiB) and the pair count from which the
// sampled selection is used SOME_KEYSTORE_SAMPLED_MIN_PAIRS: knobs for tests and
// benchmarks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace some {
namespace repulsion {

constexpr double kRepulsionEps = 1e-8;  // max(D, 1e-8) in the repulsion term
constexpr double kNearFraction = 1e-2;  // D² below this share of |K_e|² + |K_f|²: recompute
constexpr int64_t kDefaultBlockBytes = int64_t(8) << 20;
constexpr int64_t kStreamTileBytes = int64_t(1) << 20;  // 512 × 512 float32
constexpr int kKeptMantissaBits = 7;  // histogram resolution: 1/128 of an octave
// From this many pairs (N ≈ 725) θ is selected in one pass from sampled bounds: below it
// the two-pass selection costs little, and small stores keep the sums in the order they
// always had (runs of the small presets reproduce bit for bit).
constexpr int64_t kSampledMinPairs = int64_t(1) << 18;

inline int64_t env_positive(const char* name, int64_t fallback) {
  if (const char* env = std::getenv(name)) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return fallback;
}

// How many standard errors of the sample quantile the sampled bounds are widened by; a
// negative count narrows them past the ranks, which tests use to force the fallback.
inline double sample_sigmas() {
  const char* env = std::getenv("SOME_KEYSTORE_SAMPLE_SIGMAS");
  const double v = env ? std::atof(env) : 6.0;
  return std::isfinite(v) ? v : 6.0;
}

// How many updates took the sampled one-pass selection, and how many of those fell back
// (some._C.keystore_selection_counts(): the tests check which path ran).
inline std::atomic<int64_t> sampled_passes{0};
inline std::atomic<int64_t> sampled_fallbacks{0};

inline int64_t block_bytes() { return env_positive("SOME_KEYSTORE_BLOCK_BYTES", kDefaultBlockBytes); }
inline int64_t sampled_min_pairs() { return env_positive("SOME_KEYSTORE_SAMPLED_MIN_PAIRS", kSampledMinPairs); }

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
  // tile_bytes: the tiles' size; keep: cache the tiles for a second pass (when all of them fit
  // in 8 budgets). The same keys must always get the same tiles whichever selection runs: the
  // products' bits may depend on their shapes.
  Distances(const at::Tensor& keys, int64_t tile_bytes, bool keep) : K_(keys), N_(keys.size(0)), d_(keys.size(1)) {
    const int64_t cells = std::max<int64_t>(tile_bytes / static_cast<int64_t>(sizeof(scalar_t)), 1);
    side_ = std::clamp<int64_t>(static_cast<int64_t>(std::sqrt(static_cast<double>(cells))), 1, N_);
    const int64_t grid = (N_ + side_ - 1) / side_;
    for (int64_t a = 0; a < grid; ++a)
      for (int64_t b = a; b < grid; ++b) tiles_.push_back({a * side_, b * side_});
    cache_ = keep && N_ * N_ * static_cast<int64_t>(sizeof(scalar_t)) <= 8 * block_bytes();
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

template <typename scalar_t>
struct Pair {
  int64_t e, f;
  scalar_t D;
};
template <typename scalar_t>
using Band = std::vector<std::vector<Pair<scalar_t>>>;  // one list per thread

// The running sums of push_sums: push (N, d) and close (N).
template <typename scalar_t>
struct Sums {
  const scalar_t* k;
  int64_t d;
  scalar_t* P;
  std::vector<int64_t>& close;

  // The exact difference of pair (e, f), over max(D, 1e-8), added to pe and taken from pf.
  // (e != f, so the four rows never overlap: __restrict lets the loop vectorize)
  void add_term(scalar_t* __restrict pe, scalar_t* __restrict pf, int64_t e, int64_t f, scalar_t Dv) const {
    const scalar_t inv = scalar_t(1) / std::max(Dv, static_cast<scalar_t>(kRepulsionEps));
    const scalar_t* __restrict ke = k + e * d;
    const scalar_t* __restrict kf = k + f * d;
    for (int64_t c = 0; c < d; ++c) {
      const scalar_t term = (ke[c] - kf[c]) * inv;
      pe[c] += term;
      pf[c] -= term;
    }
  }
};

// One pass over the tiles. `where(D)` sorts each pair: kSure (closer than θ whatever θ
// turns out to be: its term is added at once), kBand (kept in `band` for after the
// selection) or kFar (not closer than θ). A sure pair adds its exact difference to its
// row key (owned by the thread that visits the row) and subtracts it from its column key
// in that thread's buffer of the tile's columns, summed after each tile: no races, no
// N × N weights. Returns how many pairs were sure and how many kept.
enum Where { kSure, kBand, kFar };
struct Split {
  int64_t sure = 0, kept = 0;
};
template <typename scalar_t>
struct alignas(64) ThreadPart {  // one cache line apart: threads never write a shared line
  std::vector<Pair<scalar_t>> band;
  std::vector<scalar_t> col_push;
  std::vector<int64_t> col_close;
  int64_t sure = 0;
};
template <typename scalar_t, typename Classify>
Split add_sure_keep_band(Distances<scalar_t>& dist, const Classify& where, const Sums<scalar_t>& sums,
                         Band<scalar_t>& band) {
  const int threads = at::get_num_threads();
  const int64_t d = sums.d;
  std::vector<ThreadPart<scalar_t>> part(threads);
  for (int64_t t = 0; t < dist.tiles(); ++t) {
    const auto& tl = dist.tile(t);
    const int64_t nc = dist.extent(tl.c0);
    for (auto& p : part) p.col_push.clear(), p.col_close.clear();
    for_each_pair(dist, t, [&](int tid, int64_t e, int64_t f, scalar_t Dv) {
      const Where w = where(Dv);
      if (w == kFar) return;
      auto& mine = part[tid];
      if (w == kBand) {
        mine.band.push_back({e, f, Dv});
        return;
      }
      if (mine.col_close.empty()) {
        mine.col_push.assign(nc * d, scalar_t(0));
        mine.col_close.assign(nc, 0);
      }
      sums.add_term(sums.P + e * d, mine.col_push.data() + (f - tl.c0) * d, e, f, Dv);
      ++sums.close[e];  // row e belongs to this thread
      ++mine.col_close[f - tl.c0];
      ++mine.sure;
    });
    for (const auto& p : part) {
      if (p.col_close.empty()) continue;
      for (int64_t j = 0; j < nc; ++j) {
        sums.close[tl.c0 + j] += p.col_close[j];
        scalar_t* pf = sums.P + (tl.c0 + j) * d;
        for (int64_t c = 0; c < d; ++c) pf[c] += p.col_push[j * d + c];
      }
    }
  }
  band.clear();
  Split split;
  for (auto& p : part) {
    split.sure += p.sure;
    split.kept += static_cast<int64_t>(p.band.size());
    band.push_back(std::move(p.band));
  }
  return split;
}

// θ: the value at `rank` (linear interpolation between ranks lo and hi) of all pairs,
// given that `below` pairs lie under every kept one and that ranks lo and hi are kept.
template <typename scalar_t>
scalar_t select_theta(const Band<scalar_t>& band, double rank, int64_t lo, int64_t hi, int64_t below) {
  std::vector<scalar_t> v;
  for (const auto& part : band)
    for (const auto& p : part) v.push_back(p.D);
  const int64_t at_lo = lo - below;
  std::nth_element(v.begin(), v.begin() + at_lo, v.end());
  const scalar_t v_lo = v[at_lo];
  const scalar_t v_hi = hi == lo ? v_lo : *std::min_element(v.begin() + at_lo + 1, v.end());
  return lerp<scalar_t>(v_lo, v_hi, static_cast<scalar_t>(rank - static_cast<double>(lo)));
}

// The kept pairs closer than θ, in their order: one thread, so the sums do not depend on
// the thread count beyond the order of the lists.
template <typename scalar_t>
void add_band(const Band<scalar_t>& band, scalar_t th, const Sums<scalar_t>& sums) {
  for (const auto& part : band)
    for (const auto& p : part) {
      if (!(p.D < th)) continue;
      sums.add_term(sums.P + p.e * sums.d, sums.P + p.f * sums.d, p.e, p.f, p.D);
      ++sums.close[p.e];
      ++sums.close[p.f];
    }
}

// Bounds a <= D(rank lo) and D(rank hi) <= b from a sample of pairs (a fixed draw, so the
// update is deterministic), widened by six standard errors of the sample quantile
// (sample_sigmas) and by 1e-3 of the value (the sample's distances are taken from differences, the tiles' from
// products). The pass that uses them checks that they held.
template <typename scalar_t>
std::pair<scalar_t, scalar_t> sampled_bounds(const at::Tensor& keys, int64_t lo, int64_t hi, int64_t M) {
  const int64_t N = keys.size(0), d = keys.size(1);
  const int64_t S = std::min<int64_t>(M, std::clamp<int64_t>(16 * static_cast<int64_t>(std::sqrt(double(M))),
                                                             int64_t(1) << 14, int64_t(1) << 18));
  const scalar_t* k = keys.data_ptr<scalar_t>();
  std::vector<scalar_t> sample(S);
  at::parallel_for(0, S, 1024, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      uint64_t x = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);  // splitmix64 of i
      x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
      x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
      x ^= x >> 31;
      const int64_t e = static_cast<int64_t>((x >> 32) % static_cast<uint64_t>(N));
      int64_t f = static_cast<int64_t>((x & 0xFFFFFFFFull) % static_cast<uint64_t>(N - 1));
      f += f >= e;
      const scalar_t* ke = k + e * d;
      const scalar_t* kf = k + f * d;
      scalar_t d2 = 0;  // (in the keys' precision: the bounds are widened far beyond its error)
      for (int64_t c = 0; c < d; ++c) d2 += (ke[c] - kf[c]) * (ke[c] - kf[c]);
      sample[i] = std::sqrt(d2);
    }
  });
  const double q_lo = static_cast<double>(lo) / static_cast<double>(M);
  const double q_hi = static_cast<double>(hi + 1) / static_cast<double>(M);
  const double sigmas = sample_sigmas();
  auto margin = [&](double q) {
    return sigmas * std::sqrt(std::max(q * (1 - q), 1.0 / S) / S) + (sigmas < 0 ? -1.0 : 1.0) / S;
  };
  const int64_t ia = static_cast<int64_t>(std::floor((q_lo - margin(q_lo)) * S)) - 1;
  const int64_t ib = static_cast<int64_t>(std::ceil((q_hi + margin(q_hi)) * S));
  // the two order statistics of the sample, without sorting it
  auto order_stat = [&](int64_t i) {
    std::nth_element(sample.begin(), sample.begin() + i, sample.end());
    return static_cast<double>(sample[i]);
  };
  const double widen = sigmas < 0 ? -1e-3 : 1e-3;
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  const scalar_t a = ia < 0 ? -inf : static_cast<scalar_t>(order_stat(std::min(ia, S - 1)) * (1 - widen));
  const scalar_t b = ib >= S ? inf : static_cast<scalar_t>(order_stat(std::max<int64_t>(ib, 0)) * (1 + widen));
  return {a, b};
}

// push (N, d): Σ_{f ≠ e, D_ef < θ} (K_e − K_f) / max(D_ef, 1e-8); close (N): how many such f.
template <typename scalar_t>
void push_sums(const at::Tensor& keys, double theta_percentile, at::Tensor& push, std::vector<int64_t>& close) {
  using B = Buckets<scalar_t>;
  const int64_t N = keys.size(0), d = keys.size(1);
  const int64_t M = N * (N - 1) / 2;
  const double rank = theta_percentile * static_cast<double>(M - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(rank));
  const int64_t hi = std::min<int64_t>(lo + 1, M - 1);
  push = at::zeros({N, d}, keys.options());
  close.assign(N, 0);
  const Sums<scalar_t> sums{keys.data_ptr<scalar_t>(), d, push.data_ptr<scalar_t>(), close};
  Band<scalar_t> band;

  // From kSampledMinPairs on, one pass streams each tile once: tiles that stay in the core's
  // cache while their rows are finished and scanned (and its fallback takes the same tiles).
  const bool sampled = M >= sampled_min_pairs();
  const int64_t tile_bytes = sampled ? std::min(block_bytes(), kStreamTileBytes) : block_bytes();
  if (sampled) {  // one pass between sampled bounds
    ++sampled_passes;
    const auto [a, b] = sampled_bounds<scalar_t>(keys, lo, hi, M);
    Distances<scalar_t> dist(keys, tile_bytes, /*keep=*/false);
    const Split split = add_sure_keep_band(
        dist, [a = a, b = b](scalar_t v) { return v < a ? kSure : (v > b ? kFar : kBand); }, sums, band);
    const int64_t below = split.sure;
    if (below <= lo && below + split.kept > hi) {  // ranks lo and hi were kept
      const scalar_t th = select_theta(band, rank, lo, hi, below);
      if (a <= th && th <= b) {  // so the sure pairs are closer than θ and the far ones not
        add_band(band, th, sums);
        return;
      }
    }
    ++sampled_fallbacks;
    push.zero_();  // the bounds missed: start again with the two-pass selection
    close.assign(N, 0);
    Band<scalar_t>().swap(band);
  }

  // Pass 1: a histogram of the distances' buckets (one per thread, summed after), which
  // locates the buckets of the two ranks θ interpolates between.
  Distances<scalar_t> dist(keys, tile_bytes, /*keep=*/true);
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
  int64_t first = -1, last = -1;  // buckets of ranks lo and hi
  for (int64_t j = 0, seen = 0; j < B::kCount && last < 0; ++j) {
    if (first < 0 && seen + hist[j] > lo) first = j;
    if (seen + hist[j] > hi) last = j;
    seen += hist[j];
  }
  TORCH_INTERNAL_ASSERT(first >= 0 && last >= first, "some.keystore_update: distance histogram");
  // Pass 2: every pair outside a narrow band of buckets around them is known: below it a
  // pair is closer than θ, above it it is not. (The band is one bucket wider on each side
  // than the two ranks' buckets: θ, a rounded interpolation, may fall an ulp outside
  // [D_lo, D_hi].)
  const int64_t band_lo = std::max<int64_t>(first - 1, 0), band_hi = std::min<int64_t>(last + 1, B::kCount - 1);
  int64_t below = 0, in_band = 0;
  for (int64_t j = 0; j < band_lo; ++j) below += hist[j];
  for (int64_t j = band_lo; j <= band_hi; ++j) in_band += hist[j];
  const Split split = add_sure_keep_band(
      dist,
      [&](scalar_t v) {
        const int64_t j = B::of(v);
        return j > band_hi ? kFar : (j >= band_lo ? kBand : kSure);
      },
      sums, band);
  TORCH_INTERNAL_ASSERT(split.kept == in_band, "some.keystore_update: the distances changed between the two passes");
  add_band(band, select_theta(band, rank, lo, hi, below), sums);
}

}  // namespace repulsion
}  // namespace some
