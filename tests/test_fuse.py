"""bn_ext.fuse on real networks: which layers it fuses, and that the fused model computes what
the original does (outputs, parameter gradients, buffers, train and eval) with the same
state_dict."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_ext

torchvision = pytest.importorskip("torchvision")


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, bn_ext.modules._ActMixin)]


def check_same_model(fused, ref, x, tol=1e-9):
    """In float64: where a pre-activation lies within float32 rounding of ReLU's kink, one model's
    gradient takes a whole dy value the other's does not (on an Intel Xeon, torch.nn's own float32
    resnet18 differed from its float64 self by 2% of layer4's largest bias gradient, bn_ext's by
    5e-6), which says nothing about the fusion; float64 leaves no value that close."""
    fused.double()
    ref.double()
    x = x.double()
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    fused.load_state_dict(ref.state_dict())
    for training in (True, True, False):
        fused.train(training)
        ref.train(training)
        torch.manual_seed(1)  # the same dropout masks on both sides
        y1 = fused(x)
        torch.manual_seed(1)
        y2 = ref(x)
        torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
        if training:
            dy = torch.randn_like(y1)
            y1.backward(dy)
            y2.backward(dy)
            grads = dict(ref.named_parameters())
            largest = max(float(p.grad.abs().max()) for p in ref.parameters())
            for name, p in fused.named_parameters():
                # a conv bias before a BatchNorm has a gradient of rounding noise only
                g = grads[name].grad
                atol = tol * max(float(g.abs().max()), largest)
                torch.testing.assert_close(p.grad, g, rtol=tol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
            fused.zero_grad()
            ref.zero_grad()
    for (name, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(
    "name,expected",
    [("resnet18", 17), ("mobilenet_v2", 35), ("efficientnet_b0", 33)],
)
def test_torchvision_models(name, expected):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    fused = bn_ext.fuse(model)
    assert fused.bn_ext_fused == expected == len(fused_layers(fused))
    # the same parameter objects under the same names
    for pname, p in fused.named_parameters():
        assert p is params[pname]
    check_same_model(fused, ref, torch.randn(2, 3, 64, 64))


def test_fused_resnet18_scripts():
    torch.manual_seed(0)
    fused = bn_ext.fuse(torchvision.models.resnet18(num_classes=10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(fused)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(scripted(x), fused(x), rtol=0, atol=0)


def test_resnet50_fuses_every_block():
    model = torchvision.models.resnet50(num_classes=10)
    fused = bn_ext.fuse(model)
    # bn1 + relu, then per bottleneck bn1 + relu, bn2 + relu, bn3 + add + relu
    assert fused.bn_ext_fused == 1 + 16 * 3
    activations = {(m.activation, m.num_features) for m in fused_layers(fused)}
    assert all(a == "relu" for a, _ in activations)


def test_timm_batch_norm_act_is_converted_directly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    ref = copy.deepcopy(model)
    fused = bn_ext.fuse(model)
    assert fused.bn_ext_fused == len(fused_layers(fused)) > 40
    assert type(fused) is type(ref)  # timm's layers convert in place: no forward changes
    check_same_model(fused, ref, torch.randn(2, 3, 64, 64))


class Patterns(nn.Module):
    """Each pattern fuse must take or leave."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_functional = nn.BatchNorm2d(4)
        self.bn_method = bn_ext.BatchNorm2d(4)
        self.bn_leaky = nn.BatchNorm2d(4)
        self.leaky = nn.LeakyReLU(0.3)
        self.bn_shared = nn.BatchNorm2d(4)  # its output is used twice: left
        self.bn_add = nn.BatchNorm2d(4)
        self.bn_silu = nn.BatchNorm2d(4)
        self.bn_alone = nn.BatchNorm2d(4)  # no activation: left

    def forward(self, x):
        x = self.conv(x)
        x = F.relu(self.bn_functional(x), inplace=True)
        x = self.bn_method(x).relu()
        x = self.leaky(self.bn_leaky(x))
        s = self.bn_shared(x)
        x = F.relu(s) + s
        y = self.bn_add(x)
        y = torch.relu(x + y)
        y = F.silu(self.bn_silu(y))
        return self.bn_alone(y)


def test_patterns():
    torch.manual_seed(0)
    model = Patterns()
    ref = copy.deepcopy(model)
    fused = bn_ext.fuse(model)
    kinds = {name: (type(m).__name__, getattr(m, "activation", None)) for name, m in fused.named_modules() if name}
    assert kinds["bn_functional"] == ("BatchNormAct2d", "relu")
    assert kinds["bn_method"] == ("BatchNormAct2d", "relu")
    assert kinds["bn_leaky"] == ("BatchNormAct2d", "leaky_relu") and fused.bn_leaky.negative_slope == 0.3
    assert kinds["bn_shared"] == ("BatchNorm2d", None)
    assert kinds["bn_add"] == ("BatchNormAct2d", "relu")
    assert kinds["bn_silu"] == ("BatchNormAct2d", "silu")
    assert kinds["bn_alone"] == ("BatchNorm2d", None)
    assert fused.bn_ext_fused == 5
    check_same_model(fused, ref, torch.randn(4, 3, 6, 6))


def test_untraceable_modules_are_left_and_their_children_still_fused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: FX cannot trace this module
                return self.block(x)
            return -self.block(x)

    model = Branchy()
    ref = copy.deepcopy(model)
    fused = bn_ext.fuse(model)
    assert type(fused) is Branchy and fused.bn_ext_fused == 1
    check_same_model(fused, ref, torch.randn(2, 3, 5, 5))
