"""The inductor graph pass (bn_ext._inductor): bn_ext BatchNorm -> (add ->) activation in the
graphs Dynamo captures becomes one fused op, with the same outputs, gradients and buffers.

Most tests run the pass on the captured graph and execute that graph eagerly (a backend of our
own, fast); one compiles with inductor end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F

import bn_ext
from bn_ext import _inductor

FUSED = {torch.ops.bn_ext.batch_norm_act.default, torch.ops.bn_ext.batch_norm_act_train.default}


class Net(torch.nn.Module):
    """Three BatchNorms: BN -> act, BN -> add -> act, and a BN whose output is also used
    elsewhere (not fusable)."""

    def __init__(self, act, add="iadd", track_running_stats=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = bn_ext.BatchNorm2d(4, track_running_stats=track_running_stats)
        self.bn2 = bn_ext.BatchNorm2d(4, momentum=None, track_running_stats=track_running_stats)
        self.bn3 = bn_ext.BatchNorm2d(4, track_running_stats=track_running_stats)
        self.act, self.add = act, add

    def forward(self, x):
        out = self.act(self.bn1(self.conv(x)))
        out = self.bn2(self.conv(out))
        if self.add == "iadd":
            out += x
        else:
            out = torch.add(x, out)
        out = self.act(out)
        z = self.bn3(out)
        return self.act(z) + z  # z has two users: stays as it is


ACTS = {
    "relu": torch.nn.ReLU(),
    "relu_inplace": torch.nn.ReLU(inplace=True),
    "relu6": torch.nn.ReLU6(),
    "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "silu": F.silu,
    "method_relu": lambda t: t.relu(),
}


def _backend(counts):
    def backend(gm, example_inputs):
        counts.append(_inductor.fuse_graph(gm.graph))
        gm.graph.lint()
        gm.recompile()
        assert sum(n.target in FUSED for n in gm.graph.nodes) == counts[-1]
        return gm

    return backend


def _check_same(eager, fused_model, x, steps=2):
    for step in range(steps):
        xe = (x + step).requires_grad_()
        xf = (x + step).requires_grad_()
        ye, yf = eager(xe), fused_model(xf)
        torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(ye)
        ye.backward(dy)
        yf.backward(dy)
        torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused_model.named_parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, be), (_, bf) in zip(eager.named_buffers(), fused_model.named_buffers(), strict=True):
        torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("add", ["iadd", "torch.add"])
def test_pass_fuses_and_keeps_the_numbers(act, add):
    torch._dynamo.reset()
    eager = Net(ACTS[act], add)
    model = copy.deepcopy(eager)
    counts = []
    compiled = torch.compile(model, backend=_backend(counts), fullgraph=True, dynamic=False)
    x = torch.randn(3, 4, 5, 6)
    _check_same(eager, compiled, x)
    assert counts[0] == 2, counts  # bn1 and bn2; bn3's output has two users
    eager.eval()
    model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert counts[-1] == 2, counts  # the eval graph: batch_norm_elemt -> batch_norm_act


def test_pass_without_running_stats_and_channels_last():
    torch._dynamo.reset()
    eager = Net(torch.nn.ReLU(), track_running_stats=False)
    model = copy.deepcopy(eager)
    counts = []
    compiled = torch.compile(model, backend=_backend(counts), fullgraph=True, dynamic=False)
    _check_same(eager, compiled, torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last))
    assert counts[0] == 2


class Leftovers(torch.nn.Module):
    """Patterns the pass must leave: a broadcasting residual, a promoting one, mean/var used, an
    activation that is not on the BatchNorm's output alone."""

    def __init__(self):
        super().__init__()
        self.bn = bn_ext.BatchNorm2d(4)

    def forward(self, x, r_broadcast, r_double):
        a = torch.relu(self.bn(x) + r_broadcast)
        b = torch.relu(self.bn(x) + r_double)
        y, mean, var = torch.ops.bn_ext.batch_norm_train(x, None, None, 1e-5)
        c = torch.relu(y) * mean.sum()
        return a.sum() + b.sum() + c.sum()


