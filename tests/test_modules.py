"""Module API: constructor, state_dict both ways, convert_model, Lazy modules, build info."""

import copy
import subprocess
import sys

import pytest
import torch

import bn_ext
from conftest import DEVICES, TORCH_HAS_BIAS_KW

PAIRS = [
    (torch.nn.BatchNorm1d, bn_ext.BatchNorm1d, (8, 5)),
    (torch.nn.BatchNorm2d, bn_ext.BatchNorm2d, (4, 5, 3, 3)),
    (torch.nn.BatchNorm3d, bn_ext.BatchNorm3d, (2, 5, 2, 3, 3)),
]


@pytest.mark.parametrize("theirs_cls,ours_cls,shape", PAIRS)
@pytest.mark.parametrize(
    "kwargs", [dict(), dict(affine=False), dict(track_running_stats=False), dict(bias=False), dict(momentum=None)]
)
def test_same_parameters_buffers_and_state_dict_both_ways(theirs_cls, ours_cls, shape, kwargs):
    if "bias" in kwargs and not TORCH_HAS_BIAS_KW:
        pytest.skip("this torch.nn BatchNorm has no bias= argument to compare with")
    theirs = theirs_cls(5, **kwargs)
    ours = ours_cls(5, **kwargs)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    # train ours, load into theirs; train theirs, load into ours
    for _ in range(2):
        ours(torch.randn(shape))
        theirs(torch.randn(shape))
    fresh_theirs, fresh_ours = theirs_cls(5, **kwargs), ours_cls(5, **kwargs)
    fresh_theirs.load_state_dict(ours.state_dict())
    fresh_ours.load_state_dict(theirs.state_dict())
    for a, b in zip(fresh_theirs.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(fresh_ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_constructor_device_dtype(device, dtype):
    m = bn_ext.BatchNorm2d(4, device=device, dtype=dtype)
    assert m.weight.dtype == dtype and m.running_mean.dtype == dtype
    assert m.weight.device.type == device and m.num_batches_tracked.dtype == torch.long
    y = m(torch.randn(3, 4, 2, 2, device=device, dtype=dtype))
    assert y.dtype == dtype


class BasicBlock(torch.nn.Module):
    """A torchvision-style ResNet basic block, with a downsample path."""

    def __init__(self, cin, cout, stride=2):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
        )
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(cout * 16, 10), torch.nn.BatchNorm1d(10))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.head(torch.relu(out + self.downsample(x)))


