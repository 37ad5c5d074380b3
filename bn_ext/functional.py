"""bn_ext.functional.batch_norm: torch.nn.functional.batch_norm's signature and behaviour."""

from typing import List, Optional

import torch
from torch import Tensor

from . import _composite

_ops = torch.ops.bn_ext


def _verify_batch_size(size: List[int]) -> None:  # typed: the scripted module forward calls it too
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _check_args(training: bool, momentum, eps: float) -> None:
    if training and not eps > 0.0:
        # `not eps > 0` also catches nan, which PyTorch lets through and turns into nan outputs.
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if momentum is not None and momentum != momentum:  # nan (math.isnan fails on a SymFloat under torch.compile)
        raise ValueError("batch_norm momentum must be a number or None, but got nan")


def _check_buffers(input: Tensor, running_mean, running_var, num_batches_tracked, momentum=0.1) -> None:
    """The buffers an update will write, for the paths where no op checks them first: the
    torch-op composite and SyncBatchNorm (before its collective)."""
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise RuntimeError(
                f"batch_norm: {name}: expected a 1-D tensor of {channels} elements (one per channel), "
                f"got size {tuple(t.shape)}"
            )
        if t.device != input.device:
            raise RuntimeError(f"batch_norm: {name}: expected a tensor on {input.device}, got one on {t.device}")
        if not t.is_floating_point():
            raise RuntimeError(f"batch_norm: {name}: expected a floating-point tensor, got {t.dtype}")
    if num_batches_tracked is not None:
        if num_batches_tracked.numel() != 1 or num_batches_tracked.dtype != torch.long:
            raise RuntimeError(
                f"batch_norm: num_batches_tracked: expected a one-element int64 tensor, got "
                f"{num_batches_tracked.dtype} of size {tuple(num_batches_tracked.shape)}"
            )
        if num_batches_tracked.device != input.device:
            raise RuntimeError(
                f"batch_norm: num_batches_tracked: expected a tensor on {input.device}, "
                f"got one on {num_batches_tracked.device}"
            )
    _check_counter(num_batches_tracked, momentum)


def _check_counter(num_batches_tracked, momentum) -> None:
    """The cumulative average (momentum=None) divides by the count after this batch, so a negative
    count must be refused before the update. The op reads a CPU counter itself; a GPU counter is
    read back here, as torch.nn's momentum=None path does, and not while compiling."""
    if (
        momentum is None
        and num_batches_tracked is not None
        and num_batches_tracked.device.type not in ("cpu", "meta")
        and not torch.compiler.is_compiling()
        and int(num_batches_tracked) < 0
    ):
        raise RuntimeError(
            "batch_norm: num_batches_tracked: expected a non-negative count with momentum=None "
            f"(cumulative average), got {int(num_batches_tracked)}"
        )


def _check_running_pair(running_mean, running_var) -> None:
    """torch.nn.functional.batch_norm's rules for the running statistics: both or neither, and
    not tensors that require grad (they are buffers, written in place)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must either both be None or neither be None, got "
            + ("running_mean only" if running_var is None else "running_var only")
        )
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"batch_norm: {name}: expected a tensor that does not require grad (running statistics are "
                "buffers, not differentiable inputs)"
            )


def _check_input(op: str, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input: expected a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"{op}: input: expected at least 2 dimensions (N, C, ...), got {input.dim()}-D input")


def _check_mode(input: Tensor, running_mean, running_var, training: bool, num_batches_tracked) -> bool:
    """Whether a training call updates buffers; raises where training cannot normalise this batch
    or eval has no running statistics."""
    if training:
        _verify_batch_size(input.size())
        return running_mean is not None or running_var is not None or num_batches_tracked is not None
    if running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    return False


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """batch_norm, and with num_batches_tracked (counted here) and momentum=None, the module's
    cumulative average. Argument errors are raised before any buffer is touched."""
    _check_input("batch_norm", input)
    _check_args(training, momentum, eps)
    _check_running_pair(running_mean, running_var)
    updating = _check_mode(input, running_mean, running_var, training, num_batches_tracked)
    if _composite.needed():
        if training and updating:
            _check_buffers(input, running_mean, running_var, num_batches_tracked, momentum)
        return _composite.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )
    if not training:
        return _ops.batch_norm_elemt.default(input, weight, bias, running_mean, running_var, eps)
    if updating:
        # batch_norm_train_update checks the buffers before its statistics pass
        _check_counter(num_batches_tracked, momentum)
        return _ops.batch_norm_train_update.default(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
        )[0]
    return _ops.batch_norm_train.default(input, weight, bias, eps)[0]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation over the channel dimension (dim 1) of an (N, C, *) input.

    Same signature and behaviour as :func:`torch.nn.functional.batch_norm`: in training the batch
    statistics normalise the input and, where given, running_mean/running_var move towards them
    by ``momentum`` (running_var towards the unbiased variance); otherwise the running statistics
    normalise it.
    """
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm: training: expected a bool, got {type(training).__name__}")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu")


def _check_activation(activation, negative_slope) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"batch_norm_act: activation: expected one of {', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}"
        )
    if negative_slope != negative_slope:
        raise ValueError("batch_norm_act: negative_slope: expected a number, got nan")


def _activate(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    """torch's own activation: the composite path and the ONNX export."""
    if activation == "relu":
        return torch.nn.functional.relu(z)
    if activation == "relu6":
        return torch.nn.functional.relu6(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    return z


def _batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    negative_slope: float,
) -> Tensor:
    """_batch_norm's checks and buffer rules, then the fused op (or its torch composite where
    the op cannot serve: torch.func transforms, forward AD, statistics that require grad)."""
    _check_input("batch_norm_act", input)
    _check_activation(activation, negative_slope)
    _check_args(training, momentum, eps)
    _check_running_pair(running_mean, running_var)
    if residual is not None and not isinstance(residual, Tensor):
        raise TypeError(f"batch_norm_act: residual: expected a Tensor or None, got {type(residual).__name__}")
    updating = _check_mode(input, running_mean, running_var, training, num_batches_tracked)
    stats_need_grad = not training and (running_mean.requires_grad or running_var.requires_grad)
    if _composite.needed() or stats_need_grad:
        if training and updating:
            _check_buffers(input, running_mean, running_var, num_batches_tracked, momentum)
        z = _composite.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )
        return _activate(z if residual is None else z + residual, activation, negative_slope)
    if not training:
        return _ops.batch_norm_act.default(
            input, weight, bias, residual, running_mean, running_var, eps, activation, negative_slope
        )
    if updating:
        # batch_norm_act_train checks the buffers before its statistics pass
        _check_counter(num_batches_tracked, momentum)
    return _ops.batch_norm_act_train.default(
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        activation,
        negative_slope,
    )[0]


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(batch_norm(input, ...) + residual)`` in one fused pass.

    The BatchNorm arguments and behaviour are :func:`batch_norm`'s; ``residual`` (optional) is a
    tensor of the input's shape added before the activation, which is ``"identity"``, ``"relu"``,
    ``"relu6"``, ``"leaky_relu"`` (with ``negative_slope``) or ``"silu"``.
    """
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm_act: training: expected a bool, got {type(training).__name__}")
    return _batch_norm_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        None,
        residual,
        activation,
        negative_slope,
    )
