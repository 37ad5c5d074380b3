// Argument checks shared by every device's kernels. Each message names the argument and says
// what was expected, and every check runs before any kernel touches memory, so a failed call
// leaves running statistics and counters exactly as they were.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "bn_ext/activation.h"

#include <cmath>
#include <string>

namespace bn_ext {

// "[4, 3, 5]": sizes for error messages, formatted here rather than by streaming an IntArrayRef
// (which crashed the process on one torch 2.11 + GCC toolchain: see the README).
inline std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

inline bool is_reduced_float(c10::ScalarType t) { return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16; }

// dtype of the batch statistics we return (saved mean/var): float32, or float64 for float64 input.
inline c10::ScalarType stat_dtype(c10::ScalarType input_dtype) {
  return input_dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

inline void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input: expected a tensor, got None");
  TORCH_CHECK(input.dim() >= 2, op, ": input: expected at least 2 dimensions (N, C, ...), got ", input.dim(),
              "-D input of size ", shape_str(input));
  const auto t = input.scalar_type();
  TORCH_CHECK(t == c10::ScalarType::Float || t == c10::ScalarType::Double || is_reduced_float(t), op,
              ": input: expected dtype float32, float64, float16 or bfloat16, got ", t);
}

// A per-channel tensor: 1-D, `channels` elements, on the input's device, and of a dtype that
// goes with the input's (the same, or float32 beside float16/bfloat16 input, as PyTorch allows).
inline void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input, const char* op,
                                 bool allow_any_float = false) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1, op, ": ", name, ": expected a 1-D tensor of ", channels, " elements, got ", t.dim(),
              "-D tensor of size ", shape_str(t));
  TORCH_CHECK(t.numel() == channels, op, ": ", name, ": expected ", channels,
              " elements (one per channel of input of size ", shape_str(input), "), got ", t.numel());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, ": expected a tensor on ", input.device(),
              " (the input's device), got one on ", t.device());
  const auto it = input.scalar_type();
  const auto tt = t.scalar_type();
  if (allow_any_float) {
    TORCH_CHECK(at::isFloatingType(tt), op, ": ", name, ": expected a floating-point tensor, got ", tt);
    return;
  }
  const bool ok = tt == it || (is_reduced_float(it) && tt == c10::ScalarType::Float);
  TORCH_CHECK(ok, op, ": ", name, ": expected dtype ", it, (is_reduced_float(it) ? " or float32" : ""),
              " to match input of dtype ", it, ", got ", tt);
}

inline void check_optional_channel_tensor(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                                          const char* op) {
  if (t.has_value() && t->defined()) check_channel_tensor(*t, name, input, op);
}

// Saved statistics (mean, var) handed back to a backward op: 1-D, C elements, same device.
inline void check_stat_tensor(const at::Tensor& t, const char* name, const at::Tensor& input, const char* op) {
  check_channel_tensor(t, name, input, op, /*allow_any_float=*/true);
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK(!std::isnan(eps), op, ": eps: expected a number, got nan");
  TORCH_CHECK(eps >= 0.0, op, ": eps: expected a non-negative value, got ", eps);
}

inline void check_same_shape(const at::Tensor& a, const char* name, const at::Tensor& input, const char* op) {
  TORCH_CHECK(a.sizes() == input.sizes(), op, ": ", name, ": expected size ", shape_str(input), " (the input's), got ",
              shape_str(a));
  TORCH_CHECK(a.device() == input.device(), op, ": ", name, ": expected a tensor on ", input.device(), ", got one on ",
              a.device());
  TORCH_CHECK(a.scalar_type() == input.scalar_type(), op, ": ", name, ": expected dtype ", input.scalar_type(),
              " (the input's), got ", a.scalar_type());
}

inline void check_affine(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& input, const char* op) {
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
}

inline void check_running(const c10::optional<at::Tensor>& t, const char* name, int64_t channels,
                          const at::Device& device, const char* op) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == channels, op, ": ", name, ": expected a 1-D tensor of ", channels,
              " elements (one per channel), got size ", shape_str(*t));
  TORCH_CHECK(t->device() == device, op, ": ", name, ": expected a tensor on ", device, ", got one on ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, ": expected a floating-point tensor, got ",
              t->scalar_type());
}

