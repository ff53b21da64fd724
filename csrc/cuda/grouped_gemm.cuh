// The hand-written grouped GEMM of the experts kernels (csrc/cuda/experts.cu, its only
// includer): tiles, loads (stored or generated weights), the FMA and WMMA main loops, the
// kernel and its launch. The epilogues it calls are in gemm_epilogues.cuh.
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

#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../philox.h"
#include "common.cuh"

namespace some {
namespace gpu {
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

}  // namespace
}  // namespace gpu
}  // namespace some
