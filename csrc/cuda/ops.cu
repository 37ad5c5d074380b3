// The CUDA kernels of every bn_ext op: host code that checks, allocates and chains the launchers
// of reduce.cu, channel.cu and elementwise.cu, and the op registration.
#include "common.cuh"

namespace bn_ext {
namespace cuda {
namespace {

// The statistics reduction reads no mean.
template <typename scalar_t>
const acc_type<scalar_t>* no_mean() {
  return nullptr;
}

struct Context {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int device;
  explicit Context(const Tensor& t)
      : guard(t.device()),
        stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()),
        device(t.device().index()) {}
};

// A per-channel tensor as a contiguous acc-typed tensor (itself when it already is).
Tensor as_acc(const Tensor& t, c10::ScalarType acc) { return t.to(acc).contiguous(); }

Tensor as_acc(const c10::optional<Tensor>& t, c10::ScalarType acc) {
  return t.has_value() && t->defined() ? as_acc(*t, acc) : Tensor();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// A per-channel result: filled by a kernel when there is data, zeros for an empty input.
Tensor stat_tensor(const Geometry& g, const Tensor& input, c10::ScalarType dtype) {
  return g.numel() > 0 ? at::empty({g.C}, input.options().dtype(dtype))
                       : at::zeros({g.C}, input.options().dtype(dtype));
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input, c10::optional<c10::ScalarType> dtype) {
  const auto dt = check_stats_args(input, dtype);
  Context ctx(input);
  Operands p = prepare(input, {input}, /*with_output=*/false);
  Tensor mean = stat_tensor(p.g, input, dt);
  Tensor var = stat_tensor(p.g, input, dt);
  if (p.g.numel() == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_stats_cuda", [&] {
    Tensor partials = launch_reduce<Reduce::kStats, scalar_t>(p.g, p.inputs[0].const_data_ptr<scalar_t>(), nullptr,
                                                              no_mean<scalar_t>(), input, ctx.stream);
    const auto* parts = reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>());
    // The statistics come out in their own dtype: float32, or float64 when asked (or for float64 input).
    AT_DISPATCH_FLOATING_TYPES(dt, "bn_ext_stats_cuda_out", [&] {
      launch_finalize_stats<scalar_t>(parts, p.g.C, partials.size(1), mean.mutable_data_ptr<scalar_t>(),
                                      var.mutable_data_ptr<scalar_t>(), ChannelArgs<scalar_t>{nullptr, nullptr}, 0.0,
                                      nullptr, ctx.stream);
    });
  });
  return {mean, var};
}

Tensor batch_norm_elemt(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const Tensor& mean, const Tensor& var, double eps) {
  check_elemt_args(input, weight, bias, mean, var, eps);
  Context ctx(input);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  if (p.g.numel() == 0) return p.result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_elemt_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), b = as_acc(bias, acc), m = as_acc(mean, acc), v = as_acc(var, acc);
    Tensor coeffs = at::empty({4, p.g.C}, input.options().dtype(acc));
    launch_forward_coeffs<acc_t>(m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
                                 ChannelArgs<acc_t>{ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b)}, p.g.C, eps,
                                 coeffs.mutable_data_ptr<acc_t>(), ctx.stream);
    launch_elementwise<Pass::kForward, scalar_t, acc_t>(p.g, p.inputs[0].const_data_ptr<scalar_t>(), nullptr,
                                                        p.out.mutable_data_ptr<scalar_t>(),
                                                        coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
  });
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias, double eps) {
  check_train_args(input, weight, bias, eps);
  Context ctx(input);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  const auto dt = stat_dtype(input.scalar_type());
  Tensor mean = stat_tensor(p.g, input, dt);
  Tensor var = stat_tensor(p.g, input, dt);
  if (p.g.numel() == 0) return {p.result, mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_train_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), b = as_acc(bias, acc);
    const scalar_t* x = p.inputs[0].const_data_ptr<scalar_t>();
    Tensor partials = launch_reduce<Reduce::kStats, scalar_t>(p.g, x, nullptr, no_mean<scalar_t>(), input, ctx.stream);
    Tensor coeffs = at::empty({4, p.g.C}, input.options().dtype(acc));
    launch_finalize_stats<acc_t>(reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>()), p.g.C,
                                 partials.size(1), mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
                                 ChannelArgs<acc_t>{ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b)}, eps,
                                 coeffs.mutable_data_ptr<acc_t>(), ctx.stream);
    launch_elementwise<Pass::kForward, scalar_t, acc_t>(p.g, x, nullptr, p.out.mutable_data_ptr<scalar_t>(),
                                                        coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
  });
  finish(p);
  return {p.result, mean, var};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  check_backward_reduce_args(grad_out, input, mean);
  Context ctx(input);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/false);
  const auto dt = stat_dtype(input.scalar_type());
  Tensor sum_dy = stat_tensor(p.g, input, dt);
  Tensor sum_dy_xmu = stat_tensor(p.g, input, dt);
  if (p.g.numel() == 0) return {sum_dy, sum_dy_xmu};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_backward_reduce_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Tensor m = as_acc(mean, c10::CppTypeToScalarType<acc_t>::value);
    Tensor partials = launch_reduce<Reduce::kGrad, scalar_t>(p.g, p.inputs[1].const_data_ptr<scalar_t>(),
                                                             p.inputs[0].const_data_ptr<scalar_t>(),
                                                             m.const_data_ptr<acc_t>(), input, ctx.stream);
    // var is only read for grad_weight and coefficients, neither asked for here: pass the mean
    launch_backward_channel<acc_t>(
        reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>()), partials.size(1), nullptr, nullptr,
        m.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(), nullptr, p.g.C, 0.0, 1.0, true,
        sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(), nullptr, nullptr, nullptr, ctx.stream);
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& var, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                 double eps, int64_t count) {
  check_backward_elemt_args(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, count);
  Context ctx(input);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/true);
  if (p.g.numel() == 0) return p.result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_backward_elemt_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), m = as_acc(mean, acc), v = as_acc(var, acc);
    const Tensor sdy = as_acc(sum_dy, acc), sdx = as_acc(sum_dy_xmu, acc);
    Tensor coeffs = at::empty({5, p.g.C}, input.options().dtype(acc));
    launch_backward_channel<acc_t>(nullptr, 0, sdy.const_data_ptr<acc_t>(), sdx.const_data_ptr<acc_t>(),
                                   m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(w), p.g.C,
                                   eps, static_cast<double>(count), true, nullptr, nullptr, nullptr, nullptr,
                                   coeffs.mutable_data_ptr<acc_t>(), ctx.stream);
    launch_elementwise<Pass::kBackwardTrain, scalar_t, acc_t>(
        p.g, p.inputs[0].const_data_ptr<scalar_t>(), p.inputs[1].const_data_ptr<scalar_t>(),
        p.out.mutable_data_ptr<scalar_t>(), coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
  });
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const c10::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& var, double eps, bool training,
                                                       std::array<bool, 3> output_mask) {
  check_backward_args(grad_out, input, weight, mean, var, eps);
  Context ctx(input);
  const bool need_sums =
      training ? output_mask[0] || output_mask[1] || output_mask[2] : output_mask[1] || output_mask[2];
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/output_mask[0]);
  const int64_t C = p.g.C;
  const auto param_dtype =
      weight.has_value() && weight->defined() ? weight->scalar_type() : stat_dtype(input.scalar_type());
  Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), m = as_acc(mean, acc), v = as_acc(var, acc);
    Tensor gw = output_mask[1] ? stat_tensor(p.g, input, acc) : Tensor();
    Tensor gb = output_mask[2] ? stat_tensor(p.g, input, acc) : Tensor();
    if (p.g.numel() > 0) {
      Tensor partials;
      if (need_sums) {
        partials = launch_reduce<Reduce::kGrad, scalar_t>(p.g, p.inputs[1].const_data_ptr<scalar_t>(),
                                                          p.inputs[0].const_data_ptr<scalar_t>(),
                                                          m.const_data_ptr<acc_t>(), input, ctx.stream);
      }
      Tensor coeffs = output_mask[0] ? at::empty({5, C}, input.options().dtype(acc)) : Tensor();
      launch_backward_channel<acc_t>(
          need_sums ? reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>()) : nullptr,
          need_sums ? partials.size(1) : 0, nullptr, nullptr, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
          ptr_or_null<acc_t>(w), C, eps, static_cast<double>(p.g.rows()), training, nullptr, nullptr,
          mutable_ptr_or_null<acc_t>(gw), mutable_ptr_or_null<acc_t>(gb), mutable_ptr_or_null<acc_t>(coeffs),
          ctx.stream);
      if (output_mask[0]) {
        const scalar_t* dy = p.inputs[0].const_data_ptr<scalar_t>();
        const scalar_t* x = p.inputs[1].const_data_ptr<scalar_t>();
        if (training) {
          launch_elementwise<Pass::kBackwardTrain, scalar_t, acc_t>(
              p.g, dy, x, p.out.mutable_data_ptr<scalar_t>(), coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
        } else {
          launch_elementwise<Pass::kBackwardEval, scalar_t, acc_t>(p.g, dy, nullptr, p.out.mutable_data_ptr<scalar_t>(),
                                                                   coeffs.const_data_ptr<acc_t>(), ctx.stream,
                                                                   ctx.device);
        }
      }
    }
    grad_weight = output_mask[1] ? gw.to(param_dtype) : at::empty({0}, input.options().dtype(param_dtype));
    grad_bias = output_mask[2] ? gb.to(param_dtype) : at::empty({0}, input.options().dtype(param_dtype));
  });
  Tensor grad_input;
  if (output_mask[0]) {
    finish(p);
    grad_input = p.result;
  } else {
    grad_input = at::empty({0}, input.options());
  }
  return {grad_input, grad_weight, grad_bias};
}