// One function per op: what it checks before any kernel runs, the same on every device.

inline c10::ScalarType check_stats_args(const at::Tensor& input, c10::optional<c10::ScalarType> dtype) {
  const char* op = "bn_ext.batch_norm_stats";
  check_input(input, op);
  const auto def = stat_dtype(input.scalar_type());
  if (!dtype.has_value()) return def;
  TORCH_CHECK(*dtype == def || *dtype == c10::ScalarType::Double, op,
              ": dtype: expected None (the default statistics dtype) or float64, got ", *dtype);
  return *dtype;
}

inline void check_elemt_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                             double eps) {
  const char* op = "bn_ext.batch_norm_elemt";
  check_input(input, op);
  check_affine(weight, bias, input, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(var, "var", input, op);
  check_eps(eps, op);
}

inline void check_train_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps) {
  const char* op = "bn_ext.batch_norm_train";
  check_input(input, op);
  check_affine(weight, bias, input, op);
  check_eps(eps, op);
}

inline void check_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean) {
  const char* op = "bn_ext.batch_norm_backward_reduce";
  check_input(input, op);
  check_same_shape(grad_out, "grad_out", input, op);
  check_stat_tensor(mean, "mean", input, op);
}

// What every backward op takes: grad_out like input, optional weight, the saved statistics.
inline void check_grad_args(const at::Tensor& grad_out, const at::Tensor& input,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
                            double eps, const char* op) {
  check_input(input, op);
  check_same_shape(grad_out, "grad_out", input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(var, "var", input, op);
  check_eps(eps, op);
}

inline void check_backward_elemt_args(const at::Tensor& grad_out, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& var, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                      double eps, int64_t count) {
  const char* op = "bn_ext.batch_norm_backward_elemt";
  check_grad_args(grad_out, input, weight, mean, var, eps, op);
  check_stat_tensor(sum_dy, "sum_dy", input, op);
  check_stat_tensor(sum_dy_xmu, "sum_dy_xmu", input, op);
  TORCH_CHECK(count > 0 || input.numel() == 0, op, ": count: expected a positive element count, got ", count);
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
                                double eps) {
  check_grad_args(grad_out, input, weight, mean, var, eps, "bn_ext.batch_norm_backward");
}

// num_batches_tracked and momentum, as the running-stat updates take them.
inline void check_counter_and_momentum(const c10::optional<at::Tensor>& num_batches_tracked,
                                       c10::optional<double> momentum, const at::Tensor& like, const char* op) {
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (has_nbt) {
    const at::Tensor& nbt = *num_batches_tracked;
    TORCH_CHECK(nbt.numel() == 1 && nbt.scalar_type() == at::kLong, op,
                ": num_batches_tracked: expected a one-element int64 tensor, got ", nbt.scalar_type(), " of size ",
                shape_str(nbt));
    TORCH_CHECK(nbt.device() == like.device(), op, ": num_batches_tracked: expected a tensor on ", like.device(),
                ", got one on ", nbt.device());
  }
  TORCH_CHECK(momentum.has_value() || has_nbt, op,
              ": momentum: None (cumulative average) needs num_batches_tracked, got None for both");
  // The cumulative average divides by the count after this batch: a negative count would write
  // Inf or NaN into the running stats. Read where it is free (CPU); bn_ext/functional.py checks
  // the other devices' counters.
  if (!momentum.has_value() && num_batches_tracked->is_cpu()) {
    const int64_t n = num_batches_tracked->item<int64_t>();
    TORCH_CHECK(n >= 0, op,
                ": num_batches_tracked: expected a non-negative count with momentum=None (cumulative "
                "average), got ",
                n);
  }
  if (momentum.has_value()) TORCH_CHECK(!std::isnan(*momentum), op, ": momentum: expected a number or None, got nan");
}

// Everything batch_norm_update_running_stats needs, checked before it writes anything.
inline void check_update_running_stats(const c10::optional<at::Tensor>& running_mean,
                                       const c10::optional<at::Tensor>& running_var,
                                       const c10::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                                       const at::Tensor& var, c10::optional<double> momentum, int64_t count) {
  const char* op = "bn_ext.batch_norm_update_running_stats";
  TORCH_CHECK(mean.dim() == 1, op, ": mean: expected a 1-D tensor, got size ", shape_str(mean));
  TORCH_CHECK(var.sizes() == mean.sizes(), op, ": var: expected size ", shape_str(mean), " (the mean's), got ",
              shape_str(var));
  TORCH_CHECK(at::isFloatingType(mean.scalar_type()) && at::isFloatingType(var.scalar_type()), op,
              ": mean, var: expected floating-point tensors");
  check_running(running_mean, "running_mean", mean.numel(), mean.device(), op);
  check_running(running_var, "running_var", mean.numel(), mean.device(), op);
  check_counter_and_momentum(num_batches_tracked, momentum, mean, op);
  TORCH_CHECK(count >= 0, op, ": count: expected a non-negative element count, got ", count);
}

// The gathered table of per-rank statistics: one row per rank, [count, mean (C), var (C)].
// Returns C.
inline int64_t check_gather_stats(const at::Tensor& stats, const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var,
                                  const c10::optional<at::Tensor>& num_batches_tracked,
                                  c10::optional<double> momentum) {
  const char* op = "bn_ext.batch_norm_gather_stats";
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) >= 1 && stats.size(1) % 2 == 1, op,
              ": stats: expected a 2-D tensor with a row per rank of 2 * C + 1 values "
              "([count, mean (C), var (C)]), got size ",
              shape_str(stats));
  TORCH_CHECK(stats.scalar_type() == at::kDouble || stats.scalar_type() == at::kFloat, op,
              ": stats: expected dtype float64 or float32, got ", stats.scalar_type());
  const int64_t C = (stats.size(1) - 1) / 2;
  check_running(running_mean, "running_mean", C, stats.device(), op);
  check_running(running_var, "running_var", C, stats.device(), op);
  check_counter_and_momentum(num_batches_tracked, momentum, stats, op);
  return C;
}

