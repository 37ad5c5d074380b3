"""bn_ext: hand-written CPU and CUDA BatchNorm kernels, drop-in for torch.nn.BatchNorm*d."""

import sys

import torch  # noqa: F401  (the library below links against torch's)

from . import _C  # noqa: F401  loads the library, which registers the bn_ext ops
from . import _autograd, _fake, _vmap  # noqa: F401  fake kernels, autograd and vmap rules for those ops
from ._build import build_info
from .convert import convert_model
from .functional import batch_norm, batch_norm_act
from ._fuse import fuse
from . import _toolchain
from .modules import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    SyncBatchNorm,
    _BatchNorm,
)

ops = torch.ops.bn_ext

_vmap.install()
_toolchain.install()


def enable_compile_fusion() -> None:
    """Let torch.compile's inductor fuse bn_ext BatchNorm -> (add ->) activation in the graphs it
    compiles into bn_ext's fused ops (a pre-grad graph pass, added to
    torch._inductor.config.pre_grad_custom_pass after any pass already there). bn_ext.fuse calls
    it, and importing bn_ext does when inductor is already loaded; importing inductor takes
    seconds, so bn_ext does not do it on its own."""
    from . import _inductor

    _inductor.register()


if "torch._inductor.config" in sys.modules:
    enable_compile_fusion()

__version__ = "0.1.0"

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "_BatchNorm",
    "batch_norm",
    "batch_norm_act",
    "build_info",
    "convert_model",
    "enable_compile_fusion",
    "fuse",
    "ops",
]
