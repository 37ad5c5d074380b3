"""BatchNorm modules: drop-in replacements for torch.nn.BatchNorm1d/2d/3d and their Lazy forms."""

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules import batchnorm as _torch_bn

from . import _composite, _sync
from .functional import (
    _activate,
    _batch_norm,
    _batch_norm_act,
    _check_activation,
    _check_args,
    _check_buffers,
    _check_counter,
    _ops,
    _verify_batch_size,
)

_elemt = _ops.batch_norm_elemt.default
_train_update = _ops.batch_norm_train_update.default


def _member(module, table, name):
    """module.<name> read from `table` (its _parameters or _buffers) where it is there, as
    Module.__getattr__ would find it, without that method's cost (about 0.4 us a name; a module
    call reads five); getattr where it is not."""
    return table[name] if name in table else getattr(module, name)


class _BatchNorm(_torch_bn._BatchNorm):
    """torch.nn's _BatchNorm running on bn_ext's kernels.

    Same constructor, parameters and buffers as torch.nn.modules.batchnorm._BatchNorm (it is a
    subclass), so state_dicts load both ways and isinstance checks keep working.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum=0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # Older torch releases lack the `bias` keyword: build as they do, then drop the bias.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if affine and not bias:
            self.register_parameter("bias", None)

    def _check_channels(self, input: Tensor) -> None:
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"{type(self).__name__}: input: expected {self.num_features} channels (num_features) in dim 1, "
                f"got input of size {tuple(input.shape)}"
            )

    def _buffers_and_momentum(self):
        """(running_mean, running_var, num_batches_tracked, momentum) for this call: the running
        stats are passed when they are updated (training) or used (eval), the counter only when
        they are updated."""
        update = self.training and self.track_running_stats
        keep_buffers = not self.training or self.track_running_stats
        buffers = self._buffers
        nbt = _member(self, buffers, "num_batches_tracked") if update else None
        momentum = self.momentum
        if momentum is None and nbt is None:
            momentum = 0.0  # nothing is averaged: the factor is unused
        running_mean = _member(self, buffers, "running_mean") if keep_buffers else None
        running_var = _member(self, buffers, "running_var") if keep_buffers else None
        return running_mean, running_var, nbt, momentum

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._forward(input)

    def _scripted_check_input(self, input: Tensor) -> None:
        """The input checks of the scripted forwards (_check_channels names the class through
        type(self), which TorchScript does not compile)."""
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise RuntimeError(
                "input: expected "
                + str(self.num_features)
                + " channels (num_features) in dim 1, got input of size "
                + str(input.size())
            )

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """forward for TorchScript: the same ops, called from a scripted module (in C++ too, where
        the bn_ext library is loaded)."""
        self._scripted_check_input(input)
        running_mean = self.running_mean
        running_var = self.running_var
        if not self.training and running_mean is not None and running_var is not None:
            return torch.ops.bn_ext.batch_norm_elemt(input, self.weight, self.bias, running_mean, running_var, self.eps)
        if self.training:
            _verify_batch_size(input.size())
        if self.training and self.track_running_stats:
            return torch.ops.bn_ext.batch_norm_train_update(
                input,
                self.weight,
                self.bias,
                running_mean,
                running_var,
                self.num_batches_tracked,
                self.momentum,
                self.eps,
            )[0]
        return torch.ops.bn_ext.batch_norm_train(input, self.weight, self.bias, self.eps)[0]

    @torch.jit.unused
    def _forward(self, input: Tensor) -> Tensor:
        if _composite.onnx_exporting():
            # torch.nn's forward, which the exporters turn into ONNX BatchNormalization
            return _torch_bn._BatchNorm.forward(self, input)
        self._check_input_dim(input)
        self._check_channels(input)
        params = self._parameters
        weight, bias = _member(self, params, "weight"), _member(self, params, "bias")
        # The two common calls, eval on running statistics and training that updates them, go
        # straight to their op with its overload bound once: a module call's fixed cost is most
        # of a small layer's forward. What _batch_norm would check for them is checked here.
        buffers = self._buffers
        running_mean, running_var = _member(self, buffers, "running_mean"), _member(self, buffers, "running_var")
        if (
            running_mean is not None
            and running_var is not None
            and not running_mean.requires_grad
            and not running_var.requires_grad
            and not _composite.needed()
        ):
            if not self.training:
                _check_args(False, self.momentum, self.eps)
                return _elemt(input, weight, bias, running_mean, running_var, self.eps)
            nbt = _member(self, buffers, "num_batches_tracked")
            if self.track_running_stats and nbt is not None:
                _check_args(True, self.momentum, self.eps)
                _verify_batch_size(input.size())
                _check_counter(nbt, self.momentum)
                return _train_update(input, weight, bias, running_mean, running_var, nbt, self.momentum, self.eps)[0]
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running_mean, running_var, nbt, momentum = self._buffers_and_momentum()
        return _batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, momentum, self.eps, nbt)


# Each class is also a subclass of its torch.nn namesake, so code that finds BatchNorm layers by
# isinstance (freezing them, excluding them from weight decay) finds ours too. _BatchNorm comes
# first in each: its forward runs; torch.nn's class gives _check_input_dim and its messages.


class BatchNorm1d(_BatchNorm, _torch_bn.BatchNorm1d):
    """BatchNorm over (N, C) or (N, C, L) input; see torch.nn.BatchNorm1d."""


class BatchNorm2d(_BatchNorm, _torch_bn.BatchNorm2d):
    """BatchNorm over (N, C, H, W) input; see torch.nn.BatchNorm2d."""


class BatchNorm3d(_BatchNorm, _torch_bn.BatchNorm3d):
    """BatchNorm over (N, C, D, H, W) input; see torch.nn.BatchNorm3d."""


def _fusable_residual(input: Tensor, residual) -> bool:
    """Whether the fused op takes the residual as it is: a tensor of the input's shape, dtype and
    device."""
    return (
        isinstance(residual, Tensor)
        and residual.shape == input.shape
        and residual.dtype == input.dtype
        and residual.device == input.device
    )


class _ActMixin:
    """BatchNorm followed by an activation, with an optional residual added in between:
    forward(input, residual=None) is act(BN(input) + residual), in one fused pass."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum=0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        _check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation = activation
        self.negative_slope = negative_slope

    def extra_repr(self) -> str:
        return super().extra_repr() + (_act_extra_repr(self) or ", activation='identity'")

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_act_forward(input, residual)
        return self._eager_act_forward(input, residual)

    @torch.jit.unused
    def _eager_act_forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        return _act_forward(self, input, residual, super().forward)

    def _scripted_act_forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        """forward for TorchScript: the fused ops, called from a scripted module."""
        if residual is not None and (
            residual.size() != input.size() or residual.dtype != input.dtype or residual.device != input.device
        ):
            # a residual that broadcasts or promotes: torch's add semantics, in separate passes
            return _activate(self._scripted_forward(input) + residual, self.activation, self.negative_slope)
        self._scripted_check_input(input)
        running_mean = self.running_mean
        running_var = self.running_var
        if not self.training and running_mean is not None and running_var is not None:
            return torch.ops.bn_ext.batch_norm_act(
                input,
                self.weight,
                self.bias,
                residual,
                running_mean,
                running_var,
                self.eps,
                self.activation,
                self.negative_slope,
            )
        if self.training:
            _verify_batch_size(input.size())
        # batch statistics; the running ones updated in training, where they are tracked
        update = self.training and self.track_running_stats
        return torch.ops.bn_ext.batch_norm_act_train(
            input,
            self.weight,
            self.bias,
            residual,
            running_mean if update else None,
            running_var if update else None,
            self.num_batches_tracked if update else None,
            self.momentum,
            self.eps,
            self.activation,
            self.negative_slope,
        )[0]


