"""bn_ext.fuse: BatchNorm -> activation and BatchNorm -> add -> activation in a model become
bn_ext's fused BatchNormAct layers."""

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import modules

log = logging.getLogger("bn_ext")

# BatchNorm classes whose forward is plain BatchNorm (exact classes: a subclass may do more).
_FUSABLE = {
    nn.BatchNorm1d: modules.BatchNormAct1d,
    nn.BatchNorm2d: modules.BatchNormAct2d,
    nn.BatchNorm3d: modules.BatchNormAct3d,
    modules.BatchNorm1d: modules.BatchNormAct1d,
    modules.BatchNorm2d: modules.BatchNormAct2d,
    modules.BatchNorm3d: modules.BatchNormAct3d,
    # SyncBatchNorm takes the epilogue itself
    nn.SyncBatchNorm: modules.SyncBatchNorm,
    modules.SyncBatchNorm: modules.SyncBatchNorm,
}

_ADDS = {operator.add, operator.iadd, torch.add}


def _module_activation(m):
    """(activation, negative_slope) of an activation module, or None."""
    if type(m) is nn.ReLU:
        return "relu", 0.0
    if type(m) is nn.ReLU6:
        return "relu6", 0.0
    if type(m) is nn.SiLU:
        return "silu", 0.0
    if type(m) is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0:
        return "relu6", 0.0
    if type(m) is nn.Identity:
        return "identity", 0.0
    return None


