// Autograd-key kernels.
// - batch_norm_train, the training forward every module call runs: a C++ autograd function, so
//   that a training step pays no Python on the way in or out (about 25 us a forward+backward).
//   Its backward runs batch_norm_backward below autograd, unless the graph of the backward is
//   being built (create_graph): then through autograd, whose formula is in bn_ext/_autograd.py.
// - batch_norm_elemt, the eval forward: a C++ autograd function too (2.5 us a call less than
//   the Python autograd kernel it replaces, which ran even under no_grad).
// - Neither builds an autograd node where no graph is recorded (grad mode off or no operand
//   requiring grad): the op is called straight below autograd.
// - batch_norm_train_update, the module's training forward: batch_norm_train's autograd function
//   with the running-stat update inside its forward, before the save.
// - The ops that have no derivative: the running-stat updates (they write buffers) and the two
//   halves of the backward (used inside backward formulas). They skip the autograd and
//   in-place/view layers, then do those layers' one job for a mutating op: bump the version
//   counter of every tensor written. Being explicit here keeps these ops off torch's generic
//   not-implemented fallbacks.
// The other differentiable ops get autograd from bn_ext/_autograd.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>

#include "bn_ext/ops.h"

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
  {
    c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
    ops::update_running_stats_op().call(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                                        std::move(count));
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
}

std::tuple<Tensor, Tensor, Tensor> gather_stats_autograd(const Tensor& stats, const c10::optional<Tensor>& running_mean,
                                                         const c10::optional<Tensor>& running_var,
                                                         const c10::optional<Tensor>& num_batches_tracked,
                                                         c10::optional<double> momentum) {
  std::tuple<Tensor, Tensor, Tensor> out;
  {
    c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
    out = ops::gather_stats_op().call(stats, running_mean, running_var, num_batches_tracked, momentum);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

std::tuple<Tensor, Tensor> backward_reduce_autograd(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return ops::backward_reduce_op().call(grad_out, input, mean);
}

Tensor backward_elemt_autograd(const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight,
                               const Tensor& mean, const Tensor& var, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                               double eps, c10::SymInt count) {
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return ops::backward_elemt_op().call(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, std::move(count));
}

// The two forward ops called below autograd: by their autograd functions' forward, and for the
// whole call where no graph is recorded (train_autograd, elemt_autograd).
std::tuple<Tensor, Tensor, Tensor> train_below_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                                                        const c10::optional<Tensor>& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return ops::train_op().call(input, weight, bias, eps);
}

Tensor elemt_below_autograd(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                            const Tensor& mean, const Tensor& var, double eps) {
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return ops::elemt_op().call(input, weight, bias, mean, var, eps);
}

// The parts of the two autograd functions below that are the same. Both save (input, weight or
// an undefined tensor, mean, var) and eps, and where the gradient edges of weight and bias are:
// input is edge 0, and each of weight and bias that is given takes the next. Returns the next
// free edge.
int64_t save_for_backward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                          const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, const Tensor& mean,
                          const Tensor& var, double eps) {
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->save_for_backward({input, has_weight ? *weight : Tensor(), mean, var});
  ctx->saved_data["eps"] = eps;
  int64_t edge = 1;
  ctx->saved_data["weight_edge"] = has_weight ? edge++ : int64_t(-1);
  ctx->saved_data["bias_edge"] = has_bias ? edge++ : int64_t(-1);
  ctx->saved_data["bias_dtype"] = has_bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
  return edge;
}

// Whether the edge saved under `name` (-1: that tensor was not given) needs a gradient.
bool needs_grad(torch::autograd::AutogradContext* ctx, const char* name) {
  const int64_t edge = ctx->saved_data[name].toInt();
  return edge >= 0 && ctx->needs_input_grad(edge);
}

// batch_norm_backward over what save_for_backward saved: below autograd, unless the graph of the
// backward is being built (create_graph), where it must be differentiable itself.
// `saved` is ctx->get_saved_variables(), unpacked once by the caller.
std::tuple<Tensor, Tensor, Tensor> saved_backward(torch::autograd::AutogradContext* ctx,
                                                  const torch::autograd::variable_list& saved, const Tensor& grad_out,
                                                  bool training, std::array<bool, 3> mask) {
  const auto& op = ops::backward_op();
  const c10::optional<Tensor> weight = saved[1].defined() ? c10::optional<Tensor>(saved[1]) : c10::nullopt;
  const double eps = ctx->saved_data["eps"].toDouble();
  if (c10::GradMode::is_enabled()) return op.call(grad_out, saved[0], weight, saved[2], saved[3], eps, training, mask);
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return op.call(grad_out, saved[0], weight, saved[2], saved[3], eps, training, mask);
}

Tensor saved_bias_grad(torch::autograd::AutogradContext* ctx, const Tensor& grad_bias) {
  return grad_bias.to(static_cast<c10::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                                                const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                                                double eps) {
    Tensor output, mean, var;
    std::tie(output, mean, var) = train_below_autograd(input, weight, bias, eps);
    save_for_backward(ctx, input, weight, bias, mean, var, eps);
    ctx->mark_non_differentiable({mean, var});
    return {output, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), needs_grad(ctx, "weight_edge"),
                                      needs_grad(ctx, "bias_edge")};
    torch::autograd::variable_list out(4);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const auto g = saved_backward(ctx, ctx->get_saved_variables(), grads[0], /*training=*/true, mask);
    if (mask[0]) out[0] = std::get<0>(g);
    if (mask[1]) out[1] = std::get<1>(g);
    if (mask[2]) out[2] = saved_bias_grad(ctx, std::get<2>(g));
    return out;
  }
};

