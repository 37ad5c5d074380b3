// The CPU ops: argument checks, layout preparation, and calls into the kernel loops
// (kernels.h), parallelised with at::parallel_for (torch's own OpenMP pool, so
// torch.set_num_threads applies and no second OpenMP runtime is loaded). The loops come in three
// builds (baseline, AVX2+FMA, AVX-512); cpu_kernels() picks one for this CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "bn_ext/checks.h"
#include "bn_ext/layout.h"
#include "bn_ext/math.h"
#include "kernels_common.h"

namespace bn_ext {
namespace cpu {
namespace {

using at::Tensor;

// A per-channel tensor of any floating dtype and stride, read into doubles (`fill` if undefined).
std::vector<double> channel_values(const Tensor& t, int64_t channels, double fill) {
  std::vector<double> out(channels, fill);
  if (!t.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "channel_values", [&] {
    auto a = t.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<double>(a[c]);
  });
  return out;
}

std::vector<double> channel_values(const c10::optional<Tensor>& t, int64_t channels, double fill) {
  return t.has_value() ? channel_values(*t, channels, fill) : std::vector<double>(channels, fill);
}

void store_channel_values(const Tensor& t, const std::vector<double>& v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "store_channel_values", [&] {
    auto a = t.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < static_cast<int64_t>(v.size()); ++c) a[c] = static_cast<scalar_t>(v[c]);
  });
}

Tensor channel_tensor(const std::vector<double>& v, const Tensor& input, c10::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, input.options().dtype(dtype));
  store_channel_values(t, v);
  return t;
}

void compute_stats(const Tensor& x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  mean.assign(g.C, 0.0);
  var.assign(g.C, 0.0);
  if (g.numel() > 0) cpu_kernels().stats(x, g, mean, var);
}

void compute_grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g, const std::vector<double>& mean,
                       std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  sum_dy.assign(g.C, 0.0);
  sum_dy_xmu.assign(g.C, 0.0);
  if (g.numel() > 0) cpu_kernels().grad_sums(dy, x, g, mean, sum_dy, sum_dy_xmu);
}

// ---------------------------------------------------------------------------------------------
// Ops.

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input, c10::optional<c10::ScalarType> dtype) {
  const auto dt = check_stats_args(input, dtype);
  Operands p = prepare(input, {input}, /*with_output=*/false);
  std::vector<double> mean, var;
  compute_stats(p.inputs[0], p.g, mean, var);
  return {channel_tensor(mean, input, dt), channel_tensor(var, input, dt)};
}