def test_convert_model_round_trip_on_resnet_block():
    torch.manual_seed(0)
    reference = BasicBlock(3, 8)
    model = copy.deepcopy(reference)
    for _ in range(2):
        reference(torch.randn(4, 3, 8, 8))
    model.load_state_dict(reference.state_dict())
    model.eval()
    reference.eval()
    params_before = {n: p for n, p in model.named_parameters()}
    converted = bn_ext.convert_model(model)
    assert converted is model
    kinds = [type(m) for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [bn_ext.BatchNorm2d] * 3 + [bn_ext.BatchNorm1d]
    # the very same parameter objects (optimisers keep working), same mode
    for n, p in converted.named_parameters():
        assert p is params_before[n]
    assert not converted.training and not converted.bn1.training
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)
    # training steps stay in lock-step with torch.nn
    converted.train()
    reference.train()
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-4, atol=1e-4)
    for (n, a), (_, b) in zip(converted.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    back = bn_ext.convert_model(converted, to="torch")
    kinds = [type(m) for m in back.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [torch.nn.BatchNorm2d] * 3 + [torch.nn.BatchNorm1d]
    assert back.state_dict().keys() == reference.state_dict().keys()


def test_convert_model_top_level_and_variants():
    bn = torch.nn.BatchNorm3d(4, affine=True, momentum=None).double().eval()
    bn.register_parameter("bias", None)  # what bias=False builds (older torch lacks the argument)
    ours = bn_ext.convert_model(bn)
    assert type(ours) is bn_ext.BatchNorm3d and ours.bias is None and ours.momentum is None
    assert ours.weight is bn.weight and ours.running_mean is bn.running_mean and not ours.training
    bn = torch.nn.BatchNorm1d(4, track_running_stats=False, affine=False)
    ours = bn_ext.convert_model(bn)
    assert ours.running_mean is None and ours.weight is None
    with pytest.raises(ValueError, match="to: expected"):
        bn_ext.convert_model(bn, to="cudnn")


@pytest.mark.parametrize(
    "lazy,final,shape",
    [
        (bn_ext.LazyBatchNorm1d, bn_ext.BatchNorm1d, (6, 7)),
        (bn_ext.LazyBatchNorm2d, bn_ext.BatchNorm2d, (3, 7, 4, 4)),
        (bn_ext.LazyBatchNorm3d, bn_ext.BatchNorm3d, (2, 7, 2, 2, 3)),
    ],
)
def test_lazy_modules(lazy, final, shape):
    m = lazy(momentum=0.2)
    x = torch.randn(shape)
    y = m(x)
    assert type(m) is final and m.num_features == 7 and m.weight.shape == (7,)
    ref = {
        bn_ext.BatchNorm1d: torch.nn.BatchNorm1d,
        bn_ext.BatchNorm2d: torch.nn.BatchNorm2d,
        bn_ext.BatchNorm3d: torch.nn.BatchNorm3d,
    }[final](7, momentum=0.2)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, ref.running_var)
    converted = bn_ext.convert_model(torch.nn.Sequential(torch.nn.LazyBatchNorm2d()))
    assert type(converted[0]) is bn_ext.LazyBatchNorm2d


@pytest.mark.parametrize("training", [True, False])
def test_parameters_and_buffers_outside_their_tables(training):
    """The module reads weight, bias and the running stats from Module's tables where they are
    there; where they are not (a parametrization makes weight a property; a deleted buffer set
    as a plain attribute), it finds them as attribute access would, as torch.nn's module does."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 4)
    mods = []
    for cls in (torch.nn.BatchNorm2d, bn_ext.BatchNorm2d):
        torch.manual_seed(1)
        m = cls(3)
        with torch.no_grad():
            m.bias.uniform_(-1, 1)
            m.running_mean.uniform_(-1, 1)
        torch.nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())
        stats = m.running_var.clone() + 0.5
        del m.running_var
        m.running_var = stats  # a plain attribute now, not a buffer
        mods.append(m.train(training))
    ys = [m(x) for m in mods]
    torch.testing.assert_close(ys[1], ys[0])
    torch.testing.assert_close(mods[1].running_var, mods[0].running_var)
    torch.testing.assert_close(mods[1].running_mean, mods[0].running_mean)
    ys[1].sum().backward()
    ys[0].sum().backward()
    p0, p1 = (m.parametrizations.weight.original for m in mods)
    torch.testing.assert_close(p1.grad, p0.grad)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_build_info_and_single_openmp_runtime():
    info = bn_ext.build_info()
    assert info["torch"] == torch.__version__
    assert info["num_threads"] == torch.get_num_threads()
    assert isinstance(info["cuda"], bool)
    # one OpenMP runtime in the process: torch's. bn_ext adds none of its own.
    assert len(info["openmp_runtimes"]) <= 1, info["openmp_runtimes"]
    out = subprocess.run(
        [sys.executable, "-c", "import torch, bn_ext; print(len(bn_ext.build_info()['openmp_runtimes']))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert int(out) <= 1, out


def test_parallel_loops_really_run_in_parallel():
    """at::parallel_for is a header template: built into a library without OpenMP it silently
    runs serially. Ours must use every thread torch has, and load no OpenMP runtime of its own."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert bn_ext._C._parallel_threads_used() == 2
        torch.set_num_threads(1)
        assert bn_ext._C._parallel_threads_used() == 1
    finally:
        torch.set_num_threads(old)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, bn_ext\n"
            "maps = [l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l or 'libiomp' in l]\n"
            "print(len(set(maps)))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert int(out) == 1, "expected exactly one OpenMP runtime (torch's) in the process"


def test_import_without_build_tells_what_to_do(tmp_path):
    """setup.py run without torch explains how to build (simulated by hiding torch)."""
    import pathlib

    setup_py = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')")
    proc = subprocess.run(
        [sys.executable, str(setup_py), "--name"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr and "Install torch first" in proc.stderr
