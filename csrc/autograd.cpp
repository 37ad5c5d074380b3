// Autograd-key kernels for the ops that have no derivative: the running-stat updates (they write
// buffers) and the two halves of the backward (used inside backward formulas). They skip the
// autograd and in-place/view layers, then do those layers' one job for a mutating op: bump the
// version counter of every tensor written. Being explicit here keeps these ops off torch's
// generic not-implemented fallbacks. Differentiable ops get autograd from bn_ext/_autograd.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>

namespace bn_ext {
namespace {

using at::Tensor;

const c10::DispatchKeySet kAboveBackend = c10::autograd_dispatch_keyset_with_ADInplaceOrView;

// What the in-place/view layer would do for a tensor the op wrote.
void bump_versions(std::initializer_list<const c10::optional<Tensor>*> written) {
  for (const auto* t : written) {
    if (t->has_value() && (*t)->defined() && !(*t)->is_inference()) (*t)->unsafeGetTensorImpl()->bump_version();
  }
}

void update_running_stats_autograd(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                                   const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                   const Tensor& var, c10::optional<double> momentum, c10::SymInt count) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bn_ext::batch_norm_update_running_stats", "")
                       .typed<void(const c10::optional<Tensor>&, const c10::optional<Tensor>&,
                                   const c10::optional<Tensor>&, const Tensor&, const Tensor&, c10::optional<double>,
                                   c10::SymInt)>();
  {
    c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
    op.call(running_mean, running_var, num_batches_tracked, mean, var, momentum, std::move(count));
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
}

std::tuple<Tensor, Tensor, Tensor> gather_stats_autograd(const Tensor& stats,
                                                        const c10::optional<Tensor>& running_mean,
                                                        const c10::optional<Tensor>& running_var,
                                                        const c10::optional<Tensor>& num_batches_tracked,
                                                        c10::optional<double> momentum) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bn_ext::batch_norm_gather_stats", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const c10::optional<Tensor>&,
                                                                 const c10::optional<Tensor>&,
                                                                 const c10::optional<Tensor>&, c10::optional<double>)>();
  std::tuple<Tensor, Tensor, Tensor> out;
  {
    c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
    out = op.call(stats, running_mean, running_var, num_batches_tracked, momentum);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

std::tuple<Tensor, Tensor> backward_reduce_autograd(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bn_ext::batch_norm_backward_reduce", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>();
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return op.call(grad_out, input, mean);
}

Tensor backward_elemt_autograd(const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight,
                               const Tensor& mean, const Tensor& var, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                               double eps, c10::SymInt count) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bn_ext::batch_norm_backward_elemt", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&,
                                     const Tensor&, const Tensor&, const Tensor&, double, c10::SymInt)>();
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return op.call(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, std::move(count));
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, Autograd, m) {
  m.impl("batch_norm_update_running_stats", &update_running_stats_autograd);
  m.impl("batch_norm_gather_stats", &gather_stats_autograd);
  m.impl("batch_norm_backward_reduce", &backward_reduce_autograd);
  m.impl("batch_norm_backward_elemt", &backward_elemt_autograd);
}

}  // namespace bn_ext
