// Every bn_ext schema, defined once. Kernels register per device (cpu/, cuda/); fake kernels
// are registered from Python (bn_ext/_fake.py), autograd in csrc/autograd.cpp and bn_ext/_autograd.py.
#include <torch/library.h>

TORCH_LIBRARY(bn_ext, m) {
  // Every op takes its tensors in any layout and gives each output the input's (at::empty_like,
  // as the fake kernels do): inductor may then hand over a convolution's channels-last output as
  // it is, where a custom op's default (needs_fixed_stride_order) makes it copy to the eager
  // strides and back around each call.
  const std::vector<at::Tag> any_layout{at::Tag::flexible_layout};
  // Per-channel batch mean and biased variance, one pass over input (Welford-style merge of
  // blocks). float32 results (float64 for float64 input) unless dtype asks for float64, which
  // keeps every bit of the float64 accumulation (SyncBatchNorm gathers those).
  m.def("batch_norm_stats(Tensor input, ScalarType? dtype=None) -> (Tensor mean, Tensor var)", any_layout);
  // y = (x - mean) / sqrt(var + eps) * weight + bias, with the given per-channel mean/var.
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "float eps) -> Tensor",
      any_layout);
  // Training forward: batch_norm_stats then batch_norm_elemt in one op; returns the statistics
  // it normalised with, for the backward and for batch_norm_update_running_stats.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor output, Tensor mean, Tensor var)",
      any_layout);
  // batch_norm_train, then batch_norm_update_running_stats with its statistics over the input's
  // count, as one op: the module's training forward. The running stats have moved by the time
  // autograd saves the op's tensors, as in torch.nn, so an activation checkpoint that stops its
  // recomputation at that save still updates them. Kernel: csrc/composite.cpp.
  m.def(
      "batch_norm_train_update(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> (Tensor output, Tensor mean, Tensor var)",
      any_layout);
  // Per-channel sum(dy) and sum(dy * (x - mean)).
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)",
      any_layout);
  // dx from the reduced sums; `count` is the number of elements per channel they were taken
  // over (larger than this input's when the sums were all-reduced across processes).
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor var, Tensor sum_dy, Tensor sum_dy_xmu, float eps, SymInt count) -> Tensor",
      any_layout);
  // Whole backward: reduce, then dx, grad_weight, grad_bias. training=False treats mean/var
  // as constants (eval mode). Outputs not asked for in output_mask come back with 0 elements.
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor var, "
      "float eps, bool training, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      any_layout);
  // running_mean/var <- factor * batch + (1 - factor) * running, with the unbiased batch
  // variance over `count` elements; num_batches_tracked += 1. factor is momentum, or
  // 1 / num_batches_tracked when momentum is None. count == 0 only counts the batch.
  m.def(
      "batch_norm_update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, float? momentum, SymInt count) "
      "-> ()",
      any_layout);
  // SyncBatchNorm's merge: `stats` holds one row per rank, [count, mean (C), biased var (C)]
  // (an all-gather of each rank's batch_norm_stats). Merges the rows in rank order with Chan's
  // formula (rows with count 0 drop out), so every rank gets the same bits; updates the running
  // stats as batch_norm_update_running_stats would over the total count (known only on the
  // device, so no host sync); returns the global mean, biased var and total count (1 element).
  m.def(
      "batch_norm_gather_stats(Tensor stats, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum) -> (Tensor mean, Tensor var, Tensor count)",
      any_layout);
  // Fused ops: y = act(BN(input) + residual) in one elementwise pass; activation is "identity",
  // "relu", "relu6", "leaky_relu" (with negative_slope) or "silu". With given statistics (eval):
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mean, Tensor var, "
      "float eps, str activation, float negative_slope) -> Tensor",
      any_layout);
  // Training: batch statistics, returned in float64 (the backward recomputes the activation's
  // input from them, to the bit), and the running stats updated where given, as
  // batch_norm_train_update does.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, "
      "float eps, str activation, float negative_slope) -> (Tensor output, Tensor mean, Tensor var)",
      any_layout);
  // Their backward: the activation's input recomputed from input (and residual), then
  // batch_norm_backward's formulas on dz = grad_out * act'(z); grad_residual is dz.
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor mean, Tensor var, float eps, bool training, str activation, float negative_slope, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)",
      any_layout);
}
