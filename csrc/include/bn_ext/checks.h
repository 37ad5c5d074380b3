// Argument checks shared by every device's kernels. Each message names the argument and says
// what was expected, and every check runs before any kernel touches memory, so a failed call
// leaves running statistics and counters exactly as they were.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>

namespace bn_ext {

inline bool is_reduced_float(c10::ScalarType t) {
  return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

// dtype of the batch statistics we return (saved mean/var): float32, or float64 for float64 input.
inline c10::ScalarType stat_dtype(c10::ScalarType input_dtype) {
  return input_dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

inline void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input: expected a tensor, got None");
  TORCH_CHECK(input.dim() >= 2, op, ": input: expected at least 2 dimensions (N, C, ...), got ",
              input.dim(), "-D input of size ", input.sizes());
  const auto t = input.scalar_type();
  TORCH_CHECK(t == c10::ScalarType::Float || t == c10::ScalarType::Double || is_reduced_float(t),
              op, ": input: expected dtype float32, float64, float16 or bfloat16, got ", t);
}

// A per-channel tensor: 1-D, `channels` elements, on the input's device, and of a dtype that
// goes with the input's (the same, or float32 beside float16/bfloat16 input, as PyTorch allows).
inline void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                                 const char* op, bool allow_any_float = false) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1, op, ": ", name, ": expected a 1-D tensor of ", channels,
              " elements, got ", t.dim(), "-D tensor of size ", t.sizes());
  TORCH_CHECK(t.numel() == channels, op, ": ", name, ": expected ", channels,
              " elements (one per channel of input of size ", input.sizes(), "), got ", t.numel());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, ": expected a tensor on ",
              input.device(), " (the input's device), got one on ", t.device());
  const auto it = input.scalar_type();
  const auto tt = t.scalar_type();
  if (allow_any_float) {
    TORCH_CHECK(at::isFloatingType(tt), op, ": ", name, ": expected a floating-point tensor, got ", tt);
    return;
  }
  const bool ok = tt == it || (is_reduced_float(it) && tt == c10::ScalarType::Float);
  TORCH_CHECK(ok, op, ": ", name, ": expected dtype ", it,
              (is_reduced_float(it) ? " or float32" : ""), " to match input of dtype ", it,
              ", got ", tt);
}

inline void check_optional_channel_tensor(const c10::optional<at::Tensor>& t, const char* name,
                                          const at::Tensor& input, const char* op) {
  if (t.has_value() && t->defined()) check_channel_tensor(*t, name, input, op);
}

// Saved statistics (mean, var) handed back to a backward op: 1-D, C elements, same device.
inline void check_stat_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                              const char* op) {
  check_channel_tensor(t, name, input, op, /*allow_any_float=*/true);
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK(!std::isnan(eps), op, ": eps: expected a number, got nan");
  TORCH_CHECK(eps >= 0.0, op, ": eps: expected a non-negative value, got ", eps);
}

inline void check_same_shape(const at::Tensor& a, const char* name, const at::Tensor& input,
                             const char* op) {
  TORCH_CHECK(a.sizes() == input.sizes(), op, ": ", name, ": expected size ", input.sizes(),
              " (the input's), got ", a.sizes());
  TORCH_CHECK(a.device() == input.device(), op, ": ", name, ": expected a tensor on ",
              input.device(), ", got one on ", a.device());
  TORCH_CHECK(a.scalar_type() == input.scalar_type(), op, ": ", name, ": expected dtype ",
              input.scalar_type(), " (the input's), got ", a.scalar_type());
}

}  // namespace bn_ext
