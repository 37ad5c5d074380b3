"""Fused BatchNorm + residual + activation (BatchNormAct*d, functional.batch_norm_act) against
torch.nn's BatchNorm followed by the same add and activation: outputs, every gradient, every
buffer; train and eval; every activation, layout and dtype; the tool chain and the errors."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import bn_ext
from conftest import DEVICES, TOL, repo_env, requires_cuda

ACTS = ["identity", "relu", "relu6", "leaky_relu", "silu"]
ops = torch.ops.bn_ext


def torch_act(z, activation, slope=0.01):
    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "relu6": F.relu6,
        "leaky_relu": lambda t: F.leaky_relu(t, slope),
        "silu": F.silu,
    }[activation](z)


def pair(cls_ours, cls_theirs, c, device, param_dtype, activation, **kwargs):
    theirs = cls_theirs(c, **kwargs).to(device=device, dtype=param_dtype)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours = cls_ours(c, activation=activation, negative_slope=0.2, **kwargs).to(device=device, dtype=param_dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make(shape, layout, dtype, device, shift=0.5):
    x = (torch.randn(shape, device=device, dtype=torch.float64) * 2 + shift).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def grads(module, x, residual, dy, forward):
    x = x.detach().requires_grad_()
    r = None if residual is None else residual.detach().requires_grad_()
    y = forward(x, r)
    y.backward(dy)
    params = [p.grad for p in (module.weight, module.bias) if p is not None]
    for p in (module.weight, module.bias):
        if p is not None:
            p.grad = None
    return y, x.grad, None if r is None else r.grad, params


def check_step(ours, theirs, x, residual, activation, dtype):
    tol = TOL[dtype]
    dy = torch.randn_like(x)
    y1, dx1, dr1, p1 = grads(ours, x, residual, dy, lambda a, r: ours(a, r))
    # 16-bit input: the fused op adds the residual and applies the activation to the float32
    # normalised value, where torch's composite rounds it to 16 bits first; the reference is
    # the composite in float32 (which decides each ReLU's kink as we do), rounded at the end.
    low = dtype in (torch.bfloat16, torch.float16)

    def reference(a, r):
        a = a.float() if low else a
        z = theirs(a) if r is None else theirs(a) + (r.float() if low else r)
        return torch_act(z, activation, 0.2).to(dtype)

    y2, dx2, dr2, p2 = grads(theirs, x, residual, dy, reference)
    torch.testing.assert_close(y1, y2, **tol, msg="output")
    assert y1.stride() == y2.stride()
    torch.testing.assert_close(dx1, dx2, **tol, msg="grad_input")
    if dr1 is not None:
        torch.testing.assert_close(dr1, dr2, **tol, msg="grad_residual")
    for a, b in zip(p1, p2):
        # parameter gradients sum over the batch: bfloat16 rounding of dy * x adds up
        torch.testing.assert_close(a, b, rtol=tol["rtol"] * 4, atol=tol["atol"] * 20, msg="parameter grad")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(theirs, name)
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)


CASES = [
    (bn_ext.BatchNormAct2d, torch.nn.BatchNorm2d, (4, 6, 5, 7)),
    (bn_ext.BatchNormAct1d, torch.nn.BatchNorm1d, (16, 6)),
    (bn_ext.BatchNormAct1d, torch.nn.BatchNorm1d, (4, 6, 9)),
    (bn_ext.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 6, 3, 4, 5)),
    # channels enough for the per-channel training passes (4 or more a thread)
    (bn_ext.BatchNormAct2d, torch.nn.BatchNorm2d, (3, 16, 9, 11)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTS)
def test_matches_torch_composite(activation, with_residual, layout, dtype, device):
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    for cls_ours, cls_theirs, shape in CASES:
        if layout == "channels_last" and len(shape) < 4:
            continue
        ours, theirs = pair(cls_ours, cls_theirs, shape[1], device, param_dtype, activation)
        for training in (True, True, False):
            ours.train(training)
            theirs.train(training)
            x = make(shape, layout, dtype, device)
            residual = make(shape, layout, dtype, device, shift=0.0) if with_residual else None
            check_step(ours, theirs, x, residual, activation, dtype)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=None),
        dict(track_running_stats=False),
        dict(affine=False),
        dict(momentum=0.3, eps=1e-3),
    ],
    ids=["cumulative", "no-running-stats", "no-affine", "momentum-eps"],
)
def test_constructor_variants_match_torch(kwargs):
    ours, theirs = pair(bn_ext.BatchNormAct2d, torch.nn.BatchNorm2d, 5, "cpu", torch.float32, "silu", **kwargs)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = make((4, 5, 6, 3), "contiguous", torch.float32, "cpu")
        check_step(ours, theirs, x, make((4, 5, 6, 3), "contiguous", torch.float32, "cpu"), "silu", torch.float32)


def test_module_is_a_batch_norm_with_torch_state():
    m = bn_ext.BatchNormAct2d(8, activation="leaky_relu", negative_slope=0.1)
    assert isinstance(m, bn_ext.BatchNorm2d) and isinstance(m, torch.nn.BatchNorm2d)
    ref = torch.nn.BatchNorm2d(8)
    assert list(m.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    m.load_state_dict(ref.state_dict())
    assert "activation='leaky_relu', negative_slope=0.1" in repr(m)
    assert "negative_slope" not in repr(bn_ext.BatchNormAct1d(3, activation="relu6"))
    with pytest.raises(
        ValueError, match="activation: expected one of 'identity', 'relu', 'relu6', 'leaky_relu', 'silu'"
    ):
        bn_ext.BatchNormAct2d(8, activation="gelu")
    with pytest.raises(RuntimeError, match='activation: expected one of "identity", "relu"'):
        ops.batch_norm_act(torch.randn(2, 3), None, None, None, torch.zeros(3), torch.ones(3), 1e-5, "tanh", 0.0)


def test_a_residual_that_broadcasts_or_promotes_follows_torch():
    ours, theirs = pair(bn_ext.BatchNormAct2d, torch.nn.BatchNorm2d, 3, "cpu", torch.float32, "relu")
    x = torch.randn(4, 3, 5, 5)
    for r in (torch.randn(4, 3, 5, 1), torch.randn(3, 1, 1), torch.randn(4, 3, 5, 5, dtype=torch.float64)):
        # float32 BatchNorm outputs, whatever the sum's dtype
        torch.testing.assert_close(ours(x, r), F.relu(theirs(x) + r), **TOL[torch.float32])
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_functional_matches_module():
    x = torch.randn(8, 4, 5)
    r = torch.randn(8, 4, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    y = bn_ext.functional.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r, activation="relu6")
    m = bn_ext.BatchNormAct1d(4, activation="relu6")
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    assert torch.equal(m(x, r), y)
    assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv)
    z = bn_ext.functional.batch_norm_act(x, rm, rv, w, b, False, residual=r, activation="silu")
    torch.testing.assert_close(z, F.silu(F.batch_norm(x, rm, rv, w, b, False) + r))


def test_silu_against_float64_over_the_exponent_range():
    # z = x exactly (mean 0, var 1, eps 0), over the whole range exp_basic takes before its clamps
    z = torch.cat([torch.linspace(-87, 87, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.0, -88.0])])
    x = z.reshape(1, 1, -1)
    one, zero = torch.ones(1), torch.zeros(1)
    y = ops.batch_norm_act(x, one, zero, None, zero, one, 0.0, "silu", 0.0)
    torch.testing.assert_close(y.double(), F.silu(x.double()), rtol=4e-7, atol=1e-37)  # 3.4 float32 ulps
    # eval backward: dx = dy * silu'(z); float32's 1 - sigmoid(z) costs absolute accuracy near z = 17
    dx = ops.batch_norm_act_backward(
        torch.ones_like(x), x, one, zero, None, zero, one, 0.0, False, "silu", 0.0, [True, False, False, False]
    )[0]
    xd = x.double().requires_grad_()
    F.silu(xd).sum().backward()
    torch.testing.assert_close(dx.double(), xd.grad, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTS)
def test_special_values_pass_through_each_activation(activation, dtype):
    # NaN, infinities, signed zeros and the kinks, in the vector loops (the first 32 values) and
    # in the scalar tail (the last 3): the same bits for the same value wherever it falls
    special = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 6.0, 7.0, -3.0]
    vals = torch.tensor([special[i % len(special)] for i in range(32)] + [float("nan"), -0.0, 6.0], dtype=dtype)
    x = vals.reshape(1, 1, -1)
    one, zero = torch.ones(1), torch.zeros(1)
    y = ops.batch_norm_act(x, one, zero, None, zero.double(), one.double(), 0.0, activation, 0.2).reshape(-1)
    torch.testing.assert_close(y.float(), torch_act(vals.float(), activation, 0.2).to(dtype).float(), equal_nan=True)
    bits = y.view(torch.int16) if dtype == torch.bfloat16 else y.view(torch.int32)
    for i in range(32, 35):
        for j in range(32):
            if torch.equal(vals[i : i + 1], vals[j : j + 1]) or (vals[i].isnan() and vals[j].isnan()):
                assert bits[i] == bits[j], (activation, vals[i].item(), y[i].item(), y[j].item())


def test_bad_residual_and_buffers_leave_state_untouched():
    m = bn_ext.BatchNormAct2d(3)
    m(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(4, 3, 2, 2)
    w, b, rm, rv = m.weight, m.bias, m.running_mean, m.running_var
    with pytest.raises(RuntimeError, match=r"batch_norm_act: residual: expected size \[4, 3, 2, 2\]"):
        ops.batch_norm_act(x, w, b, torch.randn(4, 3, 2, 1), rm, rv, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="batch_norm_act_train: residual: expected dtype"):
        ops.batch_norm_act_train(x, w, b, x.double(), rm, rv, None, 0.1, 1e-5, "relu", 0.0)
    m.running_var = torch.ones(4)
    with pytest.raises(RuntimeError, match="batch_norm_act_train: running_var: expected a 1-D tensor of 3"):
        m(torch.randn(4, 3, 2, 2))
    m.running_var = before["running_var"].clone()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 40, 33, 17), (4, 40, 5, 5)], ids=["channel-at-a-time", "channel-groups"])
def test_bitwise_across_thread_counts(activation, layout, shape):
    # NC(D)HW with at least 4 channels a thread runs the training passes per channel (in groups
    # where channels are small); 16 threads take the whole-tensor passes: the same bits either way.
    x = make(shape, layout, torch.float32, "cpu")
    r = make(shape, layout, torch.float32, "cpu")
    dy = torch.randn_like(x)
    w, b = torch.rand(40) + 0.5, torch.randn(40)
    masks = ([True] * 4, [True, False, False, False], [False, False, False, True], [True, True, True, False])
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 16):
            torch.set_num_threads(n)
            y, mean, var = ops.batch_norm_act_train(x, w, b, r, None, None, None, 0.1, 1e-5, activation, 0.2)
            got = [y, mean, var]
            for mask in masks:
                got += ops.batch_norm_act_backward(dy, x, w, b, r, mean, var, 1e-5, True, activation, 0.2, mask)
            y, mean, var = ops.batch_norm_act_train(x, w, b, None, None, None, None, 0.1, 1e-5, activation, 0.2)
            got += [y, mean, var]
            got += ops.batch_norm_act_backward(dy, x, w, b, None, mean, var, 1e-5, True, activation, 0.2, [True] * 4)
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_saved_tensors_at_most_torch_composites():
    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0]

    x = torch.randn(8, 16, 20, 20, requires_grad=True)
    r = torch.randn(8, 16, 20, 20)
    ours = bn_ext.BatchNormAct2d(16, activation="relu")
    theirs = torch.nn.BatchNorm2d(16)
    fused = saved_bytes(lambda: ours(x))
    composite = saved_bytes(lambda: F.relu(theirs(x)))
    assert fused <= composite * 0.51  # x and the per-channel statistics, against x and ReLU's output
    fused = saved_bytes(lambda: ours(x, r.requires_grad_()))
    composite = saved_bytes(lambda: F.relu(theirs(x) + r))
    assert fused <= composite * 1.01  # x and the residual, against x and ReLU's output


def test_double_backward_is_refused_clearly():
    m = bn_ext.BatchNormAct2d(3, activation="silu")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).sum(), x)  # first order is fine
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)


def test_composed_kernel_matches_the_fused_cpu_kernel():
    # The kernel every backend without a fused one runs (CUDA today), called on CPU tensors.
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    x = make((4, 6, 7, 5), "channels_last", torch.float32, "cpu")
    r = torch.randn_like(x)
    dy = torch.randn_like(x)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    for activation in ACTS:
        rm1, rv1, n1 = torch.zeros(6), torch.ones(6), torch.tensor(0)
        rm2, rv2, n2 = rm1.clone(), rv1.clone(), n1.clone()
        fused = ops.batch_norm_act_train(x, w, b, r, rm1, rv1, n1, 0.1, 1e-5, activation, 0.2)
        composed = ops.batch_norm_act_train.default.redispatch(
            keys, x, w, b, r, rm2, rv2, n2, 0.1, 1e-5, activation, 0.2
        )
        for a, c in zip(fused, composed):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        assert torch.equal(n1, n2)
        torch.testing.assert_close(rm1, rm2)
        torch.testing.assert_close(rv1, rv2)
        mean, var = fused[1], fused[2]
        args = (dy, x, w, b, r, mean, var, 1e-5, True, activation, 0.2, [True] * 4)
        for a, c in zip(
            ops.batch_norm_act_backward(*args), ops.batch_norm_act_backward.default.redispatch(keys, *args)
        ):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
        args = (x, w, b, r, mean, var, 1e-5, activation, 0.2)
        torch.testing.assert_close(ops.batch_norm_act(*args), ops.batch_norm_act.default.redispatch(keys, *args))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bn_ext.BatchNormAct2d(8, activation="silu")).to(
        device
    )
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        model.train(training)
        compiled_model.train(training)
        x = torch.randn(4, 3, 9, 9, device=device)
        y1, y2 = model(x), compiled(x)
        torch.testing.assert_close(y1, y2)
        if training:
            y1.sum().backward()
            y2.sum().backward()
            torch.testing.assert_close(model[0].weight.grad, compiled_model[0].weight.grad)
    for a, b in zip(model.state_dict().values(), compiled_model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_torch_func_and_forward_ad_match_torch():
    # buffers cannot be updated inside a transform (as with torch.nn): batch statistics only
    m = bn_ext.BatchNormAct2d(4, activation="silu", track_running_stats=False).double()
    ref = torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    r = torch.randn_like(x)
    t = torch.randn_like(x)
    out1, tan1 = torch.func.jvp(lambda a: m(a, r), (x,), (t,))
    out2, tan2 = torch.func.jvp(lambda a: F.silu(ref(a) + r), (x,), (t,))
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(tan1, tan2)
    g1 = torch.func.grad(lambda a: m(a, r).sum())(x)
    g2 = torch.func.grad(lambda a: F.silu(ref(a) + r).sum())(x)
    torch.testing.assert_close(g1, g2)


def test_fx_traces_the_layer_as_one_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn_ext.BatchNormAct2d(4))
    gm = torch.fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    fused = torch.fx.experimental.optimization.fuse(gm.eval())  # conv-bn folding must not take it
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), model.eval()(x))


def test_convert_model_leaves_fused_layers_with_a_warning():
    model = torch.nn.Sequential(bn_ext.BatchNormAct2d(4), bn_ext.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="0 .*BatchNormAct2d"):
        out = bn_ext.convert_model(model, to="torch")
    assert type(out[0]) is bn_ext.BatchNormAct2d and type(out[1]) is torch.nn.BatchNorm2d


@requires_cuda
def test_cuda_matches_cpu():
    m = bn_ext.BatchNormAct2d(6, activation="leaky_relu")
    mc = copy.deepcopy(m).cuda()
    x = torch.randn(4, 6, 8, 8)
    r = torch.randn_like(x)
    torch.testing.assert_close(m(x, r), mc(x.cuda(), r.cuda()).cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, mc.running_var.cpu())


class _ResidualBlock(torch.nn.Module):
    """conv -> BN -> (+ identity) -> act, the way ResNet blocks write it."""

    def __init__(self, bn):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x), x)


@pytest.mark.parametrize("activation", ACTS)
def test_torchscript_runs_the_fused_ops(activation):
    ours = _ResidualBlock(bn_ext.BatchNormAct2d(6, activation=activation, negative_slope=0.2, momentum=None))
    theirs = torch.nn.BatchNorm2d(6, momentum=None)
    theirs.load_state_dict(ours.bn.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(ours)
    assert "bn_ext::batch_norm_act_train" in str(scripted.bn._c._get_method("_scripted_act_forward").graph)
    for training in (True, True, False):
        scripted.train(training)
        theirs.train(training)
        x = torch.randn(4, 6, 5, 7, requires_grad=True)
        y = scripted(x)
        ref = torch_act(theirs(ours.conv(x)) + x, activation, 0.2)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        (dx,) = torch.autograd.grad(y.square().sum(), x)
        (ref_dx,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(scripted.bn, name), getattr(theirs, name), rtol=1e-5, atol=1e-6)
    # a residual that broadcasts takes torch's add, scripted too
    r = torch.randn(1, 6, 1, 1)
    x = torch.randn(4, 6, 5, 7)
    torch.testing.assert_close(scripted.bn(x, r), torch_act(theirs(x) + r, activation, 0.2), rtol=1e-5, atol=1e-5)


_SILU_OUTPUTS = """
import sys
import torch
import bn_ext
torch.manual_seed(0)
ops = torch.ops.bn_ext
out = []
cases = [((4, 24, 9, 13), torch.channels_last), ((64, 40), None), ((3, 5, 8, 9), None), ((2, 12, 6, 7), None)]
for shape, fmt in cases:
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape).to(dtype)
        x = x if fmt is None else x.contiguous(memory_format=fmt)
        r, dy = torch.randn_like(x), torch.randn_like(x)
        w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        for res in (r, None):
            y, mean, var = ops.batch_norm_act_train(x, w, b, res, None, None, None, 0.1, 1e-5, "silu", 0.0)
            for mask in ([True] * 4, [True, False, False, True], [False, False, False, True]):
                out += ops.batch_norm_act_backward(dy, x, w, b, res, mean, var, 1e-5, True, "silu", 0.0, mask)
