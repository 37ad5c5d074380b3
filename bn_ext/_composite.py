"""BatchNorm as a composite of differentiable torch ops: the path for torch.func transforms and
forward-mode AD.

The ops' own autograd is a C++ autograd function (csrc/autograd.cpp), which is fast but serves
neither functorch (grad, vjp, jacrev, jacfwd, hessian, vmap) nor forward-mode AD (dual tensors).
Under those, the modules and bn_ext.functional take this path instead: every derivative of every
order, batching and tangents come from torch's own op formulas. The running statistics still
move through bn_ext's op, with the same blend as the kernel path.
"""

import sys

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

_ops = torch.ops.bn_ext


def needed() -> bool:
    """Whether this call must take the composite: a functorch transform or a forward-AD dual level
    is active. torch.compile traces the ops themselves (their fake kernels and autograd)."""
    if torch.compiler.is_compiling():
        return False
    return _fwad._current_level >= 0 or torch._C._are_functorch_transforms_active()


_onnx_flags = None  # (exporter flags, TorchScript exporter globals) once torch.onnx is imported


def onnx_exporting() -> bool:
    """Whether torch.onnx.export (either exporter) is tracing this call. Then the modules run
    torch.nn's own forward, which exports as ONNX BatchNormalization; bn_ext's ops have no ONNX
    form. torch.onnx.is_in_onnx_export() costs 3.6 us a call (two imports): read its two flags."""
    global _onnx_flags
    if torch.compiler.is_dynamo_compiling():
        return False  # torch.compile: the flags' getters are off-limits to dynamo, and it is not exporting
    if _onnx_flags is None:
        if "torch.onnx" not in sys.modules:
            return False  # nothing can be exporting
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:  # another torch layout: the public (slower) function
            _onnx_flags = False
        else:
            _onnx_flags = (_flags, GLOBALS)
    if _onnx_flags is False:
        return torch.onnx.is_in_onnx_export()
    return bool(_onnx_flags[0]._is_onnx_exporting or _onnx_flags[1].in_onnx_export)


def _per_channel(t: Tensor, dims: int) -> Tensor:
    return t.reshape([1, -1] + [1] * (dims - 2))


def batch_norm(
    input: Tensor,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum,
    eps: float,
    num_batches_tracked=None,
) -> Tensor:
    """F.batch_norm's result, computed in float32 (float64 for float64 input) as the kernels do.
    Arguments have been checked by the caller; in training the running statistics (where given)
    are updated by batch_norm_update_running_stats from the detached batch statistics."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc)
    dims = [0] + list(range(2, input.dim()))
    if training:
        mean = x.mean(dims)
        var = x.var(dims, correction=0)
        if running_mean is not None or running_var is not None or num_batches_tracked is not None:
            count = input.numel() // input.shape[1] if input.shape[1] else 0
            _ops.batch_norm_update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), momentum, count
            )
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = 1.0 / torch.sqrt(var + eps)
    y = (x - _per_channel(mean, input.dim())) * _per_channel(invstd, input.dim())
    if weight is not None:
        y = y * _per_channel(weight.to(acc), input.dim())
    if bias is not None:
        y = y + _per_channel(bias.to(acc), input.dim())
    return y.to(input.dtype)
