"""bn_ext through PyTorch's tool chain, side by side with torch.nn: forward-mode AD and torch.func,
higher derivatives, checkpointing, meta tensors, convert_model on subclasses, FX and its fusers,
quantization, ONNX, TorchScript, torch.compile with dynamic shapes, and input checks. Each test
compares outputs, gradients and every buffer with torch.nn's on the same data."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import bn_ext
from conftest import DEVICES

ops = torch.ops.bn_ext


def _pair(ours_cls, theirs_cls, channels, device="cpu", **kwargs):
    """torch.nn's module and bn_ext's on the same random parameters and running stats, float64."""
    theirs = theirs_cls(channels, device=device, **kwargs).double()
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
        if theirs.track_running_stats:
            theirs.running_mean.normal_()
            theirs.running_var.uniform_(0.5, 2.0)
    ours = ours_cls(channels, device=device, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _same_buffers(ours, theirs, **tol):
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, equal_nan=True, **(tol or dict(rtol=1e-9, atol=1e-12)), msg=name)
        else:
            assert torch.equal(a, b), f"{name}: {a} != {b}"


MODES = ["train", "eval"]


def _modules(mode, device="cpu", **kwargs):
    # torch.func transforms refuse in-place updates of captured buffers (torch.nn's too): in
    # training, test without running stats, as per-sample-gradient code does.
    track = mode == "eval"
    ours, theirs = _pair(bn_ext.BatchNorm2d, nn.BatchNorm2d, 3, device, track_running_stats=track, **kwargs)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    return ours, theirs


# ---- 1. forward-mode AD ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_jvp_and_jacfwd_match_torch(device, mode):
    ours, theirs = _modules(mode, device)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    t = torch.randn_like(x)
    (y1, t1), (y2, t2) = jvp(ours, (x,), (t,)), jvp(theirs, (x,), (t,))
    assert t1.abs().max() > 0.1
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(t1, t2)
    small = x[:2, :, :2, :2]
    torch.testing.assert_close(jacfwd(ours)(small), jacfwd(theirs)(small))


@pytest.mark.parametrize("mode", MODES)
def test_dual_tensors_with_frozen_parameters(mode):
    """forward_ad.make_dual on the input only, parameters frozen, running stats tracked: the
    tangent is torch.nn's and the buffers move as torch.nn's do."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs = _pair(bn_ext.BatchNorm2d, nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    t = torch.randn_like(x)
    tangents = []
    for m in (ours, theirs):
        m.train(mode == "train").requires_grad_(False)
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    assert tangents[0] is not None
    torch.testing.assert_close(tangents[0], tangents[1])
    _same_buffers(ours, theirs)


# ---- 2. higher derivatives ---------------------------------------------------------------------


def _composite_module(ours, training):
    """The same BatchNorm in plain torch ops, on ours's parameters (every order is right)."""

    def f(x):
        if training:
            mean = x.mean((0, 2, 3), keepdim=True)
            var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean, var = ours.running_mean.view(1, -1, 1, 1), ours.running_var.view(1, -1, 1, 1)
        return (x - mean) / torch.sqrt(var + ours.eps) * ours.weight.view(1, -1, 1, 1) + ours.bias.view(1, -1, 1, 1)

    return f


