"""A graph pass for torch.compile's inductor: bn_ext's BatchNorm ops followed by an activation
(and an add before it) become one fused batch_norm_act / batch_norm_act_train call, and the
eval-mode ops (fixed statistics) become torch's own eval BatchNorm, which inductor fuses.

bn_ext's ops are opaque to inductor, so without this pass the ReLU (and the residual add) after
each BatchNorm stays a separate kernel that reads and writes the whole tensor again, forward and
backward. The pass runs on the graph Dynamo captures (before autograd), where each module's
BatchNorm is one op call; bn_ext.fuse does the same for modules before compilation.

Registered with register() (bn_ext.fuse calls it; bn_ext's import does when inductor is already
loaded). It appends itself to torch._inductor.config.pre_grad_custom_pass, keeping what is there.
"""

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ._fuse import call_activation
from .functional import _activate

_ops = torch.ops.bn_ext
_TRAIN_UPDATE = _ops.batch_norm_train_update.default
_TRAIN = _ops.batch_norm_train.default
_ELEMT = _ops.batch_norm_elemt.default
_ACT = _ops.batch_norm_act.default
_ADDS = (operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_)


def _value(node):
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_tensor_type(a, b) -> bool:
    """Whether nodes a and b hold tensors of the same shape, dtype and device (no broadcasting
    or promotion in their add), as far as the graph's example values tell."""
    va, vb = _value(a), _value(b)
    return (
        va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype and va.device == vb.device
    )


def _batch_norm_output(node):
    """(the op node, its normalised output node) where `node` is bn_ext BatchNorm's output used
    only once, or None."""
    if len(node.users) != 1 or node.op != "call_function":
        return None
    if node.target is _ELEMT:
        return node, node
    if node.target is operator.getitem and node.args[1] == 0:
        op = node.args[0]
        if isinstance(op, fx.Node) and op.op == "call_function" and op.target in (_TRAIN, _TRAIN_UPDATE):
            # mean and var must be unused: the fused op returns them in float64
            if all(u.target is operator.getitem and u.args[1] == 0 for u in op.users) and len(op.users) == 1:
                return op, node
    return None


def _bound(op, names):
    """op's arguments by the schema's names, positional or keyword."""
    return [op.args[i] if i < len(op.args) else op.kwargs.get(n) for i, n in enumerate(names)]


def _fused_call(graph, op, residual, activation, slope):
    """The fused op's call replacing `op`, and whether it returns a tuple."""
    if op.target is _ELEMT:
        input_, weight, bias, mean, var, eps = _bound(op, ("input", "weight", "bias", "mean", "var", "eps"))
        args = (input_, weight, bias, residual, mean, var, eps, activation, slope)
        return graph.call_function(_ops.batch_norm_act.default, args), False
    if op.target is _TRAIN:
        input_, weight, bias, eps = _bound(op, ("input", "weight", "bias", "eps"))
        rm = rv = nbt = None
        momentum = 0.0  # no running statistics: unused
    else:
        names = ("input", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "momentum", "eps")
        input_, weight, bias, rm, rv, nbt, momentum, eps = _bound(op, names)
    args = (input_, weight, bias, residual, rm, rv, nbt, momentum, eps, activation, slope)
    return graph.call_function(_ops.batch_norm_act_train.default, args), True


def _pattern(op):
    """(normalised output, add or None, residual or None, activation node, (activation, slope))
    of the pattern starting at bn_ext BatchNorm op node `op`, or None."""
    if op.target is _ELEMT:
        out = op
    elif len(op.users) == 1:
        (out,) = op.users
        # the getitem of the output alone: mean and var unused (the fused op returns float64 ones)
        if out.target is not operator.getitem or out.args[1] != 0:
            return None
    else:
        return None
    if len(out.users) != 1:
        return None
    (user,) = out.users
    residual = add = None
    if user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 and not user.kwargs:
        other = user.args[1] if user.args[0] is out else user.args[0]
        if other is out or not isinstance(other, fx.Node) or len(user.users) != 1:
            return None
        if not (_same_tensor_type(other, out) and _same_tensor_type(user, out)):
            return None  # broadcasting or promoting adds keep torch's semantics
        residual, add = other, user
        (user,) = add.users
    act = call_activation(user)
    if act is None or user.args[0] is not (out if add is None else add):
        return None
    return out, add, residual, user, act


