"""bn_ext modules against torch.nn's on copied weights: several training steps, then eval."""

import pytest
import torch

import bn_ext
import reference as ref
from conftest import DEVICES, TOL, TORCH_HAS_BIAS_KW

TORCH_CLS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
OUR_CLS = {1: bn_ext.BatchNorm1d, 2: bn_ext.BatchNorm2d, 3: bn_ext.BatchNorm3d}

# (kind, shape): C=1, C=3, spatial size 1, prime sizes, N=1 with spatial > 1, zero batch.
SHAPES = [
    (1, (8, 3)),
    (1, (5, 1)),
    (1, (7, 13, 11)),
    (1, (1, 4, 7)),
    (1, (16, 5, 1)),
    (1, (0, 3)),
    (2, (4, 3, 5, 7)),
    (2, (2, 1, 3, 3)),
    (2, (1, 3, 7, 5)),
    (2, (5, 4, 1, 1)),
    (2, (3, 7, 11, 13)),
    (2, (0, 3, 4, 4)),
    (3, (2, 3, 3, 4, 5)),
    (3, (1, 2, 3, 5, 7)),
    (3, (3, 4, 1, 1, 1)),
    (3, (0, 2, 2, 2, 2)),
]

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, layout, dtype, device):
    """Fresh random data (offset and scaled per channel, never zeros) in the requested layout."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    base = torch.randn(shape, dtype=torch.float64, device=device)
    base = (
        base * (torch.rand(view, dtype=torch.float64, device=device) * 3 + 0.5)
        + torch.randn(view, dtype=torch.float64, device=device) * 2
    )
    x = base.to(dtype)
    if layout == "channels_last":
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        elif x.dim() == 3:  # (N, L, C) storage seen as (N, C, L): a transposed sequence
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        # 2-D (N, C) is already channel-innermost
    elif layout == "strided":
        # a non-contiguous slice: every other element of a last dimension twice as wide
        wide = torch.empty(list(shape[:-1]) + [shape[-1] * 2], dtype=dtype, device=device)
        sliced = wide[..., ::2]
        sliced.copy_(x)
        x = sliced
    return x


def pair(kind, c, device, param_dtype, **kwargs):
    theirs = TORCH_CLS[kind](c, device=device, dtype=param_dtype, **kwargs)
    ours = OUR_CLS[kind](c, device=device, dtype=param_dtype, **kwargs)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.uniform_(-1, 1)
    if theirs.running_mean is not None:
        with torch.no_grad():
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_close(ours, theirs, dtype, what, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(ours, theirs, **tol, msg=lambda m: f"{what}: {m}")


def param_grads_float64(module, x, dy):
    """grad_weight and grad_bias in float64 for this step's x and dy (batch or running stats, as
    the module normalised with)."""
    if module.training or module.running_mean is None:
        _, dweight, dbias = ref.backward_training(x, dy, module.weight.detach(), module.eps)
        return dweight, dbias
    xhat = ref.forward(x, module.running_mean, module.running_var, None, None, module.eps)
    dims = ref.reduce_dims(x)
    return (dy.double() * xhat).sum(dims), dy.double().sum(dims)


def assert_close_or_closer(ours, theirs, exact, dtype, what, scale):
    """ours within tolerance of PyTorch's, or, where it is not, nearer the float64 value than
    PyTorch's. In float16, PyTorch's channels-last grad_weight can be off by more than the
    tolerance: (3, 64, 5, 7), one channel's 0.0954 (float64) came out -0.0428, ours -0.0954."""
    tol = TOL[dtype]
    o, t = ours.double(), theirs.double()
    close = (o - t).abs() <= scale * (tol["atol"] + tol["rtol"] * t.abs())
    nearer = (o - exact).abs() <= (t - exact).abs()
    bad = ~(close | nearer)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ from torch's and are further "
        f"from float64: ours {o[bad].tolist()[:4]}, torch {t[bad].tolist()[:4]}, "
        f"float64 {exact[bad].tolist()[:4]}"
    )