@pytest.mark.parametrize("mode", MODES)
def test_third_order_derivatives_match_a_composite(mode):
    ours, _ = _pair(bn_ext.BatchNorm2d, nn.BatchNorm2d, 3)
    ours.train(mode == "train")
    reference = _composite_module(ours, mode == "train")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)

    def orders(f):
        xr = x.clone().requires_grad_()
        g1, w1 = torch.autograd.grad((f(xr) ** 3).sum(), (xr, ours.weight), create_graph=True)
        g2, w2 = torch.autograd.grad((g1**2).sum() + (w1**2).sum(), (xr, ours.weight), create_graph=True)
        g3, w3 = torch.autograd.grad((g2**2).sum() + w2.sum(), (xr, ours.weight))
        return g1, w1, g2, w2, g3, w3

    for a, b in zip(orders(ours), orders(reference)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_eval_double_backward_with_frozen_weights():
    """A gradient penalty through a frozen eval BatchNorm: the first gradient does not depend on
    x, and the second is None, as with torch.nn (it used to raise a bare StopIteration)."""
    results = []
    for cls in (bn_ext.BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        m = cls(3).eval().requires_grad_(False)
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        results.append((g, torch.autograd.grad(g.pow(2).sum(), x, allow_unused=True)[0]))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] is None and results[1][1] is None


# ---- 4. meta tensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["weight", "running_mean"])
def test_a_meta_parameter_or_buffer_with_a_cpu_input_raises(mode, where):
    m = bn_ext.BatchNorm2d(3).train(mode == "train")
    if where == "weight":
        m.weight = nn.Parameter(torch.empty(3, device="meta"))
    else:
        m.running_mean = torch.empty(3, device="meta")
    before = [t.clone() for t in m.buffers() if t.device.type == "cpu"]
    with pytest.raises(RuntimeError, match="meta"):
        m(torch.randn(2, 3, 2, 2))
    assert all(torch.equal(a, b) for a, b in zip([t for t in m.buffers() if t.device.type == "cpu"], before))


def test_all_meta_still_runs_the_fake_kernels():
    m = bn_ext.BatchNorm2d(3, device="meta")
    assert m(torch.empty(2, 3, 4, 4, device="meta")).shape == (2, 3, 4, 4)


# ---- 7. convert_model and subclasses -------------------------------------------------------------


class _PlainSubclass(nn.BatchNorm2d):
    def extra_method(self):
        return "kept"


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _SyncSubclass(nn.SyncBatchNorm):
    pass


def test_convert_model_converts_subclasses_and_warns_about_the_rest():
    model = nn.Sequential(_PlainSubclass(3), nn.Sequential(_OwnForward(3)))
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer.*1\.0 \(.*_OwnForward\)"):
        bn_ext.convert_model(model)
    with pytest.warns(UserWarning, match=r"sync \(.*_SyncSubclass\)"):
        bn_ext.convert_model(nn.ModuleDict({"sync": _SyncSubclass(3)}))
    assert isinstance(model[0], bn_ext._BatchNorm) and isinstance(model[0], _PlainSubclass)
    assert model[0].extra_method() == "kept"
    assert type(model[1][0]) is _OwnForward
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model(x), reference(x))
    _same_buffers(model, reference, rtol=1e-5, atol=1e-6)
    restored = torch.load(_saved(model), weights_only=False)  # pickles by the original class
    assert isinstance(restored[0], bn_ext._BatchNorm) and restored[0].extra_method() == "kept"
    bn_ext.convert_model(model, to="torch")
    assert type(model[0]) is _PlainSubclass


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name, layers", [("efficientnet_b0", 49), ("mobilenetv3_large_100", 46)])
def test_convert_model_timm_batch_norm_act(name, layers):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn_ext.convert_model(model)
    assert sum(isinstance(m, bn_ext._BatchNorm) for m in model.modules()) == layers
    x = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    _same_buffers(model, reference, rtol=1e-4, atol=1e-5)


# ---- 8. activation checkpointing -----------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_moves_buffers_as_torch_does(reentrant):
    from torch.utils.checkpoint import checkpoint

    def net(cls):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), cls(4), nn.ReLU(), nn.Conv2d(4, 4, 1), cls(4)).double()

    ours, theirs = net(bn_ext.BatchNorm2d), net(nn.BatchNorm2d)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    for m in (ours, theirs):
        checkpoint(m, x, use_reentrant=reentrant).sum().backward()
    assert ours[4].num_batches_tracked.item() == 2
    _same_buffers(ours, theirs)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


# ---- 9. torch.func -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_torch_func_transforms_match_torch(device, mode):
    ours, theirs = _modules(mode, device)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    small = x[:2, :, :2, :2]
    for transform in (jacrev, lambda f: hessian(lambda v: f(v).pow(3).sum())):
        torch.testing.assert_close(transform(ours)(small), transform(theirs)(small))
    (_, f1), (_, f2) = vjp(ours, x), vjp(theirs, x)
    dy = torch.randn_like(x)
    torch.testing.assert_close(f1(dy), f2(dy))

    def loss(m):
        return lambda p, v: functional_call(m, p, (v,)).pow(2).sum()

    p1, p2 = dict(ours.named_parameters()), dict(theirs.named_parameters())
    g1, g2 = grad(loss(ours))(p1, x), grad(loss(theirs))(p2, x)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k])
    batch = x.unsqueeze(1).expand(4, 2, 3, 5, 5)  # per-sample gradients over 4 samples of N=2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no vmap fallback warning
        s1 = vmap(grad(loss(ours)), in_dims=(None, 0))(p1, batch)
    s2 = vmap(grad(loss(theirs)), in_dims=(None, 0))(p2, batch)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k])


