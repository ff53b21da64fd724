// CUDA kernels of some::experts and some::experts_backward (docs/method.md §3 step 5);
// the token-by-expert grouping they start from is in grouping.cu (declared in common.cuh).
//
// Plan (the CPU's, csrc/cpu/experts.cpp, without host synchronization):
//   1. group the (token, slot) pairs by expert on the device (`order`,
//      `offsets`, same meaning as the CPU's); the backward reuses them;
//   2. grouped GEMMs: every thread block computes one (row tile, column tile)
//      of one expert's segment. Blocks are mapped to (expert, tile) by a
//      device-side schedule (cumulative row-tile counts per expert, from
//      `offsets`); the grid is a host-known upper bound, ceil(P/BM) + N row
//      tiles, and blocks past the real count exit at once, so the host never
//      needs the counts. A rows are gathered through `order` while loading the
//      tile (no padded or permuted copies of x / grad_y);
//   3. fused epilogues on the accumulator tile: bias + GELU (storing the
//      pre-activation `hidden` in grouped order, as the CPU), gate * (· + b2),
//      and in the backward gate * dA * GELU'(pre) with the row dot
//      dA · GELU(pre) for the gate gradient;
//   4. per-token combine in slot order (a second pass instead of atomics), so
//      every output is bit-identical run to run.
// The experts are frozen: no weight gradient is ever computed.
//
// Math: bfloat16 uses tensor cores (WMMA 16x16x16, fp32 accumulators);
// float32 and float64 use a plain FMA tiled path in their own precision
// (fp32 stays true fp32, as on the CPU). Accumulation type: at::opmath_type.
// Every GEMM result is rounded to the input dtype before its epilogue (a
// no-op for fp32 / fp64), where the CPU's at::mm_out into bf16 buffers and
// at::_grouped_mm (bf16 output only) round it: all three paths share their
// bf16 rounding points (see grouped_gemm_kernel's epilogue).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <mma.h>

#include <climits>
#include <cstdint>
#include <string>

#include "../checks.h"
#include "../op_checks.h"
#include "../philox.h"
#include "common.cuh"

namespace some {
namespace gpu {

// =====================================================================
// Grouped GEMM
// =====================================================================
//
// For the row tile [r0, r0 + rows) of expert e's segment and the column tile
// [n0, n0 + BN):  C[m, n] = Σ_kk A[src(m), kk] · B_e(kk, n0 + n), where
//   src(m) = order[r0 + m] / k  (gathered: x or grad_y, one row per token)
//   src(m) = r0 + m             (grouped buffers: act, grad_pre)
// and B_e is expert e's weight matrix, either stored [ncols][K] ("B
// transposed": W1_e in the forward up-projection, W2_e in the
// down-projection) or [K][ncols] (W2_e, W1_e in the backward).
// The finished accumulator tile goes through shared memory to the epilogue,
// which works one warp per row (coalesced stores, and a deterministic row
// reduction where the epilogue needs one).

namespace {

// float32 / float64: FMA tiles in the input precision. 256 threads, each a
// 4x4 micro-tile of rows ty + 16 i, columns tx + 16 j (conflict-free
// shared-memory reads).
struct FmaTile {
  static constexpr bool kWmma = false;
  static constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
  static constexpr int kTM = 4, kTN = 4, kPad = 4;
  static constexpr int kLda = kBM + kPad;  // As is [BK][BM + pad] (k-major)
  static constexpr int kLdb = kBN + kPad;  // Bs is [BK][BN + pad]
  static constexpr int kLdc = kBN + kPad;
  template <typename acc_t>
  __host__ __device__ static constexpr int smem_bytes() {
    constexpr int ab = (kBK * kLda + kBK * kLdb) * static_cast<int>(sizeof(acc_t));
    constexpr int c = kBM * kLdc * static_cast<int>(sizeof(acc_t));
    return ab > c ? ab : c;
  }
};

// bfloat16: WMMA 16x16x16 with fp32 accumulators. 8 warps as 2 (rows) x 4
// (columns), each 32x32 = 2x2 fragments. Paddings keep every fragment
// pointer 32-byte aligned and the leading dimensions legal (multiples of 8
// bf16 / 4 floats) while spreading rows over the shared-memory banks.
struct WmmaTile {
  static constexpr bool kWmma = true;
  static constexpr int kBM = 64, kBN = 128, kBK = 32, kThreads = 256;
  static constexpr int kWarpsN = 4, kWarpTileM = 32, kWarpTileN = 32;
  static constexpr int kPad = 8;
  static constexpr int kLda = kBK + kPad;    // As [BM][BK + pad]
  static constexpr int kLdbT = kBK + kPad;   // Bs [BN][BK + pad] when B is [ncols][K]
  static constexpr int kLdbN = kBN + kPad;   // Bs [BK][BN + pad] when B is [K][ncols]
  static constexpr int kLdc = kBN + 4;       // Cs [BM][BN + 4] floats
  template <typename acc_t>
  __host__ __device__ static constexpr int smem_bytes() {
    constexpr int a = kBM * kLda * 2;
    constexpr int bt = kBN * kLdbT * 2, bn = kBK * kLdbN * 2;
    constexpr int ab = a + (bt > bn ? bt : bn);
    constexpr int c = kBM * kLdc * static_cast<int>(sizeof(float));
    return ab > c ? ab : c;
  }
};

template <typename T>
using TileFor = std::conditional_t<std::is_same_v<T, c10::BFloat16>, WmmaTile, FmaTile>;

template <typename T>
struct GemmArgs {
  const T* a;             // A rows, [*, K] row-major
  const int64_t* order;   // grouped row -> flat pair index
  int64_t slots;          // k: pair p is token p / k
  const T* b;             // expert 0's B; expert e at b + e * b_stride
  int64_t b_stride;
  int K;                  // reduction length
  int ncols;              // output columns
  const int64_t* offsets; // [N + 1]
  const int* tile_start;  // [N + 1]
  int num_experts;
  // Procedural experts (b == nullptr, docs/method.md §9): element i of B_e is generated
  // where it is loaded (csrc/philox.h), never read from memory.
  uint32_t gen_seed = 0, gen_layer = 0, gen_tensor = 0;
  float gen_bound = 0.0f;
};

// Element i of expert e's B, generated (procedural experts).
template <typename T>
__device__ __forceinline__ T generated(const GemmArgs<T>& a, int e, int64_t i) {
  const uint64_t blk = static_cast<uint64_t>(i) >> 2;
  const philox::Block r = philox::philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                                                static_cast<uint32_t>(e), a.gen_tensor, a.gen_seed, a.gen_layer);
  return static_cast<T>(philox::to_uniform(r.v[i & 3], a.gen_bound));
}

// VEC consecutive elements moved as one (16-byte when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zero_pack() {
  Pack<T, VEC> z;
#pragma unroll
  for (int i = 0; i < VEC; ++i) z.v[i] = T(0);
  return z;
}

// VEC consecutive generated elements from i (i and VEC multiples of 4 when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> generated_pack(const GemmArgs<T>& a, int e, int64_t i) {
  Pack<T, VEC> p;
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const uint64_t blk = static_cast<uint64_t>(i + j) >> 2;
      const philox::Block r = philox::philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                                                    static_cast<uint32_t>(e), a.gen_tensor, a.gen_seed, a.gen_layer);