def _act_extra_repr(module) -> str:
    if module.activation == "identity":
        return ""
    extra = f", activation={module.activation!r}"
    if module.activation == "leaky_relu":
        extra += f", negative_slope={module.negative_slope}"
    return extra


def _act_forward(module, input: Tensor, residual, plain_forward) -> Tensor:
    """act(BN(input) + residual) for a BatchNorm module with `activation` and `negative_slope`
    attributes, on its own statistics (no collective); plain_forward is its BatchNorm alone."""
    if _composite.onnx_exporting():
        # torch.nn's BatchNorm and torch's activation, which the exporters know
        z = _torch_bn._BatchNorm.forward(module, input)
        return _activate(z if residual is None else z + residual, module.activation, module.negative_slope)
    if residual is not None and not _fusable_residual(input, residual):
        # a residual that broadcasts or promotes: torch's add semantics, in separate passes
        return _activate(plain_forward(input) + residual, module.activation, module.negative_slope)
    module._check_input_dim(input)
    module._check_channels(input)
    params = module._parameters
    weight, bias = _member(module, params, "weight"), _member(module, params, "bias")
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    running_mean, running_var, nbt, momentum = module._buffers_and_momentum()
    return _batch_norm_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        use_batch_stats,
        momentum,
        module.eps,
        nbt,
        residual,
        module.activation,
        module.negative_slope,
    )


