"""bn_ext.functional.batch_norm: torch.nn.functional.batch_norm's signature and behaviour."""
import math
from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.bn_ext


def _verify_batch_size(size) -> None:
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
    if momentum is not None and isinstance(momentum, float) and math.isnan(momentum):
        raise ValueError("batch_norm momentum must be a number or None, but got nan")


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
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input: expected a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm: input: expected at least 2 dimensions (N, C, ...), got {input.dim()}-D input")
    _check_args(training, momentum, eps)
    if training:
        _verify_batch_size(input.size())
        output, mean, var = _ops.batch_norm_train(input, weight, bias, eps)
        if running_mean is not None or running_var is not None or num_batches_tracked is not None:
            count = input.numel() // input.shape[1] if input.shape[1] else 0
            _ops.batch_norm_update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), momentum, count
            )
        return output
    if running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    return _ops.batch_norm_elemt(input, weight, bias, running_mean, running_var, eps)


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
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
