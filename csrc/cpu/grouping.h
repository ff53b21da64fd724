// Grouping of (token, slot) pairs by expert, shared by the expert and
// key-store kernels on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "../checks.h"

namespace some {

// Stable counting sort of the valid (token, slot) pairs by expert; raises on
// an index outside -1..N-1.
inline std::tuple<at::Tensor, at::Tensor> group_by_expert(const char* op, const at::Tensor& indices,
                                                   int64_t N) {
  const auto idx = indices.contiguous();
  const int64_t P = idx.numel();
  const int64_t* I = idx.data_ptr<int64_t>();
  auto offsets = at::zeros({N + 1}, idx.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = I[p];
    TORCH_CHECK_INDEX(e >= -1 && e < N, op, ": indices must be in -1..N-1 = -1..", N - 1,
                      ", found ", e, " at flat position ", p);
    if (e >= 0) ++off[e + 1];
  }
  for (int64_t e = 0; e < N; ++e) off[e + 1] += off[e];
  // Unused tail entries (the -1 slots) are marked -1 so the output is fully defined.
  auto order = at::full({P}, -1, idx.options());
  int64_t* ord = order.data_ptr<int64_t>();
  std::vector<int64_t> cursor(off, off + N);
  for (int64_t p = 0; p < P; ++p)
    if (I[p] >= 0) ord[cursor[I[p]]++] = p;
  return {order, offsets};
}

// The grouping passed to a backward is exactly the one the forward makes for
// `indices`: offsets start at 0, never decrease and end at the number of
// valid pairs; order[offsets[e] .. offsets[e + 1]) lists, in increasing
// order, every pair whose index is e. (Stale or foreign tensors would read
// and write out of bounds; checking costs one pass over the pairs.)
inline void check_grouping(const char* op, const at::Tensor& indices, const int64_t* ord, const int64_t* off,
                           int64_t N) {
  const auto idx = indices.contiguous();
  const int64_t P = idx.numel();
  const int64_t* I = idx.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK_INDEX(I[p] >= -1 && I[p] < N, op, ": indices must be in -1..N-1 = -1..", N - 1, ", found ",
                      I[p], " at flat position ", p);
    valid += I[p] >= 0;
  }
  bool ok = off[0] == 0 && off[N] == valid;
  for (int64_t e = 0; e < N && ok; ++e) {
    ok = off[e + 1] >= off[e];
    for (int64_t r = off[e]; r < off[e + 1] && ok; ++r)
      ok = ord[r] >= 0 && ord[r] < P && I[ord[r]] == e && (r == off[e] || ord[r] > ord[r - 1]);
  }
  TORCH_CHECK_VALUE(ok, op, ": 'order'/'offsets' are not the grouping of these indices by expert; pass the "
                    "tensors returned by the forward op");
}

}  // namespace some