// The running buffers of an update, as contiguous tensors for its kernel; write_back() copies
// into buffers that were not contiguous.
struct RunningBuffers {
  Tensor mean, var, counter, mean_c, var_c;
  c10::ScalarType dtype;
  RunningBuffers(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                 const c10::optional<Tensor>& num_batches_tracked, const char* op)
      : mean(running_mean.has_value() ? *running_mean : Tensor()),
        var(running_var.has_value() ? *running_var : Tensor()),
        counter(num_batches_tracked.has_value() ? *num_batches_tracked : Tensor()) {
    TORCH_CHECK(!mean.defined() || !var.defined() || mean.scalar_type() == var.scalar_type(), op,
                ": running_var: expected dtype ", mean.scalar_type(), " (running_mean's), got ", var.scalar_type());
    mean_c = mean.defined() ? mean.contiguous() : Tensor();
    var_c = var.defined() ? var.contiguous() : Tensor();
    dtype = mean.defined() ? mean.scalar_type() : (var.defined() ? var.scalar_type() : at::kFloat);
  }
  int64_t* counter_ptr() const { return counter.defined() ? counter.mutable_data_ptr<int64_t>() : nullptr; }
  void write_back() const {
    if (mean.defined() && !mean_c.is_same(mean)) mean.copy_(mean_c);
    if (var.defined() && !var_c.is_same(var)) var.copy_(var_c);
  }
};

