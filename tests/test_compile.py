"""torch.compile(fullgraph=True) of models using bn_ext: no graph break, same numbers as eager."""

import copy

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
