// The fused ops (batch_norm_act, batch_norm_act_train, batch_norm_act_backward): their autograd
// kernels, and a kernel for every backend without a fused one of its own (CUDA today), made of
// the bn_ext BatchNorm ops and ATen's activations. The CPU kernels are in cpu/.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "bn_ext/activation.h"
#include "bn_ext/checks.h"
#include "bn_ext/layout.h"
#include "bn_ext/ops.h"

namespace bn_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// Composed kernels: correct on any device and graph-capturable, but each step is its own pass.

void activate_(Tensor& y, Act act, double slope) {
  switch (act) {
    case Act::kRelu:
      at::relu_(y);
      break;
    case Act::kRelu6:
      at::hardtanh_(y, 0.0, 6.0);
      break;
    case Act::kLeakyRelu:
      at::leaky_relu_(y, slope);
      break;
    case Act::kSilu:
      at::silu_(y);
      break;
    case Act::kIdentity:
      break;
  }
}

// grad_out * act'(z), by ATen's own activation backward functions.
Tensor activation_backward(const Tensor& grad_out, const Tensor& z, Act act, double slope) {
  switch (act) {
    case Act::kRelu:
      return at::threshold_backward(grad_out, z, 0.0);
    case Act::kRelu6:
      return at::hardtanh_backward(grad_out, z, 0.0, 6.0);
    case Act::kLeakyRelu:
      return at::leaky_relu_backward(grad_out, z, slope, /*self_is_result=*/false);
    case Act::kSilu:
      return at::silu_backward(grad_out, z);
    case Act::kIdentity:
      break;
  }
  return grad_out;
}

// z = BN(input) + residual with the given statistics.
Tensor pre_activation(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                      const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps) {
  Tensor z = ops::batch_norm_elemt(input, weight, bias, mean, var, eps);
  if (is_given(residual)) z.add_(*residual);
  return z;
}

