"""torch.compile(fullgraph=True) of models using bn_ext: no graph break, same numbers as eager."""

import copy
import re

import pytest
import torch

import bn_ext
from conftest import DEVICES


class ConvBN(torch.nn.Module):
    def __init__(self, bn_cls, momentum):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = bn_cls(8, momentum=momentum)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = bn_cls(4, momentum=momentum, affine=False)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph_matches_eager(device, momentum):
    torch._dynamo.reset()
    eager = ConvBN(bn_ext.BatchNorm2d, momentum).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, device=device) + step
        ye = eager(x)
        yc = compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().mean().backward()
        yc.square().mean().backward()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, be), (_, bc) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled_model.bn1.num_batches_tracked.item() == 3
    compiled_model.eval()
    eager.eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,shape", [(bn_ext.BatchNorm1d, (6, 3)), (bn_ext.BatchNorm3d, (2, 3, 3, 4, 2))])
def test_compile_fullgraph_other_ranks_and_channels_last(cls, shape):
    torch._dynamo.reset()
    eager = cls(3, momentum=None)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=False)
    for _ in range(2):
        x = torch.randn(shape)
        if x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        yc = compiled(x)
        torch.testing.assert_close(yc, eager(x), rtol=1e-5, atol=1e-5)
    if len(shape) == 5:
        assert yc.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert compiled_module.num_batches_tracked.item() == 2


class ConvBNConv(torch.nn.Module):
    """conv -> bn_ext BatchNorm -> ReLU -> conv -> fused BatchNorm + add + ReLU6 -> conv: the
    convolutions' outputs are what inductor's layout optimisation makes channels-last."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn1 = bn_ext.BatchNorm2d(32)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = bn_ext.BatchNormAct2d(32, activation="relu6")
        self.conv3 = torch.nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.conv3(self.bn2(self.conv2(y), y))


def test_inductor_hands_over_any_layout():
    """The ops are tagged flexible_layout: inductor passes a convolution's output to them in the
    layout it chose, and theirs to the next convolution, with no copy kernel around the calls
    (custom ops' default, needs_fixed_stride_order, copies to the eager strides and back: each
    such kernel is named after the bn_ext op it serves). Same numbers as eager."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    for name in ("batch_norm_train_update", "batch_norm_act_train", "batch_norm_act_backward", "batch_norm_backward"):
        assert torch.Tag.flexible_layout in getattr(torch.ops.bn_ext, name).default.tags, name
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = ConvBNConv()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(2, 16, 8, 8)

    def step():
        y = compiled(x)
        y.square().mean().backward()
        return y

    with config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yc, codes = run_and_get_code(step)
    assert len(codes) == 2  # forward and backward graphs
    code = "\n".join(codes)
    assert "torch.ops.bn_ext.batch_norm_act_train" in code and "torch.ops.bn_ext.batch_norm_act_backward" in code
    copies = sorted(set(re.findall(r"\bcpp_fused_\w*batch_norm\w*(?= = async_compile)", code)))
    assert not copies, copies
    ye = eager(x)
    ye.square().mean().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    for (name, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, be), (_, bc) in zip(eager.named_buffers(), model.named_buffers(), strict=True):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ops_on_mixed_and_strided_layouts(device):
    """With any layout allowed, inductor may hand the ops a channels-last input with an NCHW
    residual and gradient, or a strided view: the outputs (and their strides, which the fake
    kernels promise) are eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)

    def f(x, r, w, b, rm, rv):
        x = x[:, :, ::2]  # strided view
        r = r[:, :, ::2]
        y = bn_ext.functional.batch_norm_act(x, rm, rv, w, b, training=True, residual=r, activation="silu")
        z = bn_ext.functional.batch_norm(y.contiguous(), None, None, w, b, training=True)
        return y, z

    shape = (3, 5, 8, 6)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, device=device)
    w = torch.rand(5, device=device) + 0.5
    b = torch.randn(5, device=device)
    args = [t.clone().requires_grad_() for t in (x, r, w, b)]
    args_c = [t.clone().requires_grad_() for t in (x, r, w, b)]
    for t, tc in zip(args, args_c):  # keep the layouts
        assert tc.stride() == t.stride()
    bufs = [torch.zeros(5, device=device), torch.ones(5, device=device)]
    bufs_c = [t.clone() for t in bufs]
    ye, ze = f(*args, *bufs)
    yc, zc = torch.compile(f, fullgraph=True, dynamic=False)(*args_c, *bufs_c)
    assert yc.stride() == ye.stride() and zc.stride() == ze.stride()
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zc, ze, rtol=1e-5, atol=1e-5)
    dy, dz = torch.randn_like(ye), torch.randn_like(ze)
    torch.autograd.backward((ye, ze), (dy, dz))
    torch.autograd.backward((yc, zc), (dy, dz))
    for t, tc, name in zip(args, args_c, ("input", "residual", "weight", "bias")):
        torch.testing.assert_close(tc.grad, t.grad, rtol=1e-4, atol=1e-5, msg=name)
    for t, tc in zip(bufs, bufs_c):
        torch.testing.assert_close(tc, t, rtol=1e-5, atol=1e-6)