def test_vmap_over_training_with_running_stats_refuses_as_torch_does():
    ours, theirs = _pair(bn_ext.BatchNorm2d, nn.BatchNorm2d, 3)
    x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        vmap(theirs)(x)
    before = [t.clone() for t in ours.buffers()]
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(ours)(x)
    assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), before))


def test_op_vmap_rules_match_a_loop():
    b, x = 3, torch.randn(3, 4, 5, 6, 6, dtype=torch.float64)
    w, bias, dy = torch.rand(b, 5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64), torch.randn_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, mean, var = vmap(ops.batch_norm_train, in_dims=(0, 0, None, None))(x, w, bias, 1e-5)
        e = vmap(ops.batch_norm_elemt, in_dims=(0, 0, None, 0, 0, None))(x, w, bias, mean, var, 1e-5)
        grads = vmap(ops.batch_norm_backward, in_dims=(0, 0, 0, 0, 0, None, None, None))(
            dy, x, w, mean, var, 1e-5, True, [True, True, True]
        )
        sums = vmap(ops.batch_norm_backward_reduce)(dy, x, mean)
        stats = vmap(ops.batch_norm_stats)(x)
    for i in range(b):
        one = ops.batch_norm_train(x[i], w[i], bias, 1e-5)
        assert all(torch.equal(a[i], r) for a, r in zip((y, mean, var), one))
        assert torch.equal(e[i], ops.batch_norm_elemt(x[i], w[i], bias, mean[i], var[i], 1e-5))
        ref = ops.batch_norm_backward(dy[i], x[i], w[i], mean[i], var[i], 1e-5, True, [True, True, True])
        assert all(torch.equal(a[i], r) for a, r in zip(grads, ref))
        assert all(torch.equal(a[i], r) for a, r in zip(sums, ops.batch_norm_backward_reduce(dy[i], x[i], mean[i])))
        assert all(torch.equal(a[i], r) for a, r in zip(stats, ops.batch_norm_stats(x[i])))


# ---- 10. ONNX ------------------------------------------------------------------------------------


def _conv_bn_net(cls):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), cls(8), nn.ReLU(), nn.Conv2d(8, 8, 3), cls(8))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime_like_torch(tmp_path, dynamo):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ours, theirs = _conv_bn_net(bn_ext.BatchNorm2d).eval(), _conv_bn_net(nn.BatchNorm2d).eval()
    x = torch.randn(2, 3, 9, 9)
    graphs = []
    for name, net in (("ours", ours), ("theirs", theirs)):
        path = str(tmp_path / f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), path, dynamo=dynamo)
        graphs.append(onnx.load(path).graph)
    graph = graphs[0]
    # the same standard ops as torch.nn's export (BatchNormalization, or folded into Conv)
    assert [n.op_type for n in graph.node] == [n.op_type for n in graphs[1].node]
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out[0]), theirs(x), rtol=1e-5, atol=1e-5)


# ---- 11. FX and its fusers -----------------------------------------------------------------------


def test_symbolic_trace_keeps_batch_norm_as_one_call_module():
    net = _conv_bn_net(bn_ext.BatchNorm2d)
    traced = torch.fx.symbolic_trace(net)
    assert [n.op for n in traced.graph.nodes] == [
        n.op for n in torch.fx.symbolic_trace(_conv_bn_net(nn.BatchNorm2d)).graph.nodes
    ]
    x = torch.randn(2, 3, 9, 9)
    for training in (True, False):
        traced.train(training)
        net.train(training)
        torch.testing.assert_close(traced(x), net(x))


def test_fx_fuse_folds_batch_norm_into_conv():
    from torch.fx.experimental.optimization import fuse

    ours, theirs = _conv_bn_net(bn_ext.BatchNorm2d).eval(), _conv_bn_net(nn.BatchNorm2d).eval()
    folded = fuse(ours)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(folded(x), fuse(theirs)(x))
    assert isinstance(ours[1], bn_ext.BatchNorm2d)  # the model given is not changed