// Whether a call records a graph: grad mode on and some operand requiring grad. Where it does
// not (eval under no_grad, most benchmarks, inference without inference_mode), the autograd
// kernels call the op straight below autograd, without building an autograd node (about 1 us).
bool records_graph(std::initializer_list<const Tensor*> tensors,
                   std::initializer_list<const c10::optional<Tensor>*> optional_tensors) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors)
    if (t->requires_grad()) return true;
  for (const auto* t : optional_tensors)
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) return true;
  return false;
}

std::tuple<Tensor, Tensor, Tensor> train_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                                                  const c10::optional<Tensor>& bias, double eps) {
  if (!records_graph({&input}, {&weight, &bias})) return train_below_autograd(input, weight, bias, eps);
  auto out = TrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> train_update_below_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                                                               const c10::optional<Tensor>& bias,
                                                               const c10::optional<Tensor>& running_mean,
                                                               const c10::optional<Tensor>& running_var,
                                                               const c10::optional<Tensor>& num_batches_tracked,
                                                               c10::optional<double> momentum, double eps) {
  std::tuple<Tensor, Tensor, Tensor> out;
  {
    c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
    out =
        ops::train_update_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

// batch_norm_train_update: TrainFunction's forward with the running-stat update before the save,
// and its backward (the buffers take no gradient).
class TrainUpdateFunction : public torch::autograd::Function<TrainUpdateFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                                                const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                                                const c10::optional<Tensor>& running_mean,
                                                const c10::optional<Tensor>& running_var,
                                                const c10::optional<Tensor>& num_batches_tracked,
                                                c10::optional<double> momentum, double eps) {
    Tensor output, mean, var;
    std::tie(output, mean, var) =
        train_update_below_autograd(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
    save_for_backward(ctx, input, weight, bias, mean, var, eps);
    ctx->mark_non_differentiable({mean, var});
    return {output, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto out = TrainFunction::backward(ctx, std::move(grads));
    out.resize(8);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> train_update_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                                                         const c10::optional<Tensor>& bias,
                                                         const c10::optional<Tensor>& running_mean,
                                                         const c10::optional<Tensor>& running_var,
                                                         const c10::optional<Tensor>& num_batches_tracked,
                                                         c10::optional<double> momentum, double eps) {
  if (!records_graph({&input}, {&weight, &bias}))
    return train_update_below_autograd(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                       eps);
  auto out =
      TrainUpdateFunction::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  return {out[0], out[1], out[2]};
}

// batch_norm_elemt (eval: normalise with given statistics), differentiable in all five tensors.
// Its backward is batch_norm_backward with training=False, plus the two statistics' terms:
// d/dmean = -w * invstd * sum(dy) and d/dvar = -w/2 * invstd^3 * sum(dy * (x - mean)), where
// batch_norm_backward's grad_weight is invstd * sum(dy * (x - mean)) and its grad_bias sum(dy).
class ElemtFunction : public torch::autograd::Function<ElemtFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps) {
    const Tensor output = elemt_below_autograd(input, weight, bias, mean, var, eps);
    // mean and var take the edges after weight and bias
    ctx->saved_data["mean_edge"] = save_for_backward(ctx, input, weight, bias, mean, var, eps);
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t mean_edge = ctx->saved_data["mean_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = needs_grad(ctx, "weight_edge");
    const bool need_b = needs_grad(ctx, "bias_edge");
    const bool need_mean = ctx->needs_input_grad(mean_edge);
    const bool need_var = ctx->needs_input_grad(mean_edge + 1);
    const std::array<bool, 3> mask = {need_x, need_w || need_var, need_b || need_mean};
    torch::autograd::variable_list out(6);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const auto saved = ctx->get_saved_variables();
    const auto g = saved_backward(ctx, saved, grads[0], /*training=*/false, mask);
    const Tensor& weight = saved[1];
    const Tensor& mean = saved[2];
    const Tensor& var = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor& grad_weight = std::get<1>(g);
    const Tensor& grad_bias = std::get<2>(g);
    if (need_mean || need_var) {
      const Tensor invstd = var.to(grad_weight.scalar_type()).add(eps).rsqrt();
      const Tensor w = weight.defined() ? weight.to(grad_weight.scalar_type()) : at::ones_like(invstd);
      if (need_mean) out[3] = w.neg().mul(invstd).mul(grad_bias).to(mean.scalar_type());
      if (need_var) out[4] = w.mul(-0.5).mul(invstd).mul(invstd).mul(grad_weight).to(var.scalar_type());
    }
    if (need_x) out[0] = std::get<0>(g);
    if (need_w) out[1] = grad_weight;
    if (need_b) out[2] = saved_bias_grad(ctx, grad_bias);
    return out;
  }
};

Tensor elemt_autograd(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                      const Tensor& mean, const Tensor& var, double eps) {
  if (!records_graph({&input, &mean, &var}, {&weight, &bias}))
    return elemt_below_autograd(input, weight, bias, mean, var, eps);
  return ElemtFunction::apply(input, weight, bias, mean, var, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, Autograd, m) {
  m.impl("batch_norm_train", &train_autograd);
  m.impl("batch_norm_train_update", &train_update_autograd);
  m.impl("batch_norm_elemt", &elemt_autograd);
  m.impl("batch_norm_update_running_stats", &update_running_stats_autograd);
  m.impl("batch_norm_gather_stats", &gather_stats_autograd);
  m.impl("batch_norm_backward_reduce", &backward_reduce_autograd);
  m.impl("batch_norm_backward_elemt", &backward_elemt_autograd);
}

}  // namespace bn_ext
