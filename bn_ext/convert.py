"""Swap torch.nn BatchNorm layers for bn_ext's in a model, and back."""
import torch

from . import modules

_TO_BN_EXT = {
    torch.nn.BatchNorm1d: modules.BatchNorm1d,
    torch.nn.BatchNorm2d: modules.BatchNorm2d,
    torch.nn.BatchNorm3d: modules.BatchNorm3d,
    torch.nn.LazyBatchNorm1d: modules.LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d: modules.LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d: modules.LazyBatchNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_BN_EXT.items()}


def _swap(bn, cls):
    """A `cls` holding bn's very parameters and buffers (so optimisers keep tracking them)."""
    lazy = isinstance(bn, torch.nn.modules.lazy.LazyModuleMixin)
    if lazy:
        new = cls(bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    else:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name)) if getattr(bn, name) is not None else new.register_parameter(name, None)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(bn, name))
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def convert_model(module: torch.nn.Module, to: str = "bn_ext") -> torch.nn.Module:
    """Replace every torch.nn.BatchNorm{1,2,3}d (and Lazy form) in `module` by bn_ext's, or the
    reverse with ``to="torch"``. Parameters and buffers are the same tensor objects, so device,
    dtype, values, requires_grad and optimiser state carry over, and so does train/eval mode.
    Returns the converted module (a new object when `module` itself is a BatchNorm)."""
    if to not in ("bn_ext", "torch"):
        raise ValueError(f"convert_model: to: expected 'bn_ext' or 'torch', got {to!r}")
    mapping = _TO_BN_EXT if to == "bn_ext" else _TO_TORCH
    cls = mapping.get(type(module))
    if cls is not None:
        return _swap(module, cls)
    for name, child in module.named_children():
        converted = convert_model(child, to)
        if converted is not child:
            setattr(module, name, converted)
    return module