#pragma unroll
      for (int l = 0; l < 4; ++l) p.v[j + l] = static_cast<T>(philox::to_uniform(r.v[l], a.gen_bound));
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = generated(a, e, i + j);
  }
  return p;
}

// ---- FMA main loop (float32 / float64) -------------------------------

template <typename T, bool kGatherA, bool kBT>
__device__ __forceinline__ void mainloop_fma(const GemmArgs<T>& args, const T* __restrict__ b, int e,
                                             const int64_t* s_src, int n0, unsigned char* smem) {
  using Tile = FmaTile;
  using acc_t = at::opmath_type<T>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = Tile::kBK, NT = Tile::kThreads;
  constexpr int A_LOADS = BM * BK / NT, B_LOADS = BN * BK / NT;
  static_assert(BM * BK % NT == 0 && BN * BK % NT == 0, "tile loads must split evenly");
  acc_t* As = reinterpret_cast<acc_t*>(smem);
  acc_t* Bs = As + BK * Tile::kLda;
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int K = args.K, ncols = args.ncols;

  // Fixed per thread: which A rows / B rows-or-columns it loads.
  const T* a_row[A_LOADS];
  int a_m[A_LOADS], a_k[A_LOADS];
#pragma unroll
  for (int i = 0; i < A_LOADS; ++i) {
    const int idx = tid + i * NT;
    a_m[i] = idx / BK;
    a_k[i] = idx % BK;  // consecutive threads walk along K: coalesced
    const int64_t src = s_src[a_m[i]];
    a_row[i] = src >= 0 ? args.a + src * K : nullptr;
  }
  int b_n[B_LOADS], b_k[B_LOADS];
#pragma unroll
  for (int i = 0; i < B_LOADS; ++i) {
    const int idx = tid + i * NT;
    if constexpr (kBT) {  // B[n][k]: walk along k
      b_n[i] = idx / BK;
      b_k[i] = idx % BK;
    } else {  // B[k][n]: walk along n
      b_k[i] = idx / BN;
      b_n[i] = idx % BN;
    }
  }

  T a_reg[A_LOADS], b_reg[B_LOADS];
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
      const int kk = k0 + a_k[i];
      a_reg[i] = (a_row[i] != nullptr && kk < K) ? a_row[i][kk] : T(0);
    }
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) {
      const int kk = k0 + b_k[i], n = n0 + b_n[i];
      const bool ok = kk < K && n < ncols;
      const int64_t at = kBT ? static_cast<int64_t>(n) * K + kk : static_cast<int64_t>(kk) * ncols + n;
      b_reg[i] = ok ? (b != nullptr ? b[at] : generated(args, e, at)) : T(0);
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) As[a_k[i] * Tile::kLda + a_m[i]] = static_cast<acc_t>(a_reg[i]);
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) Bs[b_k[i] * Tile::kLdb + b_n[i]] = static_cast<acc_t>(b_reg[i]);
  };

  acc_t acc[Tile::kTM][Tile::kTN];
#pragma unroll
  for (int i = 0; i < Tile::kTM; ++i)