def step(theirs, ours, x, dtype, what, param_dtype):
    xt = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    yt = theirs(xt)
    yo = ours(xo)
    assert yo.dtype == yt.dtype and yo.shape == yt.shape
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        assert yo.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        assert yo.is_contiguous(memory_format=torch.channels_last_3d), "output lost channels_last_3d"
    assert_close(yo, yt, dtype, f"{what} output")
    dy = torch.randn_like(yt)
    yt.backward(dy)
    yo.backward(dy)
    assert_close(xo.grad, xt.grad, dtype, f"{what} grad_input", scale=4)
    if theirs.weight is not None:
        # sums of low-precision products: PyTorch itself rounds these to the input's precision
        pd = dtype if dtype in (torch.bfloat16, torch.float16) else (param_dtype or torch.float32)
        # weight/bias grads are sums over N*S elements: allow for the sum's rounding
        scale = max(4, x[:, 0].numel() ** 0.5)
        if dtype in (torch.bfloat16, torch.float16):
            dweight, dbias = param_grads_float64(theirs, x, dy)
            assert_close_or_closer(ours.weight.grad, theirs.weight.grad, dweight, pd, f"{what} grad_weight", scale)
            if theirs.bias is not None:
                assert_close_or_closer(ours.bias.grad, theirs.bias.grad, dbias, pd, f"{what} grad_bias", scale)
        else:
            assert_close(ours.weight.grad, theirs.weight.grad, pd, f"{what} grad_weight", scale=scale)
            if theirs.bias is not None:
                assert_close(ours.bias.grad, theirs.bias.grad, pd, f"{what} grad_bias", scale=scale)
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, dtype if dtype in (torch.bfloat16, torch.float16) else param_dtype, f"{what} {name}")
    if theirs.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def run_parity(kind, shape, layout, dtype, device, param_dtype=None, steps=3, **kwargs):
    theirs, ours = pair(kind, shape[1], device, param_dtype, **kwargs)
    for i in range(steps):
        step(theirs, ours, make_input(shape, layout, dtype, device), dtype, f"train step {i}", param_dtype)
        theirs.zero_grad()
        ours.zero_grad()
    theirs.eval()
    ours.eval()
    step(theirs, ours, make_input(shape, layout, dtype, device), dtype, "eval", param_dtype)
    theirs.train()
    ours.train()
    step(theirs, ours, make_input(shape, layout, dtype, device), dtype, "train again", param_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,shape", SHAPES, ids=[f"{k}d-{'x'.join(map(str, s))}" for k, s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_parity_shapes_layouts(kind, shape, layout, dtype, device):
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("(N, C) has one layout")
    run_parity(kind, shape, layout, dtype, device, param_dtype=dtype)


# the last: channels-last rows of 64 channels, summed two at a time (in_order_tiles in csrc/cpu/kernels/reductions.h)
LOW_SHAPES = [(1, (16, 6)), (1, (4, 5, 9)), (2, (4, 3, 6, 5)), (3, (2, 3, 3, 4, 5)), (2, (3, 64, 5, 7))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,shape", LOW_SHAPES, ids=[f"{k}d-{'x'.join(map(str, s))}" for k, s in LOW_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mixed", [True, False], ids=["float32-params", "same-dtype-params"])
def test_parity_low_precision(kind, shape, layout, dtype, mixed, device):
    run_parity(kind, shape, layout, dtype, device, param_dtype=torch.float32 if mixed else dtype)


VARIANTS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3),
    dict(eps=1e-3),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(momentum=None, bias=False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("kind,shape", [(1, (6, 4)), (2, (3, 4, 5, 3)), (3, (2, 4, 3, 2, 3))], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_constructor_variants(kind, shape, kwargs, layout, device):
    if "bias" in kwargs and not TORCH_HAS_BIAS_KW:
        pytest.skip("this torch.nn BatchNorm has no bias= argument to compare with")
    run_parity(kind, shape, layout, torch.float32, device, param_dtype=torch.float32, steps=4, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_worked_example_seed_note(device):
    """BatchNorm3d(4, momentum=0.3) on a (3, 4, 2, 2, 3) batch with channel i constant i + 1."""
    x = torch.arange(1, 5, dtype=torch.float32, device=device).view(1, 4, 1, 1, 1).expand(3, 4, 2, 2, 3).contiguous()
    ours = bn_ext.BatchNorm3d(num_features=4, momentum=0.3).to(device)
    theirs = torch.nn.BatchNorm3d(num_features=4, momentum=0.3).to(device)
    for _ in range(2):
        yo = ours(x)
        yt = theirs(x)
    for name in ("running_mean", "running_var", "weight", "bias"):
        assert getattr(ours, name).shape == (4,)
        if device == "cpu":
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        else:  # cuDNN blends in float32, we in float64: at most one float32 ulp apart
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1.2e-7, atol=0, msg=name)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
    # x - mean is exactly 0 for us; PyTorch's folded x * scale + shift leaves rounding noise
    assert torch.equal(yo, torch.zeros_like(x))
    torch.testing.assert_close(yo, yt, rtol=0, atol=1e-4)  # PyTorch: 3e-5 on channel 3
    # the values themselves: var of a constant is 0, mean moves 0 -> 0.3 c -> 0.51 c
    c = torch.arange(1, 5, dtype=torch.float32, device=device)
    torch.testing.assert_close(ours.running_mean, 0.51 * c)
    torch.testing.assert_close(ours.running_var, torch.full((4,), 0.49, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_matches_torch(device, dtype):
    x = make_input((6, 5, 4, 3), "contiguous", dtype, device)
    w = torch.rand(5, dtype=dtype, device=device) + 0.5
    b = torch.randn(5, dtype=dtype, device=device)
    rm_t, rv_t = torch.randn(5, dtype=dtype, device=device), torch.rand(5, dtype=dtype, device=device) + 0.5
    rm_o, rv_o = rm_t.clone(), rv_t.clone()
    for training in (True, False):
        yt = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, training, 0.2, 1e-4)
        yo = bn_ext.functional.batch_norm(x, rm_o, rv_o, w, b, training, 0.2, 1e-4)
        assert_close(yo, yt, dtype, f"training={training}")
        assert_close(rm_o, rm_t, dtype, "running_mean")
        assert_close(rv_o, rv_t, dtype, "running_var")
    # no running stats in training: batch statistics, nothing to update
    assert_close(
        bn_ext.functional.batch_norm(x, None, None, w, b, True),
        torch.nn.functional.batch_norm(x, None, None, w, b, True),
        dtype,
        "no running stats",
    )