def test_pass_leaves_what_it_cannot_fuse():
    torch._dynamo.reset()
    counts = []
    m = Leftovers()
    compiled = torch.compile(copy.deepcopy(m), backend=_backend(counts), fullgraph=True, dynamic=False)
    args = (torch.randn(2, 4, 3, 3), torch.randn(1, 4, 1, 1), torch.randn(2, 4, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(compiled(*args), m(*args))
    assert counts == [0]


def test_register_keeps_other_passes_and_is_idempotent():
    from torch._inductor import config

    def other(graph):
        pass

    with config.patch(pre_grad_custom_pass=other):
        bn_ext.enable_compile_fusion()
        bn_ext.enable_compile_fusion()
        passes = config.pre_grad_custom_pass
        assert passes[0] is other and len(passes) == 2
        assert isinstance(passes[1], _inductor.FuseBatchNormActivation)
    with config.patch(pre_grad_custom_pass=None):
        bn_ext.enable_compile_fusion()
        assert isinstance(config.pre_grad_custom_pass, _inductor.FuseBatchNormActivation)
        assert config.pre_grad_custom_pass.uuid() is not None


def test_inductor_end_to_end(monkeypatch):
    """torch.compile with inductor: the pass runs (the fused op is in the graph inductor gets) and
    training steps match eager."""
    from torch._inductor import config

    torch._dynamo.reset()
    seen = []
    original = _inductor.fuse_graph
    monkeypatch.setattr(_inductor, "fuse_graph", lambda graph: seen.append(original(graph)) or seen[-1])
    # a cached graph would skip the pass
    with (
        config.patch(pre_grad_custom_pass=None, fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        bn_ext.enable_compile_fusion()
        eager = Net(torch.nn.ReLU())
        model = copy.deepcopy(eager)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        _check_same(eager, compiled, torch.randn(3, 4, 5, 6))
    assert seen and seen[0] == 2, seen


def _inline_backend(counts):
    def backend(gm, example_inputs):
        counts.append(_inductor.inline_eval(gm.graph))
        gm.graph.lint()
        gm.recompile()
        assert not any(n.target in (torch.ops.bn_ext.batch_norm_elemt.default, *FUSED) for n in gm.graph.nodes)
        return gm

    return backend


@pytest.mark.parametrize("act", ["relu", "relu6", "leaky_relu", "silu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_batch_norms_become_torch_eval_batch_norm(act, dtype):
    """In eval the pass hands BatchNorm (with running statistics, an affine map) to inductor as
    torch's own eval batch_norm (+ add + activation): same outputs as eager, every layout."""
    torch._dynamo.reset()
    torch.manual_seed(0)

    class EvalNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn_ext.BatchNorm2d(6)
            self.bn_act = bn_ext.BatchNormAct2d(6, activation=act, negative_slope=0.2)

        def forward(self, x, r):
            return self.bn_act(self.bn(x), r)

    model = EvalNet().to(dtype)
    with torch.no_grad():
        for m in (model.bn, model.bn_act):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_()
            m.bias.normal_()
    model.eval()
    counts = []
    compiled = torch.compile(copy.deepcopy(model), backend=_inline_backend(counts), fullgraph=True, dynamic=False)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 6, 5, 4, dtype=dtype).contiguous(memory_format=fmt)
        r = torch.randn(3, 6, 5, 4, dtype=dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(compiled(x, r), model(x, r), **tol)
    assert counts and all(c == 2 for c in counts), counts


def test_eval_inlining_leaves_computed_statistics():
    """batch_norm_elemt with statistics the graph computes (SyncBatchNorm's global ones), or with
    a mean that takes a gradient, stays bn_ext's op."""
    torch._dynamo.reset()

    elemt = torch.ops.bn_ext.batch_norm_elemt.default  # the overload the modules call

    def f(x, w, b, mean, var):
        m, v = torch.ops.bn_ext.batch_norm_stats(x)
        return elemt(x, w, b, m, v, 1e-5) + elemt(x, w, b, mean, var, 1e-5)

    counts = []
    graph_ops = []

    def backend(gm, example_inputs):
        counts.append(_inductor.inline_eval(gm.graph))
        graph_ops.extend(n.target for n in gm.graph.nodes)
        gm.recompile()
        return gm

    args = (torch.randn(2, 3, 4), torch.rand(3), torch.randn(3), torch.randn(3, requires_grad=True), torch.rand(3) + 1)
    torch.testing.assert_close(torch.compile(f, backend=backend, fullgraph=True)(*args), f(*args))
    assert counts == [0]
    assert graph_ops.count(elemt) == 2


def test_inductor_eval_end_to_end():
    """With inductor, an eval model's graph holds no bn_ext op and matches eager."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with config.patch(pre_grad_custom_pass=None, fx_graph_cache=False):
        bn_ext.enable_compile_fusion()
        eager = Net(torch.nn.ReLU()).eval()
        compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, dynamic=False)
        x = torch.randn(3, 4, 5, 6)
        with torch.no_grad():
            y, codes = run_and_get_code(compiled, x)
            torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
    assert codes and not any("torch.ops.bn_ext" in code for code in codes)