#pragma unroll
    for (int j = 0; j < Tile::kTN; ++j) acc[i][j] = acc_t(0);

  const int nk = static_cast<int>(ceil_div(K, BK));
  if (nk > 0) {
    load(0);
    store();
    __syncthreads();
  }
  for (int kt = 0; kt < nk; ++kt) {
    // Prefetch the next K slice into registers while this one is multiplied.
    if (kt + 1 < nk) load((kt + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t av[Tile::kTM], bv[Tile::kTN];
#pragma unroll
      for (int i = 0; i < Tile::kTM; ++i) av[i] = As[kk * Tile::kLda + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < Tile::kTN; ++j) bv[j] = Bs[kk * Tile::kLdb + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < Tile::kTM; ++i)
#pragma unroll
        for (int j = 0; j < Tile::kTN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
    if (kt + 1 < nk) {
      store();
      __syncthreads();
    }
  }
  // Cs aliases As/Bs: every read of them finished at the last barrier.
#pragma unroll
  for (int i = 0; i < Tile::kTM; ++i)
#pragma unroll
    for (int j = 0; j < Tile::kTN; ++j) Cs[(ty + 16 * i) * Tile::kLdc + tx + 16 * j] = acc[i][j];
}

// ---- WMMA main loop (bfloat16, sm_80+) -------------------------------

template <typename T, bool kGatherA, bool kBT, int VEC>
__device__ __forceinline__ void mainloop_wmma(const GemmArgs<T>& args, const T* __restrict__ b, int e,
                                              const int64_t* s_src, int n0, unsigned char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 tensor cores need sm_80 or newer (CMAKE_CUDA_ARCHITECTURES)
#else
  namespace wmma = nvcuda::wmma;
  using Tile = WmmaTile;
  static_assert(sizeof(T) == 2, "the WMMA path is for bfloat16");
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = Tile::kBK, NT = Tile::kThreads;
  constexpr int LDA = Tile::kLda, LDB = kBT ? Tile::kLdbT : Tile::kLdbN;
  constexpr int A_CH = BM * BK / VEC / NT, B_CH = BN * BK / VEC / NT;
  static_assert(BM * BK % (VEC * NT) == 0 && BN * BK % (VEC * NT) == 0, "tile loads must split evenly");
  using P = Pack<T, VEC>;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * LDA;
  float* Cs = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x;
  const int K = args.K, ncols = args.ncols;

  // Thread -> (row, K chunk) of A; (n, K chunk) or (K row, n chunk) of B.
  constexpr int A_CPR = BK / VEC;  // chunks per A row
  const T* a_row[A_CH];
  int a_m[A_CH], a_k[A_CH];
#pragma unroll
  for (int i = 0; i < A_CH; ++i) {
    const int c = tid + i * NT;
    a_m[i] = c / A_CPR;
    a_k[i] = (c % A_CPR) * VEC;
    const int64_t src = s_src[a_m[i]];
    a_row[i] = src >= 0 ? args.a + src * K : nullptr;
  }
  constexpr int B_CPR = kBT ? BK / VEC : BN / VEC;
  int b_r[B_CH], b_c[B_CH];  // kBT: (n, k) ; else (k, n)
#pragma unroll
  for (int i = 0; i < B_CH; ++i) {
    const int c = tid + i * NT;
    b_r[i] = c / B_CPR;
    b_c[i] = (c % B_CPR) * VEC;
  }

  // With VEC > 1 the host guarantees K (and ncols for [K][ncols] B) are
  // multiples of VEC, so a chunk is either wholly inside or wholly outside.
  P a_reg[A_CH], b_reg[B_CH];
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < A_CH; ++i) {
      const int kk = k0 + a_k[i];
      a_reg[i] = (a_row[i] != nullptr && kk < K) ? *reinterpret_cast<const P*>(a_row[i] + kk)
                                                 : zero_pack<T, VEC>();
    }
#pragma unroll
    for (int i = 0; i < B_CH; ++i) {
      const int n = kBT ? n0 + b_r[i] : n0 + b_c[i], kk = kBT ? k0 + b_c[i] : k0 + b_r[i];
      const int64_t at = kBT ? static_cast<int64_t>(n) * K + kk : static_cast<int64_t>(kk) * ncols + n;
      if (!(n < ncols && kk < K)) b_reg[i] = zero_pack<T, VEC>();
      else if (b != nullptr) b_reg[i] = *reinterpret_cast<const P*>(b + at);
      else b_reg[i] = generated_pack<T, VEC>(args, e, at);
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < A_CH; ++i) *reinterpret_cast<P*>(As + a_m[i] * LDA + a_k[i]) = a_reg[i];
#pragma unroll
    for (int i = 0; i < B_CH; ++i) *reinterpret_cast<P*>(Bs + b_r[i] * LDB + b_c[i]) = b_reg[i];
  };

  using BLayout = std::conditional_t<kBT, wmma::col_major, wmma::row_major>;
  const int warp = tid / kWarpSize;
  const int wm = warp / Tile::kWarpsN, wn = warp % Tile::kWarpsN;
  constexpr int FM = Tile::kWarpTileM / 16, FN = Tile::kWarpTileN / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const __nv_bfloat16* Asb = reinterpret_cast<const __nv_bfloat16*>(As);
  const __nv_bfloat16* Bsb = reinterpret_cast<const __nv_bfloat16*>(Bs);
  const int nk = static_cast<int>(ceil_div(K, BK));
  if (nk > 0) {
    load(0);
    store();
    __syncthreads();
  }
  for (int kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) load((kt + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, BLayout> bf[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i)
        wmma::load_matrix_sync(af[i], Asb + (wm * Tile::kWarpTileM + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn * Tile::kWarpTileN + j * 16;
        // element (k, n) of B_e sits at Bs[n][k] (col_major) or Bs[k][n] (row_major)
        wmma::load_matrix_sync(bf[j], kBT ? Bsb + n * LDB + kk : Bsb + kk * LDB + n, LDB);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
    __syncthreads();
    if (kt + 1 < nk) {
      store();
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(
          Cs + (wm * Tile::kWarpTileM + i * 16) * Tile::kLdc + wn * Tile::kWarpTileN + j * 16,
          acc[i][j], Tile::kLdc, wmma::mem_row_major);
#endif
}

// ---- the kernel ------------------------------------------------------

template <typename T, bool kGatherA, bool kBT, int VEC, typename Epi>
__global__ void __launch_bounds__(TileFor<T>::kThreads)
    grouped_gemm_kernel(const GemmArgs<T> args, const Epi epi) {
  using Tile = TileFor<T>;
  using acc_t = at::opmath_type<T>;
  using cs_t = std::conditional_t<Tile::kWmma, float, acc_t>;
  constexpr int BM = Tile::kBM, BN = Tile::kBN;
  __shared__ __align__(128) unsigned char smem[Tile::template smem_bytes<acc_t>()];
  __shared__ int64_t s_pair[BM];  // flat pair index of each row of the tile
  __shared__ int64_t s_src[BM];   // row of A it reads, -1 past the segment

  // (expert, row tile) of this block from the device-side schedule.
  const int tile = blockIdx.x;
  if (tile >= args.tile_start[args.num_experts]) return;  // surplus block
  const int e = expert_of_tile(args.tile_start, args.num_experts, tile);
  const int64_t r0 = args.offsets[e] + static_cast<int64_t>(tile - args.tile_start[e]) * BM;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), args.offsets[e + 1] - r0));
  const int n0 = blockIdx.y * BN;

  for (int m = threadIdx.x; m < BM; m += Tile::kThreads) {
    int64_t pair = -1, src = -1;
    if (m < rows) {
      pair = args.order[r0 + m];
      src = kGatherA ? pair / args.slots : r0 + m;
    }
    s_pair[m] = pair;
    s_src[m] = src;
  }
  __syncthreads();

  const T* b = args.b != nullptr ? args.b + static_cast<int64_t>(e) * args.b_stride : nullptr;  // null: generated
  if constexpr (Tile::kWmma) mainloop_wmma<T, kGatherA, kBT, VEC>(args, b, e, s_src, n0, smem);
  else mainloop_fma<T, kGatherA, kBT>(args, b, e, s_src, n0, smem);
  __syncthreads();

  // Epilogue: one warp per row, lanes along the columns. The accumulator is
  // rounded to T first (bf16; a no-op for fp32 / fp64): the CPU path writes its
  // GEMMs into T buffers (csrc/cpu/experts.cpp: at::mm_out, then bias / GELU' /
  // combine from the rounded values) and at::_grouped_mm has no fp32 output for
  // bf16 inputs (_resolve_grouped_mm_out_dtype: "Grouped gemm output dtype must
  // match `mat_a` dtype"), so this is where all three round.
  const cs_t* Cs = reinterpret_cast<const cs_t*>(smem);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  constexpr int kWarps = Tile::kThreads / kWarpSize;
  for (int m = warp; m < rows; m += kWarps) {
    const int64_t r = r0 + m, pair = s_pair[m];
    const acc_t scale = epi.row_scale(pair);
    acc_t dot = 0;
    for (int n = lane; n < BN; n += kWarpSize) {
      const int col = n0 + n;
      if (col < args.ncols)
        dot += epi.apply(e, r, pair, col, static_cast<acc_t>(static_cast<T>(Cs[m * Tile::kLdc + n])), scale);
    }
    if constexpr (Epi::kRowDot) {
      dot = warp_sum(dot);
      if (lane == 0) epi.row_done(r, blockIdx.y, dot);
    }
  }
}

// ---- epilogues -------------------------------------------------------
// `acc` / `v` / `dv` below: the GEMM result already rounded to T (see above).

// Forward up-projection: pre = acc + b1_e (stored as `hidden`, grouped rows),
// act = GELU(pre) (input of the down-projection).
template <typename T>
struct EpiBiasGelu {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = false;
  T* hidden;
  T* act;
  const T* b1;
  int64_t h;
  __device__ acc_t row_scale(int64_t) const { return acc_t(1); }
  __device__ acc_t apply(int e, int64_t r, int64_t, int col, acc_t v, acc_t) const {
    // act from the stored (rounded) pre-activation: the backward takes GELU' there
    const T stored = static_cast<T>(v + static_cast<acc_t>(b1[e * h + col]));
    v = static_cast<acc_t>(stored);
    hidden[r * h + col] = stored;
    act[r * h + col] = static_cast<T>(v * gelu_cdf(v));
    return acc_t(0);
  }
  __device__ void row_done(int64_t, int, acc_t) const {}
};

// Forward down-projection: out[pair] = g * (acc + b2_e), in acc precision,
// indexed by the flat pair so that the combine reads a token's slots in order.
template <typename T>
struct EpiGateBias {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = false;
  acc_t* out;
  const T* b2;
  const T* gates;
  int64_t d;
  __device__ acc_t row_scale(int64_t pair) const { return static_cast<acc_t>(gates[pair]); }
  __device__ acc_t apply(int e, int64_t, int64_t pair, int col, acc_t v, acc_t g) const {
    out[pair * d + col] = g * (v + static_cast<acc_t>(b2[e * d + col]));
    return acc_t(0);
  }
  __device__ void row_done(int64_t, int, acc_t) const {}
};

// Backward first GEMM, acc = dL/da (before the gate): grad_pre = g * dA *
// GELU'(pre) (grouped rows, input of the second GEMM) and the partial row dot
// Σ_col dA · GELU(pre) of this column tile (for dL/dg).
template <typename T>
struct EpiGeluGrad {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = true;
  const T* hidden;
  T* grad_pre;    // nullptr when grad_x is not needed
  const T* gates;
  acc_t* dotpart; // [P, col_tiles]; nullptr when grad_gates is not needed
  int64_t h;
  int64_t col_tiles;
  __device__ acc_t row_scale(int64_t pair) const { return static_cast<acc_t>(gates[pair]); }
  __device__ acc_t apply(int, int64_t r, int64_t, int col, acc_t dv, acc_t g) const {
    const acc_t x = static_cast<acc_t>(hidden[r * h + col]);
    const acc_t cdf = gelu_cdf(x);
    if (grad_pre != nullptr) grad_pre[r * h + col] = static_cast<T>(g * dv * (cdf + x * gelu_pdf(x)));
    return dv * x * cdf;
  }
  __device__ void row_done(int64_t r, int col_tile, acc_t dot) const {
    if (dotpart != nullptr) dotpart[r * col_tiles + col_tile] = dot;
  }
};

// Backward second GEMM: per-pair dL/dx rows, indexed by the flat pair.
template <typename T>
struct EpiScatter {
  using acc_t = at::opmath_type<T>;
  static constexpr bool kRowDot = false;
  acc_t* out;
  int64_t d;
  __device__ acc_t row_scale(int64_t) const { return acc_t(1); }
  __device__ acc_t apply(int, int64_t, int64_t pair, int col, acc_t v, acc_t) const {
    out[pair * d + col] = v;
    return acc_t(0);
  }
  __device__ void row_done(int64_t, int, acc_t) const {}
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launch one grouped GEMM over the schedule `tile_start` (built for
// TileFor<T>::kBM). No-op when there is nothing to compute.
template <bool kGatherA, bool kBT, typename T, typename Epi>
void launch_grouped_gemm(const GemmArgs<T>& args, const Epi& epi, int64_t row_tiles,
                         cudaStream_t stream) {
  using Tile = TileFor<T>;
  if (row_tiles == 0 || args.ncols == 0) return;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(ceil_div(args.ncols, Tile::kBN)));
  TORCH_CHECK(grid.y <= 65535, "some: too many output columns for one grouped GEMM (", args.ncols, ")");
  if constexpr (Tile::kWmma) {
    // 16-byte loads when every row start is 16-byte aligned.
    constexpr int V = 16 / sizeof(T);
    const bool vec = aligned16(args.a) && (args.b == nullptr || aligned16(args.b)) && args.K % V == 0 &&
                     args.b_stride % V == 0 && (kBT || args.ncols % V == 0);
    if (!vec)
      TORCH_WARN_ONCE("some.experts (CUDA, bfloat16): widths d = ", kGatherA ? args.K : args.ncols,
                      " / h not multiples of 8 (or unaligned inputs) take the 1-element load path, several "
                      "times slower than the 16-byte one");
    if (vec) {
      grouped_gemm_kernel<T, kGatherA, kBT, V, Epi><<<grid, Tile::kThreads, 0, stream>>>(args, epi);
    } else {
      grouped_gemm_kernel<T, kGatherA, kBT, 1, Epi><<<grid, Tile::kThreads, 0, stream>>>(args, epi);
    }
  } else {
    grouped_gemm_kernel<T, kGatherA, kBT, 1, Epi><<<grid, Tile::kThreads, 0, stream>>>(args, epi);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// =====================================================================
// Small kernels around the GEMMs
// =====================================================================

// out[t, :] = Σ_j pairs[t*k + j, :] over the valid slots, in slot order.
template <typename T, typename acc_t>
__global__ void combine_pairs_kernel(const acc_t* __restrict__ pairs,
                                     const int64_t* __restrict__ indices, int64_t k, int64_t d,
                                     int64_t num_experts, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = t * k + j, e = indices[p];
      if (e >= 0 && e < num_experts) acc += pairs[p * d + c];
    }
    out[t * d + c] = static_cast<T>(acc);
  }
}

// Rows past the valid pairs of `hidden` are defined as zeros (as the CPU).
template <typename T>
__global__ void zero_tail_rows_kernel(T* __restrict__ hidden, const int64_t* __restrict__ offsets,
                                      int num_experts, int64_t P, int64_t h) {
  const int64_t first = offsets[num_experts] * h, total = P * h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    hidden[i] = T(0);
}

// dL/dg of each valid pair: Σ over column tiles of the row dots (fixed
// order) + grad_y_t · b2_e. One warp per grouped row.
template <typename T, typename acc_t>
__global__ void gate_grad_kernel(const acc_t* __restrict__ dotpart, int64_t col_tiles,
                                 const int64_t* __restrict__ order,
                                 const int64_t* __restrict__ offsets, int num_experts,
                                 const int64_t* __restrict__ indices,
                                 const T* __restrict__ grad_y, const T* __restrict__ b2, int64_t k,
                                 int64_t d, T* __restrict__ grad_gates) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= offsets[num_experts]) return;  // whole warp
  const int64_t p = order[r], e = indices[p], t = p / k;
  acc_t acc = 0;
  for (int64_t c = lane; c < d; c += kWarpSize)
    acc += static_cast<acc_t>(grad_y[t * d + c]) * static_cast<acc_t>(b2[e * d + c]);
  acc = warp_sum(acc);
  if (lane == 0) {
    acc_t dot = 0;
    for (int64_t ct = 0; ct < col_tiles; ++ct) dot += dotpart[r * col_tiles + ct];
    grad_gates[p] = static_cast<T>(dot + acc);
  }
}

// =====================================================================
// Procedural experts, and the stored ones filled from the generator
// =====================================================================

// Experts first .. first + n - 1 of one tensor kind: dst [n, per] from the generator.
template <typename T>
__global__ void fill_expert_kernel(T* __restrict__ dst, int64_t per, int64_t n, int64_t first, uint32_t seed,
                                   uint32_t layer, uint32_t tensor, float bound) {
  const int64_t blocks_per = ceil_div(per, 4), total = n * blocks_per;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride) {
    const int64_t e = g / blocks_per, blk = g % blocks_per;
    const philox::Block r = philox::philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(static_cast<uint64_t>(blk) >> 32),
                                                  static_cast<uint32_t>(first + e), tensor, seed, layer);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = blk * 4 + l;
      if (i < per) dst[e * per + i] = static_cast<T>(philox::to_uniform(r.v[l], bound));
    }
  }
}