void batch_norm_update_running_stats(const c10::optional<Tensor>& running_mean,
                                     const c10::optional<Tensor>& running_var,
                                     const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                     const Tensor& var, c10::optional<double> momentum, int64_t count) {
  check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  const RunningBuffers run(running_mean, running_var, num_batches_tracked, "bn_ext.batch_norm_update_running_stats");
  Context ctx(mean);
  const Tensor m = mean.contiguous(), v = var.to(mean.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run.dtype, "bn_ext_update_running_stats_cuda", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "bn_ext_update_running_stats_cuda", [&] {
      launch_update_running_stats<run_t, scalar_t>(
          mutable_ptr_or_null<run_t>(run.mean_c), mutable_ptr_or_null<run_t>(run.var_c), run.counter_ptr(),
          m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), m.numel(), momentum.has_value(),
          momentum.value_or(0.0), count, ctx.stream);
    });
  });
  run.write_back();
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_gather_stats(const Tensor& stats,
                                                           const c10::optional<Tensor>& running_mean,
                                                           const c10::optional<Tensor>& running_var,
                                                           const c10::optional<Tensor>& num_batches_tracked,
                                                           c10::optional<double> momentum) {
  const int64_t C = check_gather_stats(stats, running_mean, running_var, num_batches_tracked, momentum);
  const RunningBuffers run(running_mean, running_var, num_batches_tracked, "bn_ext.batch_norm_gather_stats");
  Context ctx(stats);
  const Tensor table = stats.contiguous();
  Tensor mean = at::empty({C}, stats.options());
  Tensor var = at::empty({C}, stats.options());
  Tensor count = at::empty({1}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run.dtype, "bn_ext_gather_stats_cuda", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "bn_ext_gather_stats_cuda", [&] {
      launch_gather_stats<run_t, scalar_t>(table.const_data_ptr<scalar_t>(), table.size(0), C,
                                           mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>(),
                                           count.mutable_data_ptr<scalar_t>(), mutable_ptr_or_null<run_t>(run.mean_c),
                                           mutable_ptr_or_null<run_t>(run.var_c), run.counter_ptr(),
                                           momentum.has_value(), momentum.value_or(0.0), ctx.stream);
    });
  });
  run.write_back();
  return {mean, var, count};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  m.impl("batch_norm_stats", &cuda::batch_norm_stats);
  m.impl("batch_norm_elemt", &cuda::batch_norm_elemt);
  m.impl("batch_norm_train", &cuda::batch_norm_train);
  m.impl("batch_norm_backward_reduce", &cuda::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &cuda::batch_norm_backward_elemt);
  m.impl("batch_norm_backward", &cuda::batch_norm_backward);
  m.impl("batch_norm_update_running_stats", &cuda::batch_norm_update_running_stats);
  m.impl("batch_norm_gather_stats", &cuda::batch_norm_gather_stats);
}

}  // namespace bn_ext
