"""Fake (meta) kernels: output shapes, dtypes and strides of every bn_ext op, for torch.compile."""

import torch

OP_NAMES = (
    "batch_norm_stats",
    "batch_norm_elemt",
    "batch_norm_train",
    "batch_norm_train_update",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "batch_norm_backward",
    "batch_norm_update_running_stats",
    "batch_norm_gather_stats",
    "batch_norm_act",
    "batch_norm_act_train",
    "batch_norm_act_backward",
)

ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu")


def stat_dtype(dtype):
    """dtype of batch statistics for an input dtype: float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels(input):
    torch._check(input.dim() >= 2, lambda: f"input: expected at least 2 dimensions (N, C, ...), got {input.dim()}")
    return input.shape[1]


def _check_channel_tensor(t, name, channels):
    if t is None:
        return
    torch._check(
        t.dim() == 1, lambda: f"{name}: expected a 1-D tensor of {channels} elements, got size {tuple(t.shape)}"
    )
    torch._check(t.shape[0] == channels, lambda: f"{name}: expected {channels} elements, got {t.shape[0]}")


def _check_devices(op, like, **tensors):
    """Every tensor argument on `like`'s device. A parameter or buffer left on the meta device would
    otherwise send a call with real inputs to these fake kernels (meta outranks every backend in
    dispatch), which return uninitialised outputs and write nothing."""
    for name, t in tensors.items():
        if t is not None and t.device != like.device:
            raise RuntimeError(
                f"bn_ext.{op}: {name}: expected a tensor on {like.device} (the input's device), got one on {t.device}"
            )


def _stats_like(input):
    c = _channels(input)
    return input.new_empty((c,), dtype=stat_dtype(input.dtype))


@torch.library.register_fake("bn_ext::batch_norm_stats")
def _stats(input, dtype=None):
    c = _channels(input)
    dt = stat_dtype(input.dtype) if dtype is None else dtype
    return input.new_empty((c,), dtype=dt), input.new_empty((c,), dtype=dt)


@torch.library.register_fake("bn_ext::batch_norm_elemt")
def _elemt(input, weight, bias, mean, var, eps):
    _check_devices("batch_norm_elemt", input, weight=weight, bias=bias, mean=mean, var=var)
    c = _channels(input)
    for t, name in ((weight, "weight"), (bias, "bias"), (mean, "mean"), (var, "var")):
        _check_channel_tensor(t, name, c)
    return torch.empty_like(input)


@torch.library.register_fake("bn_ext::batch_norm_train")
def _train(input, weight, bias, eps):
    _check_devices("batch_norm_train", input, weight=weight, bias=bias)
    c = _channels(input)
    _check_channel_tensor(weight, "weight", c)
    _check_channel_tensor(bias, "bias", c)
    return torch.empty_like(input), _stats_like(input), _stats_like(input)


@torch.library.register_fake("bn_ext::batch_norm_train_update")
def _train_update(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    _check_devices(
        "batch_norm_train_update",
        input,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked,
    )
    c = _channels(input)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_channel_tensor(t, name, c)
    return torch.empty_like(input), _stats_like(input), _stats_like(input)


@torch.library.register_fake("bn_ext::batch_norm_backward_reduce")
def _backward_reduce(grad_out, input, mean):
    _check_devices("batch_norm_backward_reduce", input, grad_out=grad_out, mean=mean)
    _check_channel_tensor(mean, "mean", _channels(input))
    return _stats_like(input), _stats_like(input)


@torch.library.register_fake("bn_ext::batch_norm_backward_elemt")
def _backward_elemt(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, count):
    _check_devices(
        "batch_norm_backward_elemt",
        input,
        grad_out=grad_out,
        weight=weight,
        mean=mean,
        var=var,
        sum_dy=sum_dy,
        sum_dy_xmu=sum_dy_xmu,
    )
    c = _channels(input)
    for t, name in ((weight, "weight"), (mean, "mean"), (var, "var"), (sum_dy, "sum_dy"), (sum_dy_xmu, "sum_dy_xmu")):
        _check_channel_tensor(t, name, c)
    return torch.empty_like(input)


@torch.library.register_fake("bn_ext::batch_norm_backward")
def _backward(grad_out, input, weight, mean, var, eps, training, output_mask):
    _check_devices("batch_norm_backward", input, grad_out=grad_out, weight=weight, mean=mean, var=var)
    c = _channels(input)
    _check_channel_tensor(weight, "weight", c)
    param_dtype = weight.dtype if weight is not None else stat_dtype(input.dtype)
    grad_input = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
    grad_weight = input.new_empty((c if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((c if output_mask[2] else 0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("bn_ext::batch_norm_update_running_stats")
def _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    _check_devices(
        "batch_norm_update_running_stats",
        mean,
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked,
        var=var,
    )
    c = mean.shape[0]
    _check_channel_tensor(running_mean, "running_mean", c)
    _check_channel_tensor(running_var, "running_var", c)
    return None


@torch.library.register_fake("bn_ext::batch_norm_gather_stats")
def _gather_stats(stats, running_mean, running_var, num_batches_tracked, momentum):
    _check_devices(
        "batch_norm_gather_stats",
        stats,
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked,
    )
    torch._check(
        stats.dim() == 2, lambda: f"stats: expected a 2-D tensor of per-rank rows, got size {tuple(stats.shape)}"
    )
    c = (stats.shape[1] - 1) // 2
    _check_channel_tensor(running_mean, "running_mean", c)
    _check_channel_tensor(running_var, "running_var", c)
    return stats.new_empty((c,)), stats.new_empty((c,)), stats.new_empty((1,))


def _check_act(op, input, weight, bias, residual, activation):
    if activation not in ACTIVATIONS:
        raise RuntimeError(
            f"bn_ext.{op}: activation: expected one of {', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}"
        )
    c = _channels(input)
    _check_channel_tensor(weight, "weight", c)
    _check_channel_tensor(bias, "bias", c)
    if residual is not None:
        torch._check(
            residual.shape == input.shape,
            lambda: f"residual: expected size {tuple(input.shape)} (the input's), got {tuple(residual.shape)}",
        )
    return c


@torch.library.register_fake("bn_ext::batch_norm_act")
def _act(input, weight, bias, residual, mean, var, eps, activation, negative_slope):
    _check_devices("batch_norm_act", input, weight=weight, bias=bias, residual=residual, mean=mean, var=var)
    c = _check_act("batch_norm_act", input, weight, bias, residual, activation)
    _check_channel_tensor(mean, "mean", c)
    _check_channel_tensor(var, "var", c)
    return torch.empty_like(input)


@torch.library.register_fake("bn_ext::batch_norm_act_train")
def _act_train(
    input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, activation, slope
):
    _check_devices(
        "batch_norm_act_train",
        input,
        weight=weight,
        bias=bias,
        residual=residual,
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked,
    )
    c = _check_act("batch_norm_act_train", input, weight, bias, residual, activation)
    _check_channel_tensor(running_mean, "running_mean", c)
    _check_channel_tensor(running_var, "running_var", c)
    stats = input.new_empty((c,), dtype=torch.float64)
    return torch.empty_like(input), stats, torch.empty_like(stats)


@torch.library.register_fake("bn_ext::batch_norm_act_backward")
def _act_backward(
    grad_out, input, weight, bias, residual, mean, var, eps, training, activation, negative_slope, output_mask
):
    _check_devices(
        "batch_norm_act_backward",
        input,
        grad_out=grad_out,
        weight=weight,
        bias=bias,
        residual=residual,
        mean=mean,
        var=var,
    )
    c = _check_act("batch_norm_act_backward", input, weight, bias, residual, activation)
    stat = stat_dtype(input.dtype)
    weight_dtype = weight.dtype if weight is not None else stat
    bias_dtype = bias.dtype if bias is not None else stat
    grad_input = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
    grad_weight = input.new_empty((c if output_mask[1] else 0,), dtype=weight_dtype)
    grad_bias = input.new_empty((c if output_mask[2] else 0,), dtype=bias_dtype)
    grad_residual = torch.empty_like(input) if output_mask[3] and residual is not None else input.new_empty((0,))
    return grad_input, grad_weight, grad_bias, grad_residual
