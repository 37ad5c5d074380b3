// The bn_ext operators for C++ callers: one typed dispatcher handle per op (schemas in
// csrc/bn_ext.cpp), and a function calling it through the whole dispatcher, as torch.ops.bn_ext
// does from Python. The autograd kernels call the handles below autograd themselves.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace bn_ext {
namespace ops {

using at::Tensor;
using OptionalTensor = c10::optional<Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

using StatsFn = Tensor2(const Tensor& input, c10::optional<at::ScalarType> dtype);
using ElemtFn = Tensor(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                       const Tensor& mean, const Tensor& var, double eps);
using TrainFn = Tensor3(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, double eps);
using TrainUpdateFn = Tensor3(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& running_mean, const OptionalTensor& running_var,
                              const OptionalTensor& num_batches_tracked, c10::optional<double> momentum, double eps);
using BackwardReduceFn = Tensor2(const Tensor& grad_out, const Tensor& input, const Tensor& mean);
using BackwardElemtFn = Tensor(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                               const Tensor& mean, const Tensor& var, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                               double eps, c10::SymInt count);
using BackwardFn = Tensor3(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                           const Tensor& mean, const Tensor& var, double eps, bool training,
                           std::array<bool, 3> output_mask);
using UpdateRunningStatsFn = void(const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                  const OptionalTensor& num_batches_tracked, const Tensor& mean, const Tensor& var,
                                  c10::optional<double> momentum, c10::SymInt count);
using GatherStatsFn = Tensor3(const Tensor& stats, const OptionalTensor& running_mean,
                              const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                              c10::optional<double> momentum);
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using ActFn = Tensor(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& residual, const Tensor& mean, const Tensor& var, double eps,
                     c10::string_view activation, double negative_slope);
using ActTrainFn = Tensor3(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& residual, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                           c10::optional<double> momentum, double eps, c10::string_view activation,
                           double negative_slope);
using ActBackwardFn = Tensor4(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                              const OptionalTensor& bias, const OptionalTensor& residual, const Tensor& mean,
                              const Tensor& var, double eps, bool training, c10::string_view activation,
                              double negative_slope, std::array<bool, 4> output_mask);

// The typed handle of op `name` (looked up once; the library must be loaded).
#define BN_EXT_OP_HANDLE(handle, Fn, name)                                                       \
  inline const c10::TypedOperatorHandle<Fn>& handle() {                                          \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>(); \
    return op;                                                                                   \
  }
BN_EXT_OP_HANDLE(stats_op, StatsFn, "bn_ext::batch_norm_stats")
BN_EXT_OP_HANDLE(elemt_op, ElemtFn, "bn_ext::batch_norm_elemt")
BN_EXT_OP_HANDLE(train_op, TrainFn, "bn_ext::batch_norm_train")
BN_EXT_OP_HANDLE(train_update_op, TrainUpdateFn, "bn_ext::batch_norm_train_update")
BN_EXT_OP_HANDLE(backward_reduce_op, BackwardReduceFn, "bn_ext::batch_norm_backward_reduce")
BN_EXT_OP_HANDLE(backward_elemt_op, BackwardElemtFn, "bn_ext::batch_norm_backward_elemt")
BN_EXT_OP_HANDLE(backward_op, BackwardFn, "bn_ext::batch_norm_backward")
BN_EXT_OP_HANDLE(update_running_stats_op, UpdateRunningStatsFn, "bn_ext::batch_norm_update_running_stats")
BN_EXT_OP_HANDLE(gather_stats_op, GatherStatsFn, "bn_ext::batch_norm_gather_stats")
BN_EXT_OP_HANDLE(act_op, ActFn, "bn_ext::batch_norm_act")
BN_EXT_OP_HANDLE(act_train_op, ActTrainFn, "bn_ext::batch_norm_act_train")
BN_EXT_OP_HANDLE(act_backward_op, ActBackwardFn, "bn_ext::batch_norm_act_backward")
#undef BN_EXT_OP_HANDLE

inline Tensor2 batch_norm_stats(const Tensor& input, c10::optional<at::ScalarType> dtype = c10::nullopt) {
  return stats_op().call(input, dtype);
}

inline Tensor batch_norm_elemt(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               const Tensor& mean, const Tensor& var, double eps) {
  return elemt_op().call(input, weight, bias, mean, var, eps);
}

inline Tensor3 batch_norm_train(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                double eps) {
  return train_op().call(input, weight, bias, eps);
}

inline Tensor3 batch_norm_train_update(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                       const OptionalTensor& num_batches_tracked, c10::optional<double> momentum,
                                       double eps) {
  return train_update_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
}

inline Tensor2 batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  return backward_reduce_op().call(grad_out, input, mean);
}

inline Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                                        const Tensor& mean, const Tensor& var, const Tensor& sum_dy,
                                        const Tensor& sum_dy_xmu, double eps, c10::SymInt count) {
  return backward_elemt_op().call(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, std::move(count));
}

inline Tensor3 batch_norm_backward(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                                   const Tensor& mean, const Tensor& var, double eps, bool training,
                                   std::array<bool, 3> output_mask) {
  return backward_op().call(grad_out, input, weight, mean, var, eps, training, output_mask);
}

inline void batch_norm_update_running_stats(const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                            const OptionalTensor& num_batches_tracked, const Tensor& mean,
                                            const Tensor& var, c10::optional<double> momentum, c10::SymInt count) {
  update_running_stats_op().call(running_mean, running_var, num_batches_tracked, mean, var, momentum, std::move(count));
}

inline Tensor3 batch_norm_gather_stats(const Tensor& stats, const OptionalTensor& running_mean,
                                       const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                                       c10::optional<double> momentum) {
  return gather_stats_op().call(stats, running_mean, running_var, num_batches_tracked, momentum);
}

inline Tensor batch_norm_act(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& residual, const Tensor& mean, const Tensor& var, double eps,
                             c10::string_view activation, double negative_slope) {
  return act_op().call(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
}

inline Tensor3 batch_norm_act_train(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                    const OptionalTensor& residual, const OptionalTensor& running_mean,
                                    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                                    c10::optional<double> momentum, double eps, c10::string_view activation,
                                    double negative_slope) {
  return act_train_op().call(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
                             eps, activation, negative_slope);
}

inline Tensor4 batch_norm_act_backward(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight,
                                       const OptionalTensor& bias, const OptionalTensor& residual, const Tensor& mean,
                                       const Tensor& var, double eps, bool training, c10::string_view activation,
                                       double negative_slope, std::array<bool, 4> output_mask) {
  return act_backward_op().call(grad_out, input, weight, bias, residual, mean, var, eps, training, activation,
                                negative_slope, output_mask);
}

}  // namespace ops
}  // namespace bn_ext
