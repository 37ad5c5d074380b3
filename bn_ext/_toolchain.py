"""bn_ext's BatchNorm layers in torch's FX-based tools, as torch.nn's.

These tools know BatchNorm by exact class or by module name, so a subclass of torch.nn.BatchNorm2d
from another package is neither traced as one layer nor folded nor fused. Installed once, at
import; each hook leaves everything but bn_ext's layers to torch's own code, and a hook whose
torch function is missing (another torch release) is skipped.

- torch.fx tracing (symbolic_trace, and the quantization tracer): bn_ext layers are leaf modules,
  one call_module node each, as torch.nn's are (the fused BatchNormAct layers too; the fusers
  below match exact classes, so those are never folded, which would drop their activation).
- torch.fx.experimental.optimization.fuse: conv/linear + bn_ext BatchNorm fold as with torch.nn's.
- torch.ao.quantization.fuse_modules (eager mode): the same fuser methods as for torch.nn's.
- prepare_fx / prepare_qat_fx / fuse_fx: bn_ext layers of the traced copy are swapped for torch.nn
  layers holding the same tensors before fusion, so the copy fuses and quantizes as torch.nn's
  would (the user's model is not changed).
"""

import torch

from . import modules

_BN_TYPES = {
    modules.BatchNorm1d: torch.nn.BatchNorm1d,
    modules.BatchNorm2d: torch.nn.BatchNorm2d,
    modules.BatchNorm3d: torch.nn.BatchNorm3d,
}


def _torch_type(cls):
    return _BN_TYPES.get(cls, cls)


def _leaf_tracers():
    def leaf(original):
        def is_leaf_module(self, m, module_qualified_name):
            return type(m) in _BN_TYPES or isinstance(m, modules._ActMixin) or original(self, m, module_qualified_name)

        is_leaf_module.__wrapped__ = original
        return is_leaf_module

    torch.fx.Tracer.is_leaf_module = leaf(torch.fx.Tracer.is_leaf_module)
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    QuantizationTracer.is_leaf_module = leaf(QuantizationTracer.is_leaf_module)


def _fx_fuse():
    from torch.fx.experimental import optimization

    original = optimization.matches_module_pattern

    def matches_module_pattern(pattern, node, modules_by_name):
        if original(pattern, node, modules_by_name):
            return True
        # torch's exact-type test again, with bn_ext's classes read as torch.nn's
        if len(node.args) == 0:
            return False
        for expected, current in zip(pattern, (node.args[0], node)):
            if not isinstance(current, torch.fx.Node) or current.op != "call_module":
                return False
            if not isinstance(current.target, str) or current.target not in modules_by_name:
                return False
            if _torch_type(type(modules_by_name[current.target])) is not expected:
                return False
        return True

    matches_module_pattern.__wrapped__ = original
    optimization.matches_module_pattern = matches_module_pattern


def _quantization_fusers():
    from torch.ao.quantization import fuser_method_mappings as fm

    table = fm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for ours, theirs in _BN_TYPES.items():
        for key, fuser in list(table.items()):
            if theirs in key and callable(fuser):
                new_key = tuple(ours if t is theirs else t for t in key)
                table.setdefault(new_key, _with_torch_bn(fuser))


def _with_torch_bn(fuser):
    """The torch.nn fuser, handed torch.nn twins of bn_ext layers (QAT's fused modules check the
    BatchNorm's exact class; folding in eval reads only its tensors)."""
    from .convert import convert_model

    def fuse(is_qat, *mods):
        return fuser(is_qat, *[convert_model(m, to="torch") if type(m) in _BN_TYPES else m for m in mods])

    return fuse


def _fx_quantization():
    from torch.ao.quantization import quantize_fx

    original = quantize_fx._fuse_fx

    def _fuse_fx(graph_module, *args, **kwargs):
        from .convert import convert_model

        # the GraphModule's own hierarchy: swapping here leaves the user's model alone
        for child in list(graph_module.modules()):
            for child_name, grandchild in list(child.named_children()):
                if type(grandchild) in _BN_TYPES:
                    setattr(child, child_name, convert_model(grandchild, to="torch"))
        return original(graph_module, *args, **kwargs)

    _fuse_fx.__wrapped__ = original
    quantize_fx._fuse_fx = _fuse_fx


def install():
    for hook in (_leaf_tracers, _fx_fuse, _quantization_fusers, _fx_quantization):
        try:
            hook()
        except (ImportError, AttributeError):
            pass
