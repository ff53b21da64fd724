// Input validation shared by every SoME op (CPU and CUDA host code).
//
// Each check raises the Python exception a user would expect (ValueError for
// bad values and shapes, TypeError for dtypes, IndexError for out-of-range
// indices) with a message that names the op, the argument and what was wrong,
// so a bad call never reaches a kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace some {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is undefined");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": '", name, "' must be ", dim, "-D, got shape ",
                    shape_str(t));
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d,
                       int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, op, ": '", name, "' has shape ", shape_str(t),
                    " but dimension ", d, " must equal ", what, " = ", expected);
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op, ": '",
                   name, "' must be float32, float64 or bfloat16, got ", st);
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": '", name, "' must be ", expected,
                   ", got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": '", name, "' has dtype ",
                   t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type(),
                   "; they must match");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(),
                    " but '", ref_name, "' is on ", ref.device(),
                    "; all tensors must be on the same device");
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": '", name,
                    "' must be contiguous (call .contiguous() first)");
}

// Every expert index in -1..N-1 (CPU tensors: reads the values).
inline void check_index_range(const char* op, const at::Tensor& indices, int64_t N) {
  const auto idx = indices.contiguous();
  const int64_t* I = idx.data_ptr<int64_t>();
  for (int64_t p = 0; p < idx.numel(); ++p)
    TORCH_CHECK_INDEX(I[p] >= -1 && I[p] < N, op, ": indices must be in -1..N-1 = -1..", N - 1, ", found ", I[p],
                      " at flat position ", p);
}

// Whether value checks that need a host synchronization on a GPU (expert indices in range,
// a finite selection bias) run there too: SOME_CHECK_INDICES=1 (opt-in; the CPU always checks).
inline bool device_value_checks_requested() {
  const char* v = std::getenv("SOME_CHECK_INDICES");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// The accumulation type of the key-store statistics for a query dtype:
// float64 stays float64, float32 and bfloat16 accumulate in float32.
inline at::ScalarType stats_dtype(at::ScalarType query_dtype) {
  return query_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Parsed gating mode (docs/method.md §3). The op schema takes a string so that the
// Python API reads naturally; every kernel works on this enum.
enum class Gating { Softmax, Sigmoid, Relu, AvgK, TopP, TopAny };

inline Gating parse_gating(const char* op, c10::string_view name) {
  if (name == "softmax") return Gating::Softmax;
  if (name == "sigmoid") return Gating::Sigmoid;
  if (name == "relu") return Gating::Relu;
  if (name == "avg_k") return Gating::AvgK;
  if (name == "top_p") return Gating::TopP;
  if (name == "top_any") return Gating::TopAny;
  TORCH_CHECK_VALUE(false, op, ": unknown gating '", std::string(name),
                    "'; expected one of softmax, sigmoid, relu, avg_k, top_p, top_any");
}

inline bool parse_score_mode(const char* op, c10::string_view name) {
  if (name == "cosine") return true;
  if (name == "dot") return false;
  TORCH_CHECK_VALUE(false, op, ": unknown score_mode '", std::string(name),
                    "'; expected 'cosine' or 'dot'");
}

}  // namespace some
