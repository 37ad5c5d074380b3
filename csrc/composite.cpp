// Ops made of other bn_ext ops, one kernel for every backend.
#include <torch/library.h>

#include "bn_ext/checks.h"
#include "bn_ext/ops.h"

namespace bn_ext {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_update(const Tensor& input, const c10::optional<Tensor>& weight,
                                                           const c10::optional<Tensor>& bias,
                                                           const c10::optional<Tensor>& running_mean,
                                                           const c10::optional<Tensor>& running_var,
                                                           const c10::optional<Tensor>& num_batches_tracked,
                                                           c10::optional<double> momentum, double eps) {
  check_train_update_args(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  auto out = ops::batch_norm_train(input, weight, bias, eps);
  const int64_t channels = input.dim() >= 2 ? input.size(1) : 0;
  const int64_t count = channels > 0 ? input.numel() / channels : 0;
  ops::batch_norm_update_running_stats(running_mean, running_var, num_batches_tracked, std::get<1>(out),
                                       std::get<2>(out), momentum, count);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_train_update", &batch_norm_train_update);
}

}  // namespace bn_ext