Tensor act_composed(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                    const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps,
                    c10::string_view activation, double negative_slope) {
  const char* op = "bn_ext.batch_norm_act";
  const Act act = check_act_args(input, weight, bias, residual, eps, std::string(activation), negative_slope, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(var, "var", input, op);
  Tensor y = pre_activation(input, weight, bias, residual, mean, var, eps);
  activate_(y, act, negative_slope);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> act_train_composed(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps, c10::string_view activation, double negative_slope) {
  const Act act = check_act_train_args(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                       momentum, eps, std::string(activation), negative_slope);
  Tensor mean, var;
  std::tie(mean, var) = ops::batch_norm_stats(input, at::kDouble);
  if (is_given(running_mean) || is_given(running_var) || is_given(num_batches_tracked)) {
    const int64_t count = input.size(1) > 0 ? input.numel() / input.size(1) : 0;
    ops::batch_norm_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  }
  Tensor y = pre_activation(input, weight, bias, residual, mean, var, eps);
  activate_(y, act, negative_slope);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> act_backward_composed(
    const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  const char* op = "bn_ext.batch_norm_act_backward";
  const Act act = check_act_args(input, weight, bias, residual, eps, std::string(activation), negative_slope, op);
  check_same_shape(grad_out, "grad_out", input, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(var, "var", input, op);
  const Tensor dz = act == Act::kIdentity
                        ? grad_out
                        : activation_backward(grad_out, pre_activation(input, weight, bias, residual, mean, var, eps),
                                              act, negative_slope);
  Tensor grad_input, grad_weight, grad_bias;
  std::tie(grad_input, grad_weight, grad_bias) = ops::batch_norm_backward(
      dz, input, weight, mean, var, eps, training, {output_mask[0], output_mask[1], output_mask[2]});
  const auto stat = stat_dtype(input.scalar_type());
  if (output_mask[2] && is_given(bias)) grad_bias = grad_bias.to(bias->scalar_type());
  if (!output_mask[2]) grad_bias = at::empty({0}, input.options().dtype(is_given(bias) ? bias->scalar_type() : stat));
  const bool need_dres = output_mask[3] && is_given(residual);
  Tensor grad_residual = at::empty({0}, input.options());
  if (need_dres) {
    // dz follows grad_out's layout where they differ, and is grad_out itself for the identity
    grad_residual = output_like(dz, input, /*own=*/!dz.is_same(grad_out));
  }
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// ---------------------------------------------------------------------------------------------
// Autograd. Both forward ops save (input, weight, bias, residual, mean, var); the backward op
// recomputes the activation's input from them.

const c10::DispatchKeySet kAboveBackend = c10::autograd_dispatch_keyset_with_ADInplaceOrView;

bool requires_grad(const c10::optional<Tensor>& t) { return is_given(t) && t->requires_grad(); }

Tensor or_undefined(const c10::optional<Tensor>& t) { return is_given(t) ? *t : Tensor(); }

c10::optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

// Edges (what needs_input_grad counts): input is 0; weight, bias and residual each take the
// next where given (-1 where not).
void save(AutogradContext* ctx, const Tensor& input, const c10::optional<Tensor>& weight,
          const c10::optional<Tensor>& bias, const c10::optional<Tensor>& residual, const Tensor& mean,
          const Tensor& var, double eps, c10::string_view activation, double negative_slope, bool training) {
  ctx->save_for_backward({input, or_undefined(weight), or_undefined(bias), or_undefined(residual), mean, var});
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  ctx->saved_data["training"] = training;
  int64_t edge = 1;
  for (const auto& [name, t] : {std::pair<const char*, const c10::optional<Tensor>*>{"weight_edge", &weight},
                                {"bias_edge", &bias},
                                {"residual_edge", &residual}})
    ctx->saved_data[name] = is_given(*t) ? edge++ : int64_t(-1);
}

bool needs(AutogradContext* ctx, const char* name) {
  const int64_t edge = ctx->saved_data[name].toInt();
  return edge >= 0 && ctx->needs_input_grad(edge);
}

// The gradients of (input, weight, bias, residual), in a list of one per forward argument.
variable_list saved_backward(AutogradContext* ctx, const Tensor& grad_out, size_t edges) {
  const std::array<bool, 4> mask = {ctx->needs_input_grad(0), needs(ctx, "weight_edge"), needs(ctx, "bias_edge"),
                                    needs(ctx, "residual_edge")};
  variable_list out(edges);
  if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return out;
  const auto saved = ctx->get_saved_variables();
  // batch_norm_act_backward has no derivative of its own: its autograd kernel refuses a graph
  // of the backward (create_graph) instead of returning gradients that cannot be differentiated.
  const auto g = ops::batch_norm_act_backward(
      grad_out, saved[0], as_optional(saved[1]), as_optional(saved[2]), as_optional(saved[3]), saved[4], saved[5],
      ctx->saved_data["eps"].toDouble(), ctx->saved_data["training"].toBool(),
      ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble(), mask);
  // gradients go by argument position (input, weight, bias, residual first in both ops)
  for (size_t i = 0; i < 4; ++i)
    if (mask[i]) out[i] = i == 0 ? std::get<0>(g) : i == 1 ? std::get<1>(g) : i == 2 ? std::get<2>(g) : std::get<3>(g);
  return out;
}

class ActTrainFunction : public torch::autograd::Function<ActTrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const c10::optional<Tensor>& residual,
                               const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                               const c10::optional<Tensor>& num_batches_tracked, c10::optional<double> momentum,
                               double eps, c10::string_view activation, double negative_slope) {
    Tensor output, mean, var;
    {
      c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
      std::tie(output, mean, var) =
          ops::act_train_op().call(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                   momentum, eps, activation, negative_slope);
    }
    save(ctx, input, weight, bias, residual, mean, var, eps, activation, negative_slope, /*training=*/true);
    ctx->mark_non_differentiable({mean, var});
    return {output, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return saved_backward(ctx, grads[0], 11);  // 11 arguments; the buffers and scalars take none
  }
};

class ActFunction : public torch::autograd::Function<ActFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& residual, const Tensor& mean,
                        const Tensor& var, double eps, c10::string_view activation, double negative_slope) {
    Tensor output;
    {
      c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
      output = ops::act_op().call(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
    }
    save(ctx, input, weight, bias, residual, mean, var, eps, activation, negative_slope, /*training=*/false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return saved_backward(ctx, grads[0], 9); }
};

void bump_versions(std::initializer_list<const c10::optional<Tensor>*> written) {
  for (const auto* t : written) {
    if (is_given(*t) && !(*t)->is_inference()) (*t)->unsafeGetTensorImpl()->bump_version();
  }
}

std::tuple<Tensor, Tensor, Tensor> act_train_autograd(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps, c10::string_view activation, double negative_slope) {
  std::tuple<Tensor, Tensor, Tensor> out;
  const bool graph = c10::GradMode::is_enabled() &&
                     (input.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(residual));
  if (graph) {
    auto o = ActTrainFunction::apply(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                     momentum, eps, activation, negative_slope);
    out = {o[0], o[1], o[2]};
  } else {
    c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
    out = ops::act_train_op().call(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                   momentum, eps, activation, negative_slope);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

Tensor act_autograd(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                    const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps,
                    c10::string_view activation, double negative_slope) {
  const bool graph = c10::GradMode::is_enabled() &&
                     (input.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(residual));
  TORCH_CHECK(!c10::GradMode::is_enabled() || !(mean.requires_grad() || var.requires_grad()),
              "bn_ext.batch_norm_act: mean, var: gradients with respect to the statistics are not supported; "
              "bn_ext.functional.batch_norm_act computes them with torch ops");
  if (graph) return ActFunction::apply(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return ops::act_op().call(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> act_backward_autograd(
    const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  TORCH_CHECK(!c10::GradMode::is_enabled() ||
                  !(grad_out.requires_grad() || input.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
                    requires_grad(residual) || mean.requires_grad() || var.requires_grad()),
              "bn_ext.batch_norm_act_backward: the fused BatchNorm-activation ops have first derivatives only "
              "(a backward with create_graph=True, or a second derivative, is not supported); use bn_ext's "
              "BatchNorm and torch's activation where higher derivatives are needed");
  c10::impl::ExcludeDispatchKeyGuard guard(kAboveBackend);
  return ops::act_backward_op().call(grad_out, input, weight, bias, residual, mean, var, eps, training, activation,
                                     negative_slope, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bn_ext, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_act", &act_composed);
  m.impl("batch_norm_act_train", &act_train_composed);
  m.impl("batch_norm_act_backward", &act_backward_composed);
}

TORCH_LIBRARY_IMPL(bn_ext, Autograd, m) {
  m.impl("batch_norm_act", &act_autograd);
  m.impl("batch_norm_act_train", &act_train_autograd);
  m.impl("batch_norm_act_backward", &act_backward_autograd);
}

}  // namespace bn_ext