def _arg(node, index, name, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def call_activation(node):
    """(activation, negative_slope) that a call_function or call_method node of an FX graph (a
    symbolic trace's or Dynamo's) applies to its first argument, or None."""
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return "relu", 0.0
        return None
    if node.op != "call_function" or not node.args:
        return None
    t = node.target
    if t in (F.relu, torch.relu, torch.relu_, F.relu_):
        return "relu", 0.0
    if t is F.relu6:
        return "relu6", 0.0
    if t is F.silu:
        return "silu", 0.0
    if t in (F.leaky_relu, torch._C._nn.leaky_relu):
        slope = _arg(node, 1, "negative_slope", 0.01)
        return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
    if t in (F.hardtanh, torch._C._nn.hardtanh) and (
        _arg(node, 1, "min_val", -1.0) == 0.0 and _arg(node, 2, "max_val", 1.0) == 6.0
    ):
        return "relu6", 0.0
    return None


def _node_activation(node, named):
    """(activation, negative_slope) that `node` applies to its first argument, or None."""
    if node.op == "call_module":
        return _module_activation(named.get(node.target))
    return call_activation(node)


def _is_add(node):
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _fused_layer(bn, activation, negative_slope, cls=None):
    """A BatchNormAct layer (cls, or the one for bn's class) holding bn's parameter and buffer
    objects."""
    cls = cls or _FUSABLE[type(bn)]
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        setattr(new, key, getattr(bn, key))
    if cls is modules.SyncBatchNorm:
        new.process_group = bn.process_group
        new._num_features_checked = set()
    for name, p in bn._parameters.items():
        new.register_parameter(name, p)
    for name, b in bn._buffers.items():
        new.register_buffer(name, b, persistent=name not in bn._non_persistent_buffers_set)
    new.activation = activation
    new.negative_slope = negative_slope
    return new


def _timm_batch_norm_act(m):
    """timm's BatchNormAct2d (BatchNorm2d, then its `drop` and `act`) as a bn_ext layer, or None."""
    cls = type(m)
    if not (cls.__module__.startswith("timm.") and cls.__name__ == "BatchNormAct2d"):
        return None
    if type(getattr(m, "drop", None)) is not nn.Identity:
        return None
    act = _module_activation(getattr(m, "act", None))
    if act is None:
        return None
    return _fused_layer(m, *act, cls=modules.BatchNormAct2d)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule it calls is one call_module node."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


def _fuse_graph(graph, named):
    """Rewrites BN -> act and BN -> add -> act in `graph`; returns {bn target: (act, slope)}
    and the count. A BN whose output (or whose add's output) has another user stays."""
    fused = {}
    for bn in list(graph.nodes):
        layer = named.get(bn.target)
        if bn.op != "call_module" or type(layer) not in _FUSABLE:
            continue
        if getattr(layer, "activation", "identity") != "identity":
            continue  # a SyncBatchNorm with an epilogue already
        if len(bn.users) != 1 or len(bn.args) != 1 or bn.kwargs or bn.target in fused:
            continue
        if sum(1 for n in graph.nodes if n.op == "call_module" and n.target == bn.target) != 1:
            continue  # the layer is called more than once: one call cannot change alone
        (user,) = bn.users
        residual = None
        if _is_add(user) and len(user.users) == 1:
            other = user.args[1] if user.args[0] is bn else user.args[0]
            if other is bn or not isinstance(other, fx.Node):
                continue
            residual, add = other, user
            (user,) = add.users
        act = _node_activation(user, named)
        if act is None or user.args[0] is not (bn if residual is None else add):
            continue
        if residual is not None and act[0] == "identity":
            continue  # BN + add alone: nothing to gain from changing the layer
        with graph.inserting_after(user):
            new = graph.call_module(bn.target, (bn.args[0],) if residual is None else (bn.args[0], residual))
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        if residual is not None:
            graph.erase_node(add)
        graph.erase_node(bn)
        fused[bn.target] = act
    return fused


def _fuse_module(module):
    """The module with its own patterns fused (a GraphModule where its forward changed), and the
    count; its children have been fused already."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # control flow on values, or a forward FX cannot trace: leave it
        return module, 0
    named = dict(module.named_modules())
    fused = _fuse_graph(graph, named)
    if not fused:
        return module, 0
    for target, (activation, slope) in fused.items():
        parent, _, name = target.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, name, _fused_layer(named[target], activation, slope))
    graph.lint()
    new = fx.GraphModule(module, graph, class_name=type(module).__name__)
    new.training = module.training
    _keep_order(new, module)
    return new, len(fused)


def _keep_order(new, old):
    """GraphModule registers submodules in the order the graph calls them: restore the original
    order (so state_dict keys come in the same order), recursively."""
    first = [name for name in old._modules if name in new._modules]
    new._modules = {name: new._modules[name] for name in first + [n for n in new._modules if n not in first]}
    for name, child in new._modules.items():
        original = old._modules.get(name)
        if child is not None and original is not None and child is not original:
            _keep_order(child, original)


def _fuse_tree(module):
    count = 0
    for name, child in list(module.named_children()):
        timm_layer = _timm_batch_norm_act(child)
        if timm_layer is not None:
            setattr(module, name, timm_layer)
            count += 1
            continue
        new, n = _fuse_tree(child)
        if new is not child:
            setattr(module, name, new)
        count += n
    new, n = _fuse_module(module)
    return new, count + n


def fuse(model: nn.Module) -> nn.Module:
    """Fuses each BatchNorm (torch.nn's or bn_ext's BatchNorm1d/2d/3d or SyncBatchNorm; the latter
    become bn_ext.SyncBatchNorm with an activation) that is followed by an
    activation (ReLU, ReLU6, LeakyReLU, SiLU; module, function or method, in-place or not), or by
    an add and then an activation (``out = bn(x); out += identity; out = relu(out)``), into one
    bn_ext BatchNormAct layer. timm's BatchNormAct2d layers are converted directly.

    The fused layers hold the original parameter and buffer objects under the original names, so
    the fused model's state_dict loads into the original model and back. A module whose forward
    changed becomes a ``torch.fx.GraphModule`` with the same submodules; modules FX cannot trace,
    and patterns whose BatchNorm or add output is also used elsewhere, are left as they are.
    Changes ``model`` in place where it can and returns the fused model; its ``bn_ext_fused``
    attribute says how many layers were fused. Also turns on bn_ext.enable_compile_fusion, so
    torch.compile fuses the patterns this left (untraceable modules, functional calls).
    """
    from . import enable_compile_fusion

    enable_compile_fusion()  # what module fusion cannot see, compiled graphs still fuse
    root = _timm_batch_norm_act(model)
    if root is not None:
        root.bn_ext_fused = 1
        return root
    new, count = _fuse_tree(model)
    new.bn_ext_fused = count
    log.info("bn_ext.fuse: fused %d BatchNorm layers with their activations", count)
    return new