def fuse_graph(graph: fx.Graph) -> int:
    """Rewrites BN -> act and BN -> add -> act in a Dynamo graph; returns how many."""
    count = 0
    for op in list(graph.nodes):
        if op.op != "call_function" or op.target not in (_ELEMT, _TRAIN, _TRAIN_UPDATE):
            continue
        found = _pattern(op)
        if found is None:
            continue
        out, add, residual, user, act = found
        with graph.inserting_before(user):
            fused, is_tuple = _fused_call(graph, op, residual, *act)
            result = graph.call_function(operator.getitem, (fused, 0)) if is_tuple else fused
        result.meta.update(user.meta)
        user.replace_all_uses_with(result)
        for dead in dict.fromkeys(n for n in (user, add, out, op) if n is not None):
            graph.erase_node(dead)
        count += 1
    return count


def _fixed(node) -> bool:
    """Whether node is a graph input or attribute holding a tensor that takes no gradient (a
    running statistic), not something the graph computes (SyncBatchNorm's global statistics)."""
    v = _value(node)
    return (
        isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") and v is not None and not v.requires_grad
    )


def inline_eval(graph: fx.Graph) -> int:
    """Rewrites each eval-mode BatchNorm (batch_norm_elemt, batch_norm_act with running
    statistics) into torch's eval batch_norm (+ add, + activation); returns how many.

    With fixed statistics BatchNorm is a per-channel affine map: inductor folds torch's into the
    pointwise kernel that already reads or writes the tensor (the activation, the residual add),
    where our op is one more pass over memory behind a custom-op call. The numbers are torch's
    compiled eval BatchNorm's (equal to ours within rounding)."""
    count = 0
    for op in list(graph.nodes):
        if op.op != "call_function" or op.target not in (_ELEMT, _ACT):
            continue
        if op.target is _ELEMT:
            input_, weight, bias, mean, var, eps = _bound(op, ("input", "weight", "bias", "mean", "var", "eps"))
            residual, activation, slope = None, "identity", 0.0
        else:
            names = ("input", "weight", "bias", "residual", "mean", "var", "eps", "activation", "negative_slope")
            input_, weight, bias, residual, mean, var, eps, activation, slope = _bound(op, names)
        if not (_fixed(mean) and _fixed(var)) or _value(op) is None:
            continue
        with graph.inserting_before(op):
            y = graph.call_function(F.batch_norm, (input_, mean, var, weight, bias, False, 0.0, eps))
            if residual is not None:
                y = graph.call_function(operator.add, (y, residual))
            if activation != "identity":
                y = graph.call_function(_activate, (y, activation, slope))
        y.meta.update(op.meta)
        op.replace_all_uses_with(y)
        graph.erase_node(op)
        count += 1
    return count


class FuseBatchNormActivation(CustomGraphPass):
    """The pass, as inductor's pre_grad_custom_pass takes it (uuid() lets inductor cache the
    graphs it compiled with it)."""

    def __call__(self, graph: fx.Graph) -> None:
        inline_eval(graph)
        fuse_graph(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))


_PASS = FuseBatchNormActivation()


def register() -> None:
    """Add the pass to inductor's pre-grad passes (once), after any already there."""
    from torch._inductor import config

    current = config.pre_grad_custom_pass
    passes = list(current) if isinstance(current, (list, tuple)) else [] if current is None else [current]
    if any(isinstance(p, FuseBatchNormActivation) for p in passes):
        return
    config.pre_grad_custom_pass = passes + [_PASS] if passes else _PASS