Tensor batch_norm_elemt(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const Tensor& mean, const Tensor& var, double eps) {
  check_elemt_args(input, weight, bias, mean, var, eps);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  const int64_t C = p.g.C;
  if (p.g.numel() > 0)
    cpu_kernels().elemt(p.inputs[0], p.out, p.g, channel_values(mean, C, 0.0), channel_values(var, C, 0.0),
                        channel_values(weight, C, 1.0), channel_values(bias, C, 0.0), eps);
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias, double eps) {
  check_train_args(input, weight, bias, eps);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  const int64_t C = p.g.C;
  // Normalise with the statistics in double; return them rounded to the stat dtype.
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  if (p.g.numel() > 0)
    cpu_kernels().train(p.inputs[0], p.out, p.g, channel_values(weight, C, 1.0), channel_values(bias, C, 0.0), eps,
                        mean, var);
  finish(p);
  const auto dt = stat_dtype(input.scalar_type());
  return {p.result, channel_tensor(mean, input, dt), channel_tensor(var, input, dt)};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  check_backward_reduce_args(grad_out, input, mean);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/false);
  std::vector<double> sum_dy, sum_dy_xmu;
  compute_grad_sums(p.inputs[0], p.inputs[1], p.g, channel_values(mean, p.g.C, 0.0), sum_dy, sum_dy_xmu);
  const auto dt = stat_dtype(input.scalar_type());
  return {channel_tensor(sum_dy, input, dt), channel_tensor(sum_dy_xmu, input, dt)};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& var, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                 double eps, int64_t count) {
  check_backward_elemt_args(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, count);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/true);
  const int64_t C = p.g.C;
  if (p.g.numel() > 0)
    cpu_kernels().grad_input(p.inputs[0], p.inputs[1], p.out, p.g, /*training=*/true, channel_values(mean, C, 0.0),
                             cpu_kernels().invstds(channel_values(var, C, 0.0), eps), channel_values(weight, C, 1.0),
                             channel_values(sum_dy, C, 0.0), channel_values(sum_dy_xmu, C, 0.0), count);
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const c10::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& var, double eps, bool training,
                                                       std::array<bool, 3> output_mask) {
  check_backward_args(grad_out, input, weight, mean, var, eps);
  const bool need_sums =
      training ? output_mask[0] || output_mask[1] || output_mask[2] : output_mask[1] || output_mask[2];
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/output_mask[0]);
  const int64_t C = p.g.C;
  const std::vector<double> mean_v = channel_values(mean, C, 0.0);
  // taken once: the kernels' coefficients and grad_weight share it
  const std::vector<double> invstd = cpu_kernels().invstds(channel_values(var, C, 0.0), eps);
  const std::vector<double> weight_v = channel_values(weight, C, 1.0);
  std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  const bool fused = training && output_mask[0] && p.g.numel() > 0;  // sums and dx in one call
  if (fused) {
    cpu_kernels().backward_train(p.inputs[0], p.inputs[1], p.out, p.g, mean_v, invstd, weight_v, sum_dy, sum_dy_xmu);
  } else if (need_sums) {
    compute_grad_sums(p.inputs[0], p.inputs[1], p.g, mean_v, sum_dy, sum_dy_xmu);
  }

  const auto param_dtype =
      weight.has_value() && weight->defined() ? weight->scalar_type() : stat_dtype(input.scalar_type());
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    if (!fused && p.g.numel() > 0)
      cpu_kernels().grad_input(p.inputs[0], p.inputs[1], p.out, p.g, training, mean_v, invstd, weight_v, sum_dy,
                               sum_dy_xmu, p.g.rows());
    finish(p);
    grad_input = p.result;
  } else {
    grad_input = at::empty({0}, input.options());
  }
  if (output_mask[1]) {
    std::vector<double> gw(C);
    for (int64_t c = 0; c < C; ++c) gw[c] = invstd[c] * sum_dy_xmu[c];
    grad_weight = channel_tensor(gw, input, param_dtype);
  } else {
    grad_weight = at::empty({0}, input.options().dtype(param_dtype));
  }
  grad_bias =
      output_mask[2] ? channel_tensor(sum_dy, input, param_dtype) : at::empty({0}, input.options().dtype(param_dtype));
  return {grad_input, grad_weight, grad_bias};
}

// The running-stat update both update ops share; every argument has been checked.
void update_running(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                    const c10::optional<Tensor>& num_batches_tracked, const std::vector<double>& mean_v,
                    const std::vector<double>& var_v, c10::optional<double> momentum, int64_t count) {
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  const double factor = count_batch(has_nbt ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr,
                                    momentum.has_value(), momentum.value_or(0.0));
  if (count == 0) return;  // an empty batch is counted but leaves the statistics alone, as in PyTorch
  const int64_t C = static_cast<int64_t>(mean_v.size());
  if (running_mean.has_value() && running_mean->defined()) {
    std::vector<double> rm = channel_values(*running_mean, C, 0.0);
    for (int64_t c = 0; c < C; ++c) rm[c] = running_blend(rm[c], mean_v[c], factor);
    store_channel_values(*running_mean, rm);
  }
  if (running_var.has_value() && running_var->defined()) {
    std::vector<double> rv = channel_values(*running_var, C, 0.0);
    for (int64_t c = 0; c < C; ++c) rv[c] = running_blend(rv[c], unbiased_from_biased(var_v[c], count), factor);
    store_channel_values(*running_var, rv);
  }
}