torch.save(out, sys.argv[1])
"""


def test_silu_backward_keeps_dz_with_the_same_bits(tmp_path):
    # The SiLU backward keeps each dz from its sums pass for the dx pass where the buffer takes at
    # most half the last-level cache (BN_EXT_LLC_BYTES stands in for it): kept or recomputed, the
    # same bits, in every layout and route (5 channels: the whole-tensor passes even in NC(D)HW).
    script = tmp_path / "silu.py"
    script.write_text(_SILU_OUTPUTS)
    results = []
    for llc in ("1", str(1 << 30)):
        env = dict(repo_env(), BN_EXT_LLC_BYTES=llc)
        subprocess.run([sys.executable, str(script), str(tmp_path / f"{llc}.pt")], check=True, env=env)
        results.append(torch.load(tmp_path / f"{llc}.pt"))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize(
    "shape, fmt",
    [((4, 40, 9, 7), None), ((4, 3, 9, 7), None), ((4, 40, 9, 7), torch.channels_last), ((37, 24), None)],
    ids=["per-channel", "whole-tensor", "channels-last", "rows"],
)
def test_residual_gradient_kept_as_dz_gives_the_same_bits(shape, fmt, activation, dtype):
    # Where the residual's gradient is asked for and holds dz exactly (float32; or 16-bit with an
    # activation whose dz is dy or zero), the sums pass writes dz there and the dx pass reads it
    # back; without that output the dx pass recomputes dz. Either way dx has the same bits, and
    # the residual's gradient is the same with or without dx.
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    r, dy = torch.randn_like(x), torch.randn_like(x)
    dy.masked_fill_(torch.rand(shape) < 0.1, 0.0).masked_fill_(torch.rand(shape) < 0.1, -0.0)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    _, mean, var = ops.batch_norm_act_train(x, w, b, r, None, None, None, 0.1, 1e-5, activation, 0.2)

    def backward(mask):
        return ops.batch_norm_act_backward(dy, x, w, b, r, mean, var, 1e-5, True, activation, 0.2, mask)

    dx_kept, dw, db, dres_kept = backward([True, True, True, True])
    dx, dw2, db2, _ = backward([True, True, True, False])
    dres = backward([False, False, False, True])[3]

    def bits(t):
        return t.contiguous().view(-1).view(torch.uint8)

    for a, b in ((dx_kept, dx), (dres_kept, dres), (dw, dw2), (db, db2)):
        assert a.stride() == b.stride() and torch.equal(bits(a), bits(b))
