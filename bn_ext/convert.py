"""Swap torch.nn BatchNorm layers for bn_ext's in a model, and back; or make them all sync."""

import warnings

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
    if issubclass(cls, modules.SyncBatchNorm):
        # a fused layer's epilogue carries over (SyncBatchNorm has the same one)
        new.activation = getattr(bn, "activation", "identity")
        new.negative_slope = getattr(bn, "negative_slope", 0.01)
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


# Subclasses of torch.nn.BatchNorm1d/2d/3d from other code (timm's BatchNormAct2d, a project's
# own BatchNorm with an extra method) are converted in place: the object's class becomes a
# subclass of both bn_ext's _BatchNorm and its own class, so it keeps every attribute, submodule,
# hook and method, and its BatchNorm runs on bn_ext's kernels. That is only right where the
# subclass's forward is torch.nn's (or one this file knows); the others are left, with a warning.
_TORCH_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_converted_classes = {}  # their class -> its bn_ext form


def _rebuild_converted(original_cls, state):
    module = object.__new__(_subclass_form(original_cls))
    module.__dict__.update(state)
    return module


class _ConvertedForm:
    """Pickles (and deep-copies) a converted layer by its original class, which pickle can find;
    the class made here for it cannot be found by name."""

    def __reduce_ex__(self, protocol):
        return _rebuild_converted, (type(self).__dict__["_bn_ext_converted_from"], self.__dict__)


class _ActAfterBatchNorm(modules._BatchNorm):
    """timm's BatchNormAct2d forward: BatchNorm, then self.drop, then self.act."""

    def forward(self, input):
        return self.act(self.drop(modules._BatchNorm.forward(self, input)))


def _timm_batch_norm_act(cls) -> bool:
    return cls.__module__.startswith("timm.") and cls.__name__ == "BatchNormAct2d"


def _subclass_form(cls):
    """The bn_ext form of a torch.nn BatchNorm subclass, or None when its forward is unknown."""
    if cls in _converted_classes:
        return _converted_classes[cls]
    if cls.forward is _TorchBatchNorm.forward:
        bases = (_ConvertedForm, modules._BatchNorm, cls)
    elif _timm_batch_norm_act(cls):
        bases = (_ConvertedForm, _ActAfterBatchNorm, cls)
    else:
        return None
    form = type(
        cls.__name__,
        bases,
        {"__module__": cls.__module__, "_bn_ext_converted_from": cls, "__qualname__": cls.__qualname__},
    )
    _converted_classes[cls] = form
    return form


def _convert_subclass(module, to):
    """module in its new class (the same object), or None to leave it (to="bn_ext" only)."""
    if to == "torch":
        original = type(module).__dict__.get("_bn_ext_converted_from")
        if original is not None:
            module.__class__ = original
        return module
    if isinstance(module, modules._BatchNorm):
        return module
    if not isinstance(module, _TORCH_BN):
        return None  # a subclass of SyncBatchNorm or of _BatchNorm itself: not carried
    form = _subclass_form(type(module))
    if form is None:
        return None
    module.__class__ = form
    return module


def _target(module, to):
    """The class `module` becomes, or None to leave it alone."""
    if to == "sync":
        return modules.SyncBatchNorm if isinstance(module, _TorchBatchNorm) else None
    mapping = _TO_BN_EXT if to == "bn_ext" else _TO_TORCH
    return mapping.get(type(module))


def _has_epilogue(module) -> bool:
    return isinstance(module, modules._ActMixin) or getattr(module, "activation", "identity") != "identity"


def _convert(module, to, process_group, name, left):
    if to == "torch" and isinstance(module, modules._BatchNorm) and _has_epilogue(module):
        # torch.nn's BatchNorm layers have no fused activation: converting would drop it
        left.append(f"{name or '(the model itself)'} ({type(module).__module__}.{type(module).__qualname__})")
        return module
    cls = _target(module, to)
    if cls is not None:
        group = process_group if to == "sync" else getattr(module, "process_group", None)
        return _swap(module, cls, group)
    if to != "sync" and isinstance(module, _TorchBatchNorm):
        converted = _convert_subclass(module, to)
        if converted is None:
            left.append(f"{name or '(the model itself)'} ({type(module).__module__}.{type(module).__qualname__})")
            return module
    for child_name, child in module.named_children():
        converted = _convert(child, to, process_group, f"{name}.{child_name}" if name else child_name, left)
        if converted is not child:
            setattr(module, child_name, converted)
    return module


def convert_model(module: torch.nn.Module, to: str = "bn_ext", *, process_group=None) -> torch.nn.Module:
    """Replace BatchNorm layers in `module`:

    - ``to="bn_ext"``: every torch.nn.BatchNorm{1,2,3}d, Lazy form and SyncBatchNorm by bn_ext's;
      subclasses of torch.nn.BatchNorm{1,2,3}d that keep torch.nn's forward, and timm's
      BatchNormAct2d, run on bn_ext's kernels in place (same object, every attribute kept). Any
      other subclass is left as it is, with a warning naming each such layer;
    - ``to="torch"``: the reverse;
    - ``to="sync"``: every BatchNorm (torch.nn's or bn_ext's, sync or not) by bn_ext.SyncBatchNorm
      over ``process_group`` (None: the default group), as SyncBatchNorm.convert_sync_batchnorm.
      A fused layer (BatchNormAct*d, from bn_ext.fuse) keeps its activation and residual input.

    Going to torch, layers with a fused activation are left as they are, with the warning.

    Parameters and buffers are the same tensor objects, so device, dtype, values, requires_grad
    and optimiser state carry over, and so does train/eval mode. A SyncBatchNorm converted to or
    from torch keeps its own process group. Returns the converted module (a new object when
    `module` itself is one of torch.nn's BatchNorm classes).
    """
    if to not in ("bn_ext", "torch", "sync"):
        raise ValueError(f"convert_model: to: expected 'bn_ext', 'torch' or 'sync', got {to!r}")
    left = []
    converted = _convert(module, to, process_group, "", left)
    if left:
        warnings.warn(
            f"convert_model: left {len(left)} BatchNorm layer(s) on torch.nn's kernels: their class overrides "
            "forward or derives from a class bn_ext does not convert: " + ", ".join(left),
            stacklevel=2,
        )
    return converted