void fill_expert_tensor(at::Tensor& t, int64_t first, uint32_t seed, uint32_t layer, uint32_t tensor,
                        int64_t fan_in, cudaStream_t stream) {
  if (t.numel() == 0) return;
  const int64_t n = t.size(0), per = t.numel() / n;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n * ceil_div(per, 4), 256), 65535));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "some_fill_experts_cuda", [&] {
    fill_expert_kernel<scalar_t><<<blocks, 256, 0, stream>>>(t.data_ptr<scalar_t>(), per, n, first, seed, layer,
                                                             tensor, philox::bound(fan_in));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Where the experts come from: stored tensors, or the generator (w1 and w2
// undefined: generated inside the GEMM loads; b1, b2 generated into small
// [N, h] / [N, d] buffers).
struct ExpertSource {
  at::Tensor w1, b1, w2, b2;
  uint32_t seed = 0, layer = 0;
  bool procedural() const { return !w1.defined(); }
};

ExpertSource procedural_source(int64_t seed, int64_t layer, int64_t N, int64_t d, int64_t h,
                               const at::TensorOptions& opts, cudaStream_t stream) {
  ExpertSource src;
  src.seed = static_cast<uint32_t>(seed);
  src.layer = static_cast<uint32_t>(layer);
  src.b1 = at::empty({N, h}, opts);
  src.b2 = at::empty({N, d}, opts);
  fill_expert_tensor(src.b1, 0, src.seed, src.layer, philox::kTensorB1, d, stream);
  fill_expert_tensor(src.b2, 0, src.seed, src.layer, philox::kTensorB2, h, stream);
  return src;
}

// A contiguous tensor whose data starts 16-byte aligned (a view with an
// offset is copied), so the 16-byte load path applies.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  auto c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

// =====================================================================
// The CUTLASS path: at::_grouped_mm (TMA + wgmma on sm_90) for bfloat16
// =====================================================================
//
// Two grouped GEMMs per direction through PyTorch's grouped GEMM over the
// device-side grouping, with small fused kernels around them. Rows of the
// grouped buffers are in `order`; rows past the valid pairs are never read
// (at::_grouped_mm leaves its output rows past the last group end unwritten).
//
// Rounding: the same points as the kernels above (each GEMM result rounded to
// bf16, then bias / GELU / gate in fp32), but CUTLASS sums every dot product in
// another order than the WMMA tiles, so a GEMM output can differ by one bf16
// ulp (2^-8 relative) and everything downstream by its consequences: stored
// experts on this path match procedural experts (always the kernels) and the
// kernels' own results to bf16 rounding, not bit for bit.

// Whether at::_grouped_mm takes the bf16 calls below (2d x 3d, int32 group ends)
// on its CUTLASS kernel, without raising or synchronizing. Its limits, read in
// PyTorch's source (aten/src/ATen/native/cuda/GroupedBlas.cpp _grouped_mm_cuda,
// GroupMM.cu bf16bf16_grouped_gemm_impl_sm90_sm100, GroupMMCommon.cuh
// prepare_grouped_gemm_data, aten/src/ATen/native/GroupedMMUtils.h):
//  * at most 1,023 groups: TORCH_CHECK(group_count < 1024, "Can't process more
//    than 1024 groups") (its argument kernel runs one thread per group in one block);
//  * every operand row stride a multiple of 16 bytes and every data pointer
//    16-byte aligned (check_valid_strides_and_return_transposed): d and h
//    multiples of 8, and not 0 (a zero-width contiguous operand has stride 1 and
//    is refused); then its output (P, h) / (P, d) is unpadded
//    (create_grouped_gemm_output_tensor pads rows to 16 bytes), as the kernels
//    around it index it. Our grouped buffers are fresh allocations (aligned);
//    w1 / w2 are contiguous (checked) but may start anywhere;
//  * empty groups are fine for 2d x 3d: prepare_grouped_gemm_data asserts
//    delta > 0 only for a ragged K (2d x 2d);
//  * torch builds that CUTLASS kernel only off Windows with CUDA >= 12
//    (BUILD_GG_KERNEL in GroupMM.cu), else the call raises; checked against our
//    toolkit, which is assumed to be torch's major version.
// The device (checked in grouped_mm_path): the no-sync path is taken for
// compute capability major 9 (newer torch: also 10), and GroupMM.cu is compiled
// as sm_90a, which runs on 9.0 only; anywhere else _grouped_mm_fallback copies
// the group ends to the host (a synchronization) and loops over the groups.
// at::_grouped_mm exists from torch 2.8 on: older builds always take the own kernels.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define SOME_HAVE_GROUPED_MM 1
#else
#define SOME_HAVE_GROUPED_MM 0
#endif

at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends) {
#if SOME_HAVE_GROUPED_MM
  return at::_grouped_mm(a, b, ends);
#else
  TORCH_CHECK(false, "some: at::_grouped_mm needs torch >= 2.8 (grouped_mm_fits should have refused)");
#endif
}

bool grouped_mm_fits(const ExpertSource& src, int64_t N, int64_t d, int64_t h) {
#if !SOME_HAVE_GROUPED_MM || defined(_WIN32) || !defined(CUDART_VERSION) || CUDART_VERSION < 12000
  return false;
#else
  return N >= 1 && N < 1024 && d > 0 && h > 0 && d % 8 == 0 && h % 8 == 0 && aligned16(src.w1.data_ptr()) &&
         aligned16(src.w2.data_ptr());
#endif
}

bool grouped_mm_path(const at::Tensor& x, const ExpertSource& src, int64_t N, int64_t d, int64_t h) {
  const char* v = std::getenv("SOME_CUDA_GEMM");  // kernels | grouped_mm | auto (default)
  const std::string choice = v == nullptr ? "auto" : v;
  if (choice == "kernels" || src.procedural() || x.scalar_type() != at::kBFloat16) return false;
  if (!grouped_mm_fits(src, N, d, h)) return false;
  // Forced: any GPU (off compute capability 9.0, torch's synchronizing loop; a testing aid).
  if (choice == "grouped_mm") return true;
  int major = 0, minor = 0;
  const int dev = x.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;  // sm_90 exactly (see grouped_mm_fits)
}

// dst[r] = src[order[r] / k] (or zeros for the dropped tail), rows of width w.
template <typename T>
__global__ void gather_grouped_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ order, int64_t k,
                                           int64_t w, T* __restrict__ dst) {
  const int64_t r = blockIdx.x, p = order[r];
  for (int64_t c = threadIdx.x; c < w; c += blockDim.x) dst[r * w + c] = p >= 0 ? src[(p / k) * w + c] : T(0);
}

