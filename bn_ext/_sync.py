"""SyncBatchNorm's distributed training step: statistics merged across a process group.

Per step and per layer, two collectives:
- forward: one all-gather of each rank's row [count, mean (C), biased var (C)] in float64,
  (2C + 1) * 8 bytes per rank. Every rank merges the same table in rank order
  (bn_ext::batch_norm_gather_stats), so all ranks get the same statistics and running stats.
- backward (when the input needs a gradient): one all-reduce of [sum(dy), sum(dy * (x - mean))]
  in float64, 2C * 8 bytes.

The collectives are torch's functional collectives (the `_c10d_functional` ops), which run on
any backend (gloo, NCCL) eagerly and trace under torch.compile.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

_ops = torch.ops.bn_ext
_fc = torch.ops._c10d_functional  # its ops resolve on first use


def sync_group(process_group) -> Optional["dist.ProcessGroup"]:
    """The group to synchronise over, or None when there is nothing to synchronise with
    (torch.distributed absent or not initialised, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _collective_failed(what: str, group_size: int, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"bn_ext.SyncBatchNorm: the {what} across {group_size} ranks failed. A rank may have raised "
        f"before reaching this collective, left the process group, or run a different model: {error}"
    )


def all_gather_rows(row: Tensor, group, group_size: int, what: str) -> Tensor:
    """(group_size, len(row)): every rank's row, in rank order."""
    try:
        gathered = _fc.wait_tensor(_fc.all_gather_into_tensor(row, group_size, group.group_name))
    except RuntimeError as error:
        raise _collective_failed(what, group_size, error) from error
    return gathered.view(group_size, row.numel())


def all_reduce_sum(t: Tensor, group, group_size: int, what: str) -> Tensor:
    try:
        return _fc.wait_tensor(_fc.all_reduce(t, "sum", group.group_name))
    except RuntimeError as error:
        raise _collective_failed(what, group_size, error) from error


def check_num_features(num_features: int, device: torch.device, group, group_size: int) -> None:
    """Raise on every rank if the ranks disagree on num_features (their stat rows would differ in
    length, and an all-gather of unequal rows fails obscurely or not at all)."""
    mine = torch.tensor([num_features], dtype=torch.int64, device=device)
    every = all_gather_rows(mine, group, group_size, "check of num_features").view(-1).tolist()
    if len(set(every)) > 1:
        raise RuntimeError(
            f"bn_ext.SyncBatchNorm: num_features differs across the ranks of the process group: "
            f"{every} (rank order). Every rank must run the same model."
        )


def gather_batch_stats(input: Tensor, running_mean, running_var, num_batches_tracked, momentum, group, group_size: int):
    """Global (mean, biased var, count) of the batch spread over the group, all float64; the
    running stats and counter move as one process over the whole batch would move them."""
    channels = input.shape[1]
    mean, var = _ops.batch_norm_stats(input, torch.float64)
    count = input.numel() // channels
    row = torch.cat([mean.new_full((1,), count), mean, var])
    table = all_gather_rows(row, group, group_size, "all-gather of batch statistics")
    if count <= 1 and not torch.compiler.is_compiling():
        # The group may hold one value per channel in all. Only ranks holding at most one value can
        # tell, and every rank is one of them when it does: each reads the counts back (a host sync
        # on this rare path only) and raises before any buffer moves.
        total = int(table[:, 0].sum().item())
        if total <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{total} across the {group_size} ranks of the process group (input size {tuple(input.shape)} on this rank)"
            )
    return _ops.batch_norm_gather_stats(table, running_mean, running_var, num_batches_tracked, momentum)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = batch_norm_elemt(x) with the global statistics; its backward is the full training
    backward over the whole group's batch (the statistics are functions of every rank's x).

    mean, var and count come from gather_batch_stats on the detached input, so the gradient
    through them is this backward's alone. grad_weight and grad_bias are this rank's part, as in
    torch.nn.SyncBatchNorm: DistributedDataParallel sums them across ranks.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, count, eps, group, group_size):
        ctx.save_for_backward(input, weight, mean, var, count)
        ctx.eps = eps
        ctx.group = group
        ctx.group_size = group_size
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _ops.batch_norm_elemt(input, weight, bias, mean, var, eps)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean, var, count = ctx.saved_tensors
        grads = _sync_backward(ctx, grad_out, input, weight, mean, var, count, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None)


def _sync_backward(ctx, grad_out, input, weight, mean, var, count, needs):
    """(grad_input, grad_weight, grad_bias) of y = BN(x) with the group's statistics, from this
    rank's grad_out; the input gradient takes one all-reduce of the gradient sums."""
    need_input, need_weight, need_bias = needs
    grad_input = grad_weight = grad_bias = None
    sum_dy, sum_dy_xmu = _ops.batch_norm_backward_reduce(grad_out, input, mean)
    if need_weight:
        invstd = 1.0 / torch.sqrt(var + ctx.eps)
        grad_weight = (sum_dy_xmu.to(torch.float64) * invstd).to(ctx.weight_dtype)
    if need_bias:
        grad_bias = sum_dy.to(ctx.bias_dtype)
    if need_input:
        channels = input.shape[1]
        sums = all_reduce_sum(
            torch.cat([sum_dy, sum_dy_xmu]).to(torch.float64),
            ctx.group,
            ctx.group_size,
            "all-reduce of gradient sums",
        )
        # backward_elemt divides the sums by `count`: hand it means over the global count.
        mean_dy = sums[:channels] / count
        mean_dy_xmu = sums[channels:] / count
        grad_input = _ops.batch_norm_backward_elemt(
            grad_out, input, weight, mean, var, mean_dy, mean_dy_xmu, ctx.eps, 1
        )
    return grad_input, grad_weight, grad_bias


def _activation_backward(grad_out: Tensor, z: Tensor, activation: str, negative_slope: float) -> Tensor:
    """grad_out * act'(z), by torch's own activation backward functions (their conventions at the
    kinks, as the fused kernels follow)."""
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(grad_out, z, 0.0)
    if activation == "relu6":
        return aten.hardtanh_backward(grad_out, z, 0.0, 6.0)
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(grad_out, z, negative_slope, False)
    if activation == "silu":
        return aten.silu_backward(grad_out, z)
    return grad_out


class SyncBatchNormActFunction(torch.autograd.Function):
    """y = act(BN(x) + residual) with the global statistics, in one pass (batch_norm_act). The
    backward recomputes z = BN(x) + residual from the saved statistics (no activation-sized tensor
    is kept from the forward), takes dz = dy * act'(z), which is the residual's gradient, and runs
    SyncBatchNormFunction's backward on dz."""

    @staticmethod
    def forward(
        ctx, input, weight, bias, residual, mean, var, count, eps, activation, negative_slope, group, group_size
    ):
        ctx.save_for_backward(input, weight, bias, residual, mean, var, count)
        ctx.eps = eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.group = group
        ctx.group_size = group_size
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _ops.batch_norm_act(input, weight, bias, residual, mean, var, eps, activation, negative_slope)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, bias, residual, mean, var, count = ctx.saved_tensors
        if ctx.activation == "identity":
            dz = grad_out
        else:
            z = _ops.batch_norm_act(input, weight, bias, residual, mean, var, ctx.eps, "identity", 0.0)
            dz = _activation_backward(grad_out, z, ctx.activation, ctx.negative_slope)
        grads = _sync_backward(ctx, dz, input, weight, mean, var, count, ctx.needs_input_grad[:3])
        grad_residual = dz if ctx.needs_input_grad[3] else None
        return (*grads, grad_residual, None, None, None, None, None, None, None, None)
