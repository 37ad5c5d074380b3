import os

import pytest
import torch

import bn_ext  # noqa: F401  (registers the ops)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(bn_ext.__file__)))


def repo_env():
    """This process's environment for a child Python that must import this checkout's bn_ext."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tolerances for comparing with torch.nn on the same data: ours and PyTorch's results differ by
# rounding only, within a few units of the dtype's precision.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


# torch.nn's BatchNorm takes `bias=` from torch 2.13 on; our modules take it on any torch.
TORCH_HAS_BIAS_KW = "bias" in __import__("inspect").signature(torch.nn.BatchNorm1d.__init__).parameters
requires_torch_bias_kw = pytest.mark.skipif(
    not TORCH_HAS_BIAS_KW, reason="this torch.nn BatchNorm has no bias= argument"
)


def devices():
    return DEVICES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