void batch_norm_update_running_stats(const c10::optional<Tensor>& running_mean,
                                     const c10::optional<Tensor>& running_var,
                                     const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                     const Tensor& var, c10::optional<double> momentum, int64_t count) {
  check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  // Every check has passed: from here on nothing can fail half-way.
  const int64_t C = mean.numel();
  update_running(running_mean, running_var, num_batches_tracked, channel_values(mean, C, 0.0),
                 channel_values(var, C, 0.0), momentum, count);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_gather_stats(const Tensor& stats,
                                                           const c10::optional<Tensor>& running_mean,
                                                           const c10::optional<Tensor>& running_var,
                                                           const c10::optional<Tensor>& num_batches_tracked,
                                                           c10::optional<double> momentum) {
  const int64_t C = check_gather_stats(stats, running_mean, running_var, num_batches_tracked, momentum);
  const Tensor table = stats.to(at::kDouble).contiguous();
  const double* t = table.const_data_ptr<double>();
  const int64_t ranks = table.size(0);
  std::vector<double> mean(C), var(C);
  for (int64_t c = 0; c < C; ++c) {
    const WelfordPartial<double> acc = merge_rank_rows(t, ranks, C, c);
    mean[c] = acc.mean;
    var[c] = acc.count > 0.0 ? acc.m2 / acc.count : 0.0;
  }
  const double total = total_rank_count(t, ranks, C);
  update_running(running_mean, running_var, num_batches_tracked, mean, var, momentum, std::llround(total));
  return {channel_tensor(mean, stats, stats.scalar_type()), channel_tensor(var, stats, stats.scalar_type()),
          channel_tensor({total}, stats, stats.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// The fused ops: y = act(BN(x) + residual).

// The kernel operands: input (and the residual, in the input's kernel layout), and the output.
Operands prepare_act(const Tensor& input, const c10::optional<Tensor>& residual, bool with_output) {
  return is_given(residual) ? prepare(input, {input, *residual}, with_output) : prepare(input, {input}, with_output);
}

Tensor act_residual(const Operands& p, bool has_residual, size_t index) {
  return has_residual ? p.inputs[index] : Tensor();
}

Tensor batch_norm_act(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                      const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps,
                      c10::string_view activation, double negative_slope) {
  const char* op = "bn_ext.batch_norm_act";
  const Act act = check_act_args(input, weight, bias, residual, eps, std::string(activation), negative_slope, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(var, "var", input, op);
  Operands p = prepare_act(input, residual, /*with_output=*/true);
  const int64_t C = p.g.C;
  if (p.g.numel() > 0)
    cpu_kernels().act_forward(p.inputs[0], act_residual(p, is_given(residual), 1), p.out, p.g,
                              channel_values(mean, C, 0.0), channel_values(var, C, 0.0), channel_values(weight, C, 1.0),
                              channel_values(bias, C, 0.0), eps, act, negative_slope, /*after_stats=*/false);
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps, c10::string_view activation, double negative_slope) {
  const Act act = check_act_train_args(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                       momentum, eps, std::string(activation), negative_slope);
  Operands p = prepare_act(input, residual, /*with_output=*/true);
  const int64_t C = p.g.C;
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  if (p.g.numel() > 0)
    cpu_kernels().act_train(p.inputs[0], act_residual(p, is_given(residual), 1), p.out, p.g,
                            channel_values(weight, C, 1.0), channel_values(bias, C, 0.0), eps, act, negative_slope,
                            mean, var);
  finish(p);
  if (is_given(running_mean) || is_given(running_var) || is_given(num_batches_tracked))
    update_running(running_mean, running_var, num_batches_tracked, mean, var, momentum, p.g.rows());
  // float64: the backward recomputes the activation's input from exactly these statistics
  return {p.result, channel_tensor(mean, input, at::kDouble), channel_tensor(var, input, at::kDouble)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward(
    const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  const char* op = "bn_ext.batch_norm_act_backward";
  const Act act = check_act_args(input, weight, bias, residual, eps, std::string(activation), negative_slope, op);
  check_same_shape(grad_out, "grad_out", input, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(var, "var", input, op);
  const bool has_res = is_given(residual);
  const bool need_dres = output_mask[3] && has_res;
  const bool sums = (training && output_mask[0]) || output_mask[1] || output_mask[2];
  Operands p = has_res ? prepare(input, {grad_out, input, *residual}, output_mask[0])
                       : prepare(input, {grad_out, input}, output_mask[0]);
  const int64_t C = p.g.C;
  // taken once: the kernels' coefficients and grad_weight share it
  const std::vector<double> invstd = cpu_kernels().invstds(channel_values(var, C, 0.0), eps);
  std::vector<double> sum_dz(C, 0.0), sum_dz_xmu(C, 0.0);
  // the residual's gradient in the kernel's layout (that of its input operand)
  Tensor dres = need_dres ? at::empty_like(p.inputs[1]) : Tensor();
  if (p.g.numel() > 0 && (sums || output_mask[0] || need_dres))
    cpu_kernels().act_backward(p.inputs[0], p.inputs[1], act_residual(p, has_res, 2), output_mask[0] ? p.out : Tensor(),
                               dres, p.g, training, sums, channel_values(mean, C, 0.0), invstd,
                               channel_values(weight, C, 1.0), channel_values(bias, C, 0.0), act, negative_slope,
                               sum_dz, sum_dz_xmu);
  Tensor grad_input = at::empty({0}, input.options());
  if (output_mask[0]) {
    finish(p);
    grad_input = p.result;
  }
  const auto stat = stat_dtype(input.scalar_type());
  const auto weight_dtype = is_given(weight) ? weight->scalar_type() : stat;
  const auto bias_dtype = is_given(bias) ? bias->scalar_type() : stat;
  Tensor grad_weight = at::empty({0}, input.options().dtype(weight_dtype));
  if (output_mask[1]) {
    std::vector<double> gw(C);
    for (int64_t c = 0; c < C; ++c) gw[c] = invstd[c] * sum_dz_xmu[c];
    grad_weight = channel_tensor(gw, input, weight_dtype);
  }
  Tensor grad_bias =
      output_mask[2] ? channel_tensor(sum_dz, input, bias_dtype) : at::empty({0}, input.options().dtype(bias_dtype));
  Tensor grad_residual = at::empty({0}, input.options());
  if (need_dres) grad_residual = output_like(dres, input);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

namespace {

// The builds of the loops: the baseline, AVX2 + FMA, and the AVX-512 one.
#define BN_EXT_KERNEL_TABLE(ns, name)                                                                             \
  Kernels {                                                                                                       \
    name, &ns::stats, &ns::elemt, &ns::train, &ns::grad_sums, &ns::grad_input, &ns::backward_train, &ns::invstds, \
        &ns::act_forward, &ns::act_train, &ns::act_backward                                                       \
  }
const Kernels kBaseline = BN_EXT_KERNEL_TABLE(isa_default, "default");
const Kernels kAvx2 = BN_EXT_KERNEL_TABLE(isa_avx2, "avx2");
const Kernels kAvx512bf16 = BN_EXT_KERNEL_TABLE(isa_avx512bf16, "avx512bf16");
#undef BN_EXT_KERNEL_TABLE

// GCC's __builtin_cpu_is / __builtin_cpu_supports, which both CPU choices below ask; elsewhere
// the baseline build and the prefetches, as on an unknown CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BN_EXT_ASK_CPU 1
#endif

// The best build this CPU runs, at most `cap` ("default", "avx2", anything else: no cap).
const Kernels* best_kernels(const std::string& cap) {
  if (cap == "default") return &kBaseline;
#ifdef BN_EXT_ASK_CPU
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return &kBaseline;
#if __GNUC__ >= 10
  if (cap != "avx2" && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    return &kAvx512bf16;
#endif
  return &kAvx2;
#else
  return &kBaseline;
#endif
}

// The build in use: the best this CPU runs, capped by BN_EXT_CPU_ISA; use_cpu_kernels changes it.
std::atomic<const Kernels*>& kernels_in_use() {
  static std::atomic<const Kernels*> in_use{[] {
    const char* env = std::getenv("BN_EXT_CPU_ISA");
    return best_kernels(env != nullptr ? env : "");
  }()};
  return in_use;
}

}  // namespace

const Kernels& cpu_kernels() { return *kernels_in_use().load(std::memory_order_relaxed); }

// Switches to the build `name` ("default", "avx2", "avx512bf16", or "native": the best this CPU
// runs, ignoring BN_EXT_CPU_ISA) and returns the name of the one in use before; nullptr, changing
// nothing, where this CPU cannot run it. For the benchmark, which times the builds side by side in
// one process; results computed before and after a switch come from different loops.
const char* use_cpu_kernels(const std::string& name) {
  // in the order each needs more of the CPU: a build is runnable at or below the best one
  const std::array<const Kernels*, 3> builds{&kBaseline, &kAvx2, &kAvx512bf16};
  const auto best = std::find(builds.begin(), builds.end(), best_kernels(""));
  const auto wanted =
      name == "native" ? best
                       : std::find_if(builds.begin(), builds.end(), [&](const Kernels* k) { return name == k->name; });
  if (wanted == builds.end() || wanted > best) return nullptr;
  return kernels_in_use().exchange(*wanted)->name;
}

const char* cpu_kernels_name() { return cpu_kernels().name; }

// The size of the highest cache level cpu0 reports in sysfs (one instance: the L3 this core
// shares, not the package total that sysconf gives on some virtual machines, 384 MiB for a
// 32 MiB L3 here); BN_EXT_LLC_BYTES overrides it, and 32 MiB stands in where neither is there.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("BN_EXT_LLC_BYTES")) return static_cast<int64_t>(std::atoll(env));
    int64_t best = 0;
    int best_level = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int level = 0;
      std::string size;
      if (!(level_file >> level) || !(size_file >> size) || size.empty()) continue;
      int64_t value = std::atoll(size.c_str());
      const char unit = size.back();
      if (unit == 'K') value <<= 10;
      if (unit == 'M') value <<= 20;
      if (level > best_level && value > 0) {
        best_level = level;
        best = value;
      }
    }
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// Measured to pay on the Intel Xeon and to cost on Zen 4, in both SIMD builds; not measured on
// AMD CPUs without AVX-512 (docs/design.md, "Measurements").
namespace {
bool prefetch_streams_default() {
  if (const char* env = std::getenv("BN_EXT_PREFETCH")) {
    if (std::string(env) == "0") return false;
    if (std::string(env) == "1") return true;
  }
#ifdef BN_EXT_ASK_CPU
  return !(__builtin_cpu_is("amd") && __builtin_cpu_supports("avx512f"));
#else
  return true;
#endif
}
}  // namespace

extern const bool kPrefetchStreams = prefetch_streams_default();

// How many distinct threads at::parallel_for uses from inside this library (a build check: the
// OpenMP implementation is a header template, serial unless this library is built with OpenMP).
int parallel_threads_used() {
  std::vector<std::atomic<int>> seen(at::get_num_threads());
  at::parallel_for(0, int64_t(1) << 16, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[t].store(1);
  });
  int used = 0;
  for (auto& s : seen) used += s.load();
  return used;
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("batch_norm_stats", &cpu::batch_norm_stats);
  m.impl("batch_norm_elemt", &cpu::batch_norm_elemt);
  m.impl("batch_norm_train", &cpu::batch_norm_train);
  m.impl("batch_norm_backward_reduce", &cpu::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &cpu::batch_norm_backward_elemt);
  m.impl("batch_norm_backward", &cpu::batch_norm_backward);
  m.impl("batch_norm_update_running_stats", &cpu::batch_norm_update_running_stats);
  m.impl("batch_norm_gather_stats", &cpu::batch_norm_gather_stats);
  m.impl("batch_norm_act", &cpu::batch_norm_act);
  m.impl("batch_norm_act_train", &cpu::batch_norm_act_train);
  m.impl("batch_norm_act_backward", &cpu::batch_norm_act_backward);
}

}  // namespace bn_ext