// hidden = pre = acc + b1_e (rounded to T), act = GELU(pre) from the rounded value.
template <typename T>
__global__ void bias_gelu_rows_kernel(const T* __restrict__ acc, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ indices, const T* __restrict__ b1, int64_t h,
                                      int64_t num_experts, T* __restrict__ hidden, T* __restrict__ act) {
  using acc_t = at::opmath_type<T>;
  const int64_t r = blockIdx.x, p = order[r];
  const int64_t e = p >= 0 ? indices[p] : -1;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    if (e < 0 || e >= num_experts) {
      hidden[r * h + c] = T(0);
      act[r * h + c] = T(0);
      continue;
    }
    const T stored = static_cast<T>(static_cast<acc_t>(acc[r * h + c]) + static_cast<acc_t>(b1[e * h + c]));
    const acc_t v = static_cast<acc_t>(stored);
    hidden[r * h + c] = stored;
    act[r * h + c] = static_cast<T>(v * gelu_cdf(v));
  }
}

// out[pair] = g * (acc + b2_e), per flat pair, in acc precision (combine input).
template <typename T, typename acc_t>
__global__ void gate_bias_pairs_kernel(const T* __restrict__ acc, const int64_t* __restrict__ order,
                                       const int64_t* __restrict__ indices, const T* __restrict__ gates,
                                       const T* __restrict__ b2, int64_t d, int64_t num_experts,
                                       acc_t* __restrict__ out) {
  const int64_t r = blockIdx.x, p = order[r];
  if (p < 0) return;
  const int64_t e = indices[p];
  if (e < 0 || e >= num_experts) return;
  const acc_t g = static_cast<acc_t>(gates[p]);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    out[p * d + c] = g * (static_cast<acc_t>(acc[r * d + c]) + static_cast<acc_t>(b2[e * d + c]));
}

