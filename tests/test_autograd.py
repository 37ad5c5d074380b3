"""gradcheck / gradgradcheck in float64 for every differentiable op and the module paths."""

import pytest
import torch

import bn_ext
from conftest import DEVICES

ops = torch.ops.bn_ext


def leaf(t):
    return t.detach().clone().requires_grad_()


def inputs(device, shape=(3, 2, 3, 2), fmt=None):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 2 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(c, dtype=torch.float64, device=device)
    return leaf(x), leaf(w), leaf(b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_gradcheck_train(device, fmt):
    x, w, b = inputs(device, fmt=fmt)
    fn = lambda x, w, b: ops.batch_norm_train(x, w, b, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_train_without_affine(device):
    x, _, _ = inputs(device, shape=(4, 3, 5))
    fn = lambda x: ops.batch_norm_train(x, None, None, 1e-3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_train_gradients_with_some_arguments_absent_or_frozen(device):
    """The C++ autograd function maps gradients to the tensors given: bias without weight, and
    any subset of input, weight and bias requiring grad."""
    x, w, b = inputs(device, shape=(4, 3, 5))
    fn = lambda x, b: ops.batch_norm_train(x, None, b, 1e-3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    dy = torch.randn_like(x)
    for needs in [(True, False, True), (False, True, False), (False, False, True), (True, True, False)]:
        xs, ws, bs = [leaf(t).requires_grad_(n) for t, n in zip((x, w, b), needs)]
        ops.batch_norm_train(xs, ws, bs, 1e-3)[0].backward(dy)
        xr, wr, br = [leaf(t) for t in (x, w, b)]
        torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.1, 1e-3).backward(dy)
        for ours, ref, n in zip((xs, ws, bs), (xr, wr, br), needs):
            assert (ours.grad is not None) == n
            if n:
                torch.testing.assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_eval_including_statistics(device):
    x, w, b = inputs(device)
    mean = leaf(torch.randn(2, dtype=torch.float64, device=device))
    var = leaf(torch.rand(2, dtype=torch.float64, device=device) + 0.5)
    fn = lambda x, w, b, m, v: ops.batch_norm_elemt(x, w, b, m, v, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, mean, var))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, mean, var))


@pytest.mark.parametrize("device", DEVICES)
def test_eval_gradients_with_some_arguments_absent_or_frozen(device):
    """The C++ autograd function of batch_norm_elemt maps gradients to the tensors given (bias
    without weight, weight without bias), for any subset of the five requiring grad, as torch's
    own eval batch_norm composed from differentiable ops does."""
    x, w, b = inputs(device, shape=(4, 3, 5))
    mean = torch.randn(3, dtype=torch.float64, device=device)
    var = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    dy = torch.randn_like(x)

    def reference(x, w, b, m, v):
        shape = (1, -1, 1)
        y = (x - m.view(shape)) * torch.rsqrt(v.view(shape) + 1e-3)
        y = y * w.view(shape) if w is not None else y
        return y + b.view(shape) if b is not None else y

    for given in [(True, True), (False, True), (True, False), (False, False)]:
        for needs in [
            (True, False, False, True, False),
            (False, True, True, False, True),
            (False, False, False, False, True),
            (True, True, True, True, True),
            (False,) * 5,
        ]:
            grads = []
            for fn in (lambda *a: ops.batch_norm_elemt(*a, 1e-3), reference):
                ts = [leaf(t).requires_grad_(n) for t, n in zip((x, w, b, mean, var), needs)]
                args = [t if keep else None for t, keep in zip(ts, (True, *given, True, True))]
                y = fn(*args)
                assert y.requires_grad == any(n and a is not None for n, a in zip(needs, args))
                if y.requires_grad:
                    y.backward(dy)
                grads.append([a.grad if a is not None else None for a in args])
            for ours, ref in zip(*grads):
                assert (ours is None) == (ref is None)
                if ref is not None:
                    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_where_no_gradient_is_recorded(device):
    """Under no_grad, or with nothing requiring grad, the training and eval ops return plain
    tensors (the autograd kernels call the op below autograd), equal to the recorded path's."""
    x, w, b = inputs(device, shape=(4, 3, 5))
    m = torch.randn(3, dtype=torch.float64, device=device)
    v = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    recorded = (ops.batch_norm_train(x, w, b, 1e-3), ops.batch_norm_elemt(x, w, b, m, v, 1e-3))
    assert recorded[0][0].grad_fn is not None and recorded[1].grad_fn is not None
    with torch.no_grad():
        plain = (ops.batch_norm_train(x, w, b, 1e-3), ops.batch_norm_elemt(x, w, b, m, v, 1e-3))
    frozen = [t.detach() for t in (x, w, b)]
    unrecorded = (ops.batch_norm_train(*frozen, 1e-3), ops.batch_norm_elemt(*frozen, m, v, 1e-3))
    for outs in (plain, unrecorded):
        assert outs[1].grad_fn is None and not outs[1].requires_grad
        assert all(t.grad_fn is None and not t.requires_grad for t in outs[0])
        torch.testing.assert_close(outs[1], recorded[1].detach(), rtol=0, atol=0)
        for a, r in zip(outs[0], recorded[0]):
            torch.testing.assert_close(a, r.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_stats(device):
    x, _, _ = inputs(device)
    assert torch.autograd.gradcheck(lambda x: ops.batch_norm_stats(x), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_module(device, training):
    m = bn_ext.BatchNorm2d(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    m.train(training)
    x, _, _ = inputs(device)
    # running stats move each call in training: check the map from (x, params) to output
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}

    def fn(x, w, b):
        if training:  # (eval saves the running stats for backward: leave them be)
            m.load_state_dict(snapshot, strict=False)
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, leaf(m.weight), leaf(m.bias)))
    assert torch.autograd.gradgradcheck(fn, (x, leaf(m.weight), leaf(m.bias)))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_matches_torch(device):
    """Second derivatives (e.g. for gradient penalties) agree with torch.nn's."""
    x, w, b = inputs(device, shape=(5, 3, 4, 4))
    results = []
    for bn in (torch.nn.functional.batch_norm, bn_ext.functional.batch_norm):
        xx, ww, bb = leaf(x), leaf(w), leaf(b)
        y = bn(xx, None, None, ww, bb, True)
        (gx,) = torch.autograd.grad((y * y.detach().sin()).sum(), xx, create_graph=True)
        penalty = (gx**2).sum()
        results.append(torch.autograd.grad(penalty, (xx, ww, bb), allow_unused=True))
    for ours, theirs in zip(results[1], results[0]):
        if theirs is None:  # the bias does not reach grad_input: ours may give zeros or None
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, theirs)
