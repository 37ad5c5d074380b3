"""Swap torch.nn BatchNorm layers for bn_ext's in a model, and back; or make them all sync."""
import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from . import modules

_TO_BN_EXT = {
    torch.nn.BatchNorm1d: modules.BatchNorm1d,
    torch.nn.BatchNorm2d: modules.BatchNorm2d,
    torch.nn.BatchNorm3d: modules.BatchNorm3d,
    torch.nn.LazyBatchNorm1d: modules.LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d: modules.LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d: modules.LazyBatchNorm3d,
    torch.nn.SyncBatchNorm: modules.SyncBatchNorm,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_BN_EXT.items()}
_SYNC = (torch.nn.SyncBatchNorm, modules.SyncBatchNorm)


def _swap(bn, cls, process_group=None):
    """A `cls` holding bn's very parameters and buffers (so optimisers keep tracking them)."""
    lazy = isinstance(bn, torch.nn.modules.lazy.LazyModuleMixin)
    if lazy and issubclass(cls, _SYNC):
        raise ValueError(
            f"convert_model: {type(bn).__name__} has not seen an input yet (num_features unknown): "
            "run one forward pass before converting it to SyncBatchNorm"
        )
    args = (bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if lazy:
        new = cls(*args)
    elif issubclass(cls, _SYNC):
        new = cls(bn.num_features, *args, process_group=process_group, device="meta")
    else:
        new = cls(bn.num_features, *args, device="meta")
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name)) if getattr(bn, name) is not None else new.register_parameter(name, None)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(bn, name))
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def _target(module, to):
    """The class `module` becomes, or None to leave it alone."""
    if to == "sync":
        return modules.SyncBatchNorm if isinstance(module, _TorchBatchNorm) else None
    mapping = _TO_BN_EXT if to == "bn_ext" else _TO_TORCH
    return mapping.get(type(module))


def convert_model(module: torch.nn.Module, to: str = "bn_ext", *, process_group=None) -> torch.nn.Module:
    """Replace BatchNorm layers in `module`:

    - ``to="bn_ext"``: every torch.nn.BatchNorm{1,2,3}d, Lazy form and SyncBatchNorm by bn_ext's;
    - ``to="torch"``: the reverse;
    - ``to="sync"``: every BatchNorm (torch.nn's or bn_ext's, sync or not) by bn_ext.SyncBatchNorm
      over ``process_group`` (None: the default group), as SyncBatchNorm.convert_sync_batchnorm.

    Parameters and buffers are the same tensor objects, so device, dtype, values, requires_grad
    and optimiser state carry over, and so does train/eval mode. A SyncBatchNorm converted to or
    from torch keeps its own process group. Returns the converted module (a new object when
    `module` itself is a BatchNorm).
    """
    if to not in ("bn_ext", "torch", "sync"):
        raise ValueError(f"convert_model: to: expected 'bn_ext', 'torch' or 'sync', got {to!r}")
    cls = _target(module, to)
    if cls is not None:
        group = process_group if to == "sync" else getattr(module, "process_group", None)
        return _swap(module, cls, group)
    for name, child in module.named_children():
        converted = convert_model(child, to, process_group=process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