// batch_norm_train_update: the train op's arguments and the buffers the update will write, all
// checked before the statistics pass, so a bad buffer costs no pass.
inline void check_train_update_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& running_mean,
                                    const c10::optional<at::Tensor>& running_var,
                                    const c10::optional<at::Tensor>& num_batches_tracked,
                                    c10::optional<double> momentum, double eps) {
  const char* op = "bn_ext.batch_norm_train_update";
  check_input(input, op);
  check_affine(weight, bias, input, op);
  check_eps(eps, op);
  check_running(running_mean, "running_mean", input.size(1), input.device(), op);
  check_running(running_var, "running_var", input.size(1), input.device(), op);
  check_counter_and_momentum(num_batches_tracked, momentum, input, op);
}

// The fused ops' common arguments: input, weight and bias as batch_norm_train takes them, a
// residual like the input, eps and the activation. Returns the activation.
inline Act check_act_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, double eps,
                          const std::string& activation, double negative_slope, const char* op) {
  check_input(input, op);
  check_affine(weight, bias, input, op);
  if (residual.has_value() && residual->defined()) check_same_shape(*residual, "residual", input, op);
  check_eps(eps, op);
  TORCH_CHECK(!std::isnan(negative_slope), op, ": negative_slope: expected a number, got nan");
  return parse_activation(activation, op);
}

inline bool is_given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// batch_norm_act_train: check_act_args, and the buffers it will update where any is given.
inline Act check_act_train_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var,
                                const c10::optional<at::Tensor>& num_batches_tracked, c10::optional<double> momentum,
                                double eps, const std::string& activation, double negative_slope) {
  const char* op = "bn_ext.batch_norm_act_train";
  const Act act = check_act_args(input, weight, bias, residual, eps, activation, negative_slope, op);
  if (is_given(running_mean) || is_given(running_var) || is_given(num_batches_tracked)) {
    check_running(running_mean, "running_mean", input.size(1), input.device(), op);
    check_running(running_var, "running_var", input.size(1), input.device(), op);
    check_counter_and_momentum(num_batches_tracked, momentum, input, op);
  }
  return act;
}

}  // namespace bn_ext