// grad_pre = g * dA * GELU'(pre); dotpart[r] = Σ_c dA * GELU(pre) (one warp per row).
// Only the valid rows r < offsets[N] (the bound read here, no host sync): rows
// of dA past the last group end were never written by at::_grouped_mm, and
// uninitialized memory can hold NaN (NaN * 0 = NaN). The rows of grad_pre and
// dotpart past it stay unwritten too; nothing reads them (the second grouped
// GEMM stops at offsets[N], scatter_pairs_kernel and gate_grad_kernel skip them).
template <typename T, typename acc_t>
__global__ void gelu_grad_rows_kernel(const T* __restrict__ dA, const T* __restrict__ hidden,
                                      const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                      int num_experts, const T* __restrict__ gates, int64_t h,
                                      T* __restrict__ grad_pre, acc_t* __restrict__ dotpart) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= offsets[num_experts]) return;  // whole warp
  const int64_t p = order[r];
  const acc_t g = p >= 0 ? static_cast<acc_t>(gates[p]) : acc_t(0);  // (defensive: p >= 0 on valid rows)
  acc_t dot = 0;
  for (int64_t c = lane; c < h; c += kWarpSize) {
    const acc_t x = static_cast<acc_t>(hidden[r * h + c]), dv = static_cast<acc_t>(dA[r * h + c]);
    const acc_t cdf = gelu_cdf(x);
    if (grad_pre != nullptr) grad_pre[r * h + c] = static_cast<T>(g * dv * (cdf + x * gelu_pdf(x)));
    dot += dv * x * cdf;
  }
  dot = warp_sum(dot);
  if (lane == 0 && dotpart != nullptr) dotpart[r] = dot;
}

// xpair[pair] = rows[r] (acc precision), per flat pair.
template <typename T, typename acc_t>
__global__ void scatter_pairs_kernel(const T* __restrict__ rows, const int64_t* __restrict__ order, int64_t d,
                                     acc_t* __restrict__ out) {
  const int64_t r = blockIdx.x, p = order[r];
  if (p < 0) return;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) out[p * d + c] = static_cast<acc_t>(rows[r * d + c]);
}

// The group ends of at::_grouped_mm: offsets[1..N] as int32, on the device.
at::Tensor group_ends(const at::Tensor& offsets, int64_t N) { return offsets.narrow(0, 1, N).to(at::kInt); }

