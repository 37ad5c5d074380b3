"""BatchNorm modules: drop-in replacements for torch.nn.BatchNorm1d/2d/3d and their Lazy forms."""
from torch import Tensor
from torch.nn.modules import batchnorm as _torch_bn

from .functional import _batch_norm


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

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"{type(self).__name__}: input: expected {self.num_features} channels (num_features) in dim 1, "
                f"got input of size {tuple(input.shape)}"
            )
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats
        keep_buffers = not self.training or self.track_running_stats
        nbt = self.num_batches_tracked if update else None
        momentum = self.momentum
        if momentum is None and nbt is None:
            momentum = 0.0  # nothing is averaged: the factor is unused
        return _batch_norm(
            input,
            self.running_mean if keep_buffers else None,
            self.running_var if keep_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            nbt,
        )


def _check_dims(input: Tensor, allowed, what: str) -> None:
    if input.dim() not in allowed:
        raise ValueError(f"expected {what} input (got {input.dim()}D input)")


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input; see torch.nn.BatchNorm1d."""

    def _check_input_dim(self, input):
        _check_dims(input, (2, 3), "2D or 3D")


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W) input; see torch.nn.BatchNorm2d."""

    def _check_input_dim(self, input):
        _check_dims(input, (4,), "4D")


class BatchNorm3d(_BatchNorm):
    """BatchNorm over (N, C, D, H, W) input; see torch.nn.BatchNorm3d."""

    def _check_input_dim(self, input):
        _check_dims(input, (5,), "5D")


class LazyBatchNorm1d(_torch_bn._LazyNormBase, _BatchNorm):
    """BatchNorm1d whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]

    def _check_input_dim(self, input):
        _check_dims(input, (2, 3), "2D or 3D")


class LazyBatchNorm2d(_torch_bn._LazyNormBase, _BatchNorm):
    """BatchNorm2d whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]

    def _check_input_dim(self, input):
        _check_dims(input, (4,), "4D")


class LazyBatchNorm3d(_torch_bn._LazyNormBase, _BatchNorm):
    """BatchNorm3d whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]

    def _check_input_dim(self, input):
        _check_dims(input, (5,), "5D")