@pytest.mark.parametrize("training", [False, True], ids=["eval", "qat"])
def test_quantization_fuse_modules(training):
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    fused = []
    for cls in (bn_ext.BatchNorm2d, nn.BatchNorm2d):
        net = _conv_bn_net(cls).train(training)
        fuser = fuse_modules_qat if training else fuse_modules
        fused.append(fuser(net, [["0", "1", "2"], ["3", "4"]]))
    assert [type(m) for m in fused[0].modules()] == [type(m) for m in fused[1].modules()]
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused[0](x), fused[1](x))


def test_prepare_fx_and_convert_fx_as_with_torch():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    x = torch.randn(2, 3, 9, 9)
    results = []
    for cls in (bn_ext.BatchNorm2d, nn.BatchNorm2d):
        net = _conv_bn_net(cls).eval()
        prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        results.append(([type(m).__name__ for m in prepared.modules()], convert_fx(prepared)(x)))
        assert type(net[1]) is cls  # the model given keeps its layers
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1])


# ---- 12. isinstance -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [(bn_ext.BatchNorm1d, nn.BatchNorm1d), (bn_ext.BatchNorm2d, nn.BatchNorm2d), (bn_ext.BatchNorm3d, nn.BatchNorm3d)],
)
def test_isinstance_of_torch_nn_classes(ours, theirs):
    assert isinstance(ours(3), theirs)
    lazy = getattr(bn_ext, "Lazy" + theirs.__name__)()
    assert isinstance(lazy, getattr(nn, "Lazy" + theirs.__name__))
    lazy(torch.randn({"1d": (2, 3), "2d": (2, 3, 4, 4), "3d": (2, 3, 4, 4, 4)}[theirs.__name__[-2:]]))
    assert type(lazy) is ours and isinstance(lazy, theirs)


# ---- 13, 14. torch.compile with dynamic shapes, TorchScript -------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_compile_dynamic_fullgraph(mode):
    ours, theirs = _conv_bn_net(bn_ext.BatchNorm2d), _conv_bn_net(nn.BatchNorm2d)
    for m in (ours, theirs):
        m.train(mode == "train")
    compiled = torch.compile(ours, dynamic=True, fullgraph=True, backend="aot_eager")
    for n, size in ((2, 9), (3, 11)):
        x = torch.randn(n, 3, size, size)
        torch.testing.assert_close(compiled(x), theirs(x), rtol=1e-5, atol=1e-5)
    _same_buffers(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_torchscript(mode):
    ours, theirs = _conv_bn_net(bn_ext.BatchNorm2d), _conv_bn_net(nn.BatchNorm2d)
    ours[4].momentum = theirs[4].momentum = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(ours)
    x = torch.randn(2, 3, 9, 9)
    for m in (scripted, theirs):
        m.train(mode == "train")
    torch.testing.assert_close(scripted(x), theirs(x), rtol=1e-5, atol=1e-5)
    _same_buffers(scripted, theirs, rtol=1e-5, atol=1e-6)
    layer = dict(scripted.named_children())["1"]
    assert "bn_ext::batch_norm" in str(layer._c._get_method("_scripted_forward").graph)  # our kernels, scripted


# ---- 15. input checks ----------------------------------------------------------------------------


def test_functional_rejects_what_torch_rejects():
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    cases = [
        (ValueError, "both be None or neither", dict(running_mean=rm, running_var=None, training=True)),
        (TypeError, "training", dict(running_mean=rm, running_var=rv, training=None)),
        (RuntimeError, "require grad", dict(running_mean=rm.clone().requires_grad_(), running_var=rv, training=True)),
        (RuntimeError, "require grad", dict(running_mean=rm, running_var=rv.clone().requires_grad_(), training=False)),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error):
            nn.functional.batch_norm(x, **kwargs)
        with pytest.raises(error, match=message):
            bn_ext.batch_norm(x, **kwargs)


def test_negative_counter_with_cumulative_average_raises_and_writes_nothing():
    m = bn_ext.BatchNorm1d(3, momentum=None)
    m.num_batches_tracked.fill_(-1)
    before = [t.clone() for t in m.buffers()]
    with pytest.raises(RuntimeError, match="num_batches_tracked: expected a non-negative count"):
        m(torch.randn(4, 3))
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), before))