// =====================================================================
// Host side
// =====================================================================

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_forward_cuda(
    const char* op, const at::Tensor& x_in, const at::Tensor& indices_in, const at::Tensor& gates_in,
    const ExpertSource& src, int64_t N, int64_t h) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = aligned_contiguous(x_in);
  const auto gates = gates_in.contiguous();
  const auto indices = indices_in.contiguous();
  const int64_t T = x.size(0), d = x.size(1), k = indices.size(1), P = T * k;
  at::Tensor order, offsets;  // (not a structured binding: the dispatch lambda captures them)
  std::tie(order, offsets) = group_by_expert_cuda(op, indices, N);
  auto hidden = at::empty({P, h}, x.options());
  auto y = at::empty({T, d}, x.options());
  if (T == 0) return {y, hidden, order, offsets};
  if (P == 0 || N == 0) {  // k == 0 or no experts: nothing selected
    hidden.zero_();
    y.zero_();
    return {y, hidden, order, offsets};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "some_experts_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Tile = TileFor<scalar_t>;
    const auto opts_acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto act = at::empty({P, h}, x.options());  // GELU(pre), grouped rows
    auto ypair = at::empty({P, d}, opts_acc);   // g * E_e(x_t) per flat pair
    const int64_t* ord = order.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t* I = indices.data_ptr<int64_t>();

    if (grouped_mm_path(x, src, N, d, h)) {
      const auto ends = group_ends(offsets, N);
      auto xg = at::empty({P, d}, x.options());
      gather_grouped_rows_kernel<scalar_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
          x.data_ptr<scalar_t>(), ord, k, d, xg.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto up = grouped_mm(xg, src.w1.transpose(1, 2), ends);  // (P, h)
      bias_gelu_rows_kernel<scalar_t><<<static_cast<unsigned>(P), 256, 0, stream>>>(
          up.data_ptr<scalar_t>(), ord, I, src.b1.data_ptr<scalar_t>(), h, N, hidden.data_ptr<scalar_t>(),
          act.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto down = grouped_mm(act, src.w2.transpose(1, 2), ends);  // (P, d)
      ypair.zero_();  // dropped slots stay 0 (the combine skips them anyway)
      gate_bias_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
          down.data_ptr<scalar_t>(), ord, I, gates.data_ptr<scalar_t>(), src.b2.data_ptr<scalar_t>(), d, N,
          ypair.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const auto tile_start = tile_schedule_cuda(offsets, N, Tile::kBM);
      const int64_t row_tiles = max_row_tiles(P, N, Tile::kBM);
      const int* ts = tile_start.data_ptr<int>();
      const scalar_t* w1p = src.procedural() ? nullptr : src.w1.data_ptr<scalar_t>();
      const scalar_t* w2p = src.procedural() ? nullptr : src.w2.data_ptr<scalar_t>();

      // pre = x[token] W1_e^T + b1_e, act = GELU(pre)      (B = W1_e, [h][d])
      GemmArgs<scalar_t> up{x.data_ptr<scalar_t>(), ord, k, w1p, h * d, static_cast<int>(d), static_cast<int>(h),
                            off, ts, static_cast<int>(N), src.seed, src.layer, philox::kTensorW1, philox::bound(d)};
      EpiBiasGelu<scalar_t> up_epi{hidden.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                                   src.b1.data_ptr<scalar_t>(), h};
      launch_grouped_gemm</*gather*/ true, /*B transposed*/ true>(up, up_epi, row_tiles, stream);

      // ypair[p] = g_p (act W2_e^T + b2_e)                  (B = W2_e, [d][h])
      GemmArgs<scalar_t> down{act.data_ptr<scalar_t>(), ord, k, w2p, d * h, static_cast<int>(h),
                              static_cast<int>(d), off, ts, static_cast<int>(N), src.seed, src.layer,
                              philox::kTensorW2, philox::bound(h)};
      EpiGateBias<scalar_t> down_epi{ypair.data_ptr<acc_t>(), src.b2.data_ptr<scalar_t>(),
                                     gates.data_ptr<scalar_t>(), d};
      launch_grouped_gemm<false, true>(down, down_epi, row_tiles, stream);
    }

    if (d > 0) {
      combine_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), 128, 0, stream>>>(
          ypair.data_ptr<acc_t>(), I, k, d, N, y.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (h > 0) {
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(P * h, 256), 1024));
      zero_tail_rows_kernel<scalar_t><<<blocks, 256, 0, stream>>>(hidden.data_ptr<scalar_t>(), off,
                                                                  static_cast<int>(N), P, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, hidden, order, offsets};
}

// The backward trusts no grouping it is given: it regroups `indices` on the
// device (a few small kernels, no synchronization; stable, so identical to the
// forward's) and only checks that the given order/offsets have its shapes.
// Stale or foreign grouping tensors can therefore never make a kernel read or
// write outside a tensor.
std::tuple<at::Tensor, at::Tensor> experts_backward_cuda_impl(
    const char* op, const at::Tensor& grad_y_in, const at::Tensor& indices_in, const at::Tensor& gates_in,
    const ExpertSource& src, int64_t N, int64_t h, const at::Tensor& hidden, bool need_grad_x,
    bool need_grad_gates) {
  const int64_t T = indices_in.size(0), d = grad_y_in.size(1), k = indices_in.size(1), P = T * k;
  c10::cuda::CUDAGuard guard(grad_y_in.device());
  const auto grad_y = aligned_contiguous(grad_y_in);
  const auto gates = gates_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto hid = hidden.contiguous();
  at::Tensor ord_t, off_t;
  std::tie(ord_t, off_t) = group_by_expert_cuda(op, indices, N);

  auto grad_x = need_grad_x ? at::empty({T, d}, grad_y.options()) : at::empty({0}, grad_y.options());
  auto grad_gates =
      need_grad_gates ? at::zeros({T, k}, gates.options()) : at::empty({0}, gates.options());
  if ((!need_grad_x && !need_grad_gates) || T == 0) return {grad_x, grad_gates};
  if (P == 0 || N == 0) {
    grad_x.zero_();
    return {grad_x, grad_gates};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_y.scalar_type(), "some_experts_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Tile = TileFor<scalar_t>;
    const auto opts_acc = grad_y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t* ord = ord_t.data_ptr<int64_t>();
    const int64_t* off = off_t.data_ptr<int64_t>();
    const int64_t* I = indices.data_ptr<int64_t>();
    auto grad_pre = need_grad_x ? at::empty({P, h}, grad_y.options()) : at::Tensor();
    at::Tensor xpair = need_grad_x ? at::empty({P, d}, opts_acc) : at::Tensor();
    at::Tensor dotpart;
    int64_t col_tiles = 0;

    if (grouped_mm_path(grad_y, src, N, d, h)) {
      const auto ends = group_ends(off_t, N);
      auto gyg = at::empty({P, d}, grad_y.options());
      gather_grouped_rows_kernel<scalar_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
          grad_y.data_ptr<scalar_t>(), ord, k, d, gyg.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto dA = grouped_mm(gyg, src.w2, ends);  // (P, h): dL/da before the gate
      col_tiles = 1;
      dotpart = need_grad_gates ? at::empty({P, 1}, opts_acc) : at::Tensor();
      const int warps = 8;
      gelu_grad_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(ceil_div(P, warps)), warps * kWarpSize, 0,
                                               stream>>>(
          dA.data_ptr<scalar_t>(), hid.data_ptr<scalar_t>(), ord, off, static_cast<int>(N),
          gates.data_ptr<scalar_t>(), h, need_grad_x ? grad_pre.data_ptr<scalar_t>() : nullptr,
          need_grad_gates ? dotpart.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad_x) {
        const auto rows = grouped_mm(grad_pre, src.w1, ends);  // (P, d)
        xpair.zero_();
        scatter_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(P), 128, 0, stream>>>(
            rows.data_ptr<scalar_t>(), ord, d, xpair.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      const auto tile_start = tile_schedule_cuda(off_t, N, Tile::kBM);
      const int64_t row_tiles = max_row_tiles(P, N, Tile::kBM);
      const int* ts = tile_start.data_ptr<int>();
      col_tiles = ceil_div(h, Tile::kBN);
      dotpart = need_grad_gates ? at::empty({P, col_tiles}, opts_acc) : at::Tensor();
      const scalar_t* w1p = src.procedural() ? nullptr : src.w1.data_ptr<scalar_t>();
      const scalar_t* w2p = src.procedural() ? nullptr : src.w2.data_ptr<scalar_t>();

      // dA = grad_y[token] W2_e (before the gate), fused GELU' and row dots.
      // (B = W2_e stored [d][h] = [K][ncols])
      GemmArgs<scalar_t> da{grad_y.data_ptr<scalar_t>(), ord, k, w2p, d * h, static_cast<int>(d),
                            static_cast<int>(h), off, ts, static_cast<int>(N), src.seed, src.layer,
                            philox::kTensorW2, philox::bound(h)};
      EpiGeluGrad<scalar_t> da_epi{hid.data_ptr<scalar_t>(), need_grad_x ? grad_pre.data_ptr<scalar_t>() : nullptr,
                                   gates.data_ptr<scalar_t>(),
                                   need_grad_gates ? dotpart.data_ptr<acc_t>() : nullptr, h, col_tiles};
      launch_grouped_gemm<true, false>(da, da_epi, row_tiles, stream);
      if (need_grad_x && d > 0) {
        // per-pair dL/dx = grad_pre W1_e     (B = W1_e stored [h][d] = [K][ncols])
        GemmArgs<scalar_t> dx{h > 0 ? grad_pre.data_ptr<scalar_t>() : nullptr, ord, k, w1p, h * d,
                              static_cast<int>(h), static_cast<int>(d), off, ts, static_cast<int>(N), src.seed,
                              src.layer, philox::kTensorW1, philox::bound(d)};
        EpiScatter<scalar_t> dx_epi{xpair.data_ptr<acc_t>(), d};
        launch_grouped_gemm<false, false>(dx, dx_epi, row_tiles, stream);
      }
    }

    if (need_grad_gates) {
      const int warps_per_block = 8;
      gate_grad_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(ceil_div(P, warps_per_block)), warps_per_block * kWarpSize, 0, stream>>>(
              h > 0 ? dotpart.data_ptr<acc_t>() : nullptr, h > 0 ? col_tiles : 0, ord, off,
              static_cast<int>(N), I, grad_y.data_ptr<scalar_t>(), src.b2.data_ptr<scalar_t>(), k, d,
              grad_gates.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_grad_x && d > 0) {
      combine_pairs_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), 128, 0, stream>>>(
          xpair.data_ptr<acc_t>(), I, k, d, N, grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (need_grad_x) {
      grad_x.zero_();
    }
  });
  return {grad_x, grad_gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_cuda(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const char* op = "some.experts";
  check_expert_inputs(op, x, indices, gates, w1, b1, w2, b2);
  ExpertSource src{w1, b1, w2, b2};
  return experts_forward_cuda(op, x, indices, gates, src, w1.size(0), w1.size(1));
}

std::tuple<at::Tensor, at::Tensor> experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& indices, const at::Tensor& gates,
    const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& hidden,
    const at::Tensor& order, const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.experts_backward";
  check_experts_backward_inputs(op, grad_y, indices, gates, w1, w2, b2, hidden, order, offsets);
  ExpertSource src{w1, at::Tensor(), w2, b2};
  return experts_backward_cuda_impl(op, grad_y, indices, gates, src, w1.size(0), w1.size(1), hidden, need_grad_x,
                                    need_grad_gates);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> procedural_experts_cuda(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& gates, int64_t seed, int64_t layer,
    int64_t num_experts, int64_t d_ffn) {
  const char* op = "some.procedural_experts";
  check_procedural_expert_inputs(op, x, indices, gates, seed, layer, num_experts, d_ffn);
  c10::cuda::CUDAGuard guard(x.device());
  const auto src = procedural_source(seed, layer, num_experts, x.size(1), d_ffn, x.options(),
                                     c10::cuda::getCurrentCUDAStream());
  return experts_forward_cuda(op, x, indices, gates, src, num_experts, d_ffn);
}

std::tuple<at::Tensor, at::Tensor> procedural_experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& indices, const at::Tensor& gates, int64_t seed, int64_t layer,
    int64_t num_experts, int64_t d_ffn, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, bool need_grad_x, bool need_grad_gates) {
  const char* op = "some.procedural_experts_backward";
  check_procedural_backward_inputs(op, grad_y, indices, gates, seed, layer, num_experts, d_ffn, hidden, order,
                                   offsets);
  c10::cuda::CUDAGuard guard(grad_y.device());
  const auto src = procedural_source(seed, layer, num_experts, grad_y.size(1), d_ffn, grad_y.options(),
                                     c10::cuda::getCurrentCUDAStream());
  return experts_backward_cuda_impl(op, grad_y, indices, gates, src, num_experts, d_ffn, hidden, need_grad_x,
                                    need_grad_gates);
}

void fill_expert_weights_cuda(at::Tensor& w1, at::Tensor& b1, at::Tensor& w2, at::Tensor& b2, int64_t seed,
                              int64_t layer, int64_t first_expert) {
  const char* op = "some.fill_expert_weights";
  check_fill_expert_weights_inputs(op, w1, b1, w2, b2, seed, layer, first_expert);
  c10::cuda::CUDAGuard guard(w1.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t h = w1.size(1), d = w1.size(2);
  const auto s = static_cast<uint32_t>(seed), l = static_cast<uint32_t>(layer);
  fill_expert_tensor(w1, first_expert, s, l, philox::kTensorW1, d, stream);
  fill_expert_tensor(b1, first_expert, s, l, philox::kTensorB1, d, stream);
  fill_expert_tensor(w2, first_expert, s, l, philox::kTensorW2, h, stream);
  fill_expert_tensor(b2, first_expert, s, l, philox::kTensorB2, h, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(some, CUDA, m) {
  m.impl("experts", &experts_cuda);
  m.impl("experts_backward", &experts_backward_cuda);
  m.impl("procedural_experts", &procedural_experts_cuda);
  m.impl("procedural_experts_backward", &procedural_experts_backward_cuda);
  m.impl("fill_expert_weights", &fill_expert_weights_cuda);
}

}  // namespace gpu
}  // namespace some