class BatchNormAct1d(_ActMixin, BatchNorm1d):
    """BatchNorm1d fused with an activation (and a residual add); see bn_ext.functional.batch_norm_act."""


class BatchNormAct2d(_ActMixin, BatchNorm2d):
    """BatchNorm2d fused with an activation (and a residual add); see bn_ext.functional.batch_norm_act."""


class BatchNormAct3d(_ActMixin, BatchNorm3d):
    """BatchNorm3d fused with an activation (and a residual add); see bn_ext.functional.batch_norm_act."""


class LazyBatchNorm1d(_torch_bn.LazyBatchNorm1d, _BatchNorm):
    """BatchNorm1d whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(_torch_bn.LazyBatchNorm2d, _BatchNorm):
    """BatchNorm2d whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(_torch_bn.LazyBatchNorm3d, _BatchNorm):
    """BatchNorm3d whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span every rank of a torch.distributed process group:
    drop-in for torch.nn.SyncBatchNorm that also runs on CPU (gloo) and is exact when ranks hold
    different batch sizes (including none).

    Same constructor, parameters and buffers as torch.nn.SyncBatchNorm; takes (N, C, *) input of
    2 to 5 dimensions, any memory format. In eval mode, with a group of one, or without an
    initialised torch.distributed it is a plain bn_ext BatchNorm and runs no collective.
    See bn_ext/_sync.py for the collectives of a training step.

    ``activation`` (default ``"identity"``: plain BatchNorm) and ``negative_slope`` give it the
    fused epilogue of the BatchNormAct layers: ``forward(input, residual=None)`` is then
    ``act(BN(input) + residual)``, applied in the pass that writes the output.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum=0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str = "identity",
        negative_slope: float = 0.01,
    ) -> None:
        _check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group
        self.activation = activation
        self.negative_slope = negative_slope
        self._num_features_checked = set()  # names of the groups that agreed on num_features

    def extra_repr(self) -> str:
        return super().extra_repr() + _act_extra_repr(self)

    def __setstate__(self, state):
        # modules pickled before the fused epilogue existed are plain BatchNorm
        state.setdefault("activation", "identity")
        state.setdefault("negative_slope", 0.01)
        super().__setstate__(state)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor, residual=None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        self._check_channels(input)
        plain = self.activation == "identity" and residual is None
        group = _sync.sync_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input) if plain else _act_forward(self, input, residual, super().forward)
        group_size = torch.distributed.get_world_size(group)
        _check_args(True, self.momentum, self.eps)
        running_mean, running_var, nbt, momentum = self._buffers_and_momentum()
        if self.track_running_stats:
            _check_buffers(input, running_mean, running_var, nbt)
        if not torch.compiler.is_compiling() and group.group_name not in self._num_features_checked:
            _sync.check_num_features(self.num_features, input.device, group, group_size)
            self._num_features_checked.add(group.group_name)
        with torch.no_grad():
            mean, var, count = _sync.gather_batch_stats(
                input.detach(), running_mean, running_var, nbt, momentum, group, group_size
            )
        if plain or (residual is not None and not _fusable_residual(input, residual)):
            y = _sync.SyncBatchNormFunction.apply(
                input, self.weight, self.bias, mean, var, count, self.eps, group, group_size
            )
            if plain:
                return y
            # a residual that broadcasts or promotes: torch's add semantics, in separate passes
            return _activate(y + residual, self.activation, self.negative_slope)
        return _sync.SyncBatchNormActFunction.apply(
            input,
            self.weight,
            self.bias,
            residual,
            mean,
            var,
            count,
            self.eps,
            self.activation,
            self.negative_slope,
            group,
            group_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm*d in `module` (torch.nn's, bn_ext's, and torch.nn.SyncBatchNorm)
        with bn_ext.SyncBatchNorm over `process_group`, as torch.nn.SyncBatchNorm's method of the
        same name does. Parameters and buffers are the same tensor objects. Returns the converted
        module (a new object when `module` itself is a BatchNorm)."""
        from .convert import convert_model

        return convert_model(module, to="sync", process_group=process_group)
