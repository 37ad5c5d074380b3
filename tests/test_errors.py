"""Bad input raises a clear error naming the argument, and leaves every buffer untouched."""

import shutil
import subprocess
import sys

import pytest
import torch

import bn_ext
from conftest import requires_cuda

ops = torch.ops.bn_ext


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_untouched(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed after a failed call"


MODULE_CASES = [
    (bn_ext.BatchNorm1d, torch.randn(4, 3, 5, 2), ValueError, "expected 2D or 3D input"),
    (bn_ext.BatchNorm1d, torch.randn(4), ValueError, "expected 2D or 3D input"),
    (bn_ext.BatchNorm2d, torch.randn(4, 3, 5), ValueError, "expected 4D input"),
    (bn_ext.BatchNorm3d, torch.randn(4, 3, 5, 5), ValueError, "expected 5D input"),
    (bn_ext.BatchNorm2d, torch.randn(4, 5, 2, 2), RuntimeError, r"input: expected 3 channels \(num_features\)"),
    (bn_ext.BatchNorm2d, torch.randn(1, 3, 1, 1), ValueError, "Expected more than 1 value per channel when training"),
    (bn_ext.BatchNorm1d, torch.randn(1, 3), ValueError, "Expected more than 1 value per channel when training"),
    (bn_ext.BatchNorm2d, torch.randn(4, 3, 2, 2, dtype=torch.float64), RuntimeError, "weight: expected dtype"),
    (bn_ext.BatchNorm2d, torch.randint(0, 5, (4, 3, 2, 2)), RuntimeError, "input: expected dtype float32"),
]


@pytest.mark.parametrize("cls,x,exc,match", MODULE_CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_bad_input_leaves_state(cls, x, exc, match, momentum):
    m = cls(3, momentum=momentum)
    m(torch.randn(6, 3, *([2] * (2 if cls is bn_ext.BatchNorm2d else 3 if cls is bn_ext.BatchNorm3d else 0))))
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        m(x)
    assert_untouched(m, before)


def test_single_value_message_matches_torch():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError) as theirs:
        torch.nn.BatchNorm1d(3)(x)
    with pytest.raises(ValueError) as ours:
        bn_ext.BatchNorm1d(3)(x)
    assert str(ours.value) == str(theirs.value)
    bn_ext.BatchNorm1d(3).eval()(x)  # fine in eval, as in torch


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("running_mean", torch.zeros(2), "running_mean: expected a 1-D tensor of 3 elements"),
        ("running_var", torch.ones(4), "running_var: expected a 1-D tensor of 3 elements"),
        ("running_var", torch.ones(3, 1), "running_var: expected a 1-D tensor of 3 elements"),
        ("num_batches_tracked", torch.tensor(0.0), "num_batches_tracked: expected a one-element int64 tensor"),
    ],
)
def test_bad_buffers_leave_everything_untouched(name, bad, match):
    m = bn_ext.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2))
    setattr(m, name, bad)
    before = snapshot(m)
    # the op checks the buffers before its statistics pass: one layer of checks, in C++
    with pytest.raises(RuntimeError, match="bn_ext.batch_norm_train_update: " + match):
        m(torch.randn(4, 3, 2, 2))
    assert_untouched(m, before)


def test_train_update_checks_buffers_before_anything_is_written():
    x = torch.randn(4, 3, 5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    bad = [
        ((torch.zeros(2), rv, nbt, 0.1), "running_mean: expected a 1-D tensor of 3 elements"),
        ((rm, torch.ones(3, dtype=torch.int32), nbt, 0.1), "running_var: expected a floating-point tensor"),
        ((rm, rv, torch.tensor([0, 0]), 0.1), "num_batches_tracked: expected a one-element int64 tensor"),
        ((rm, rv, torch.tensor(-2), None), "num_batches_tracked: expected a non-negative count"),
        ((rm, rv, None, None), "momentum: None .* needs num_batches_tracked"),
    ]
    for (mean, var, counter, momentum), match in bad:
        with pytest.raises(RuntimeError, match="bn_ext.batch_norm_train_update: " + match):
            ops.batch_norm_train_update(x, None, None, mean, var, counter, momentum, 1e-5)
    assert nbt.item() == 0 and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_bad_eval_buffers():
    m = bn_ext.BatchNorm2d(3).eval()
    m.running_mean = torch.zeros(5)
    with pytest.raises(RuntimeError, match="mean: expected 3 elements"):
        m(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("training", [True, False])
def test_functional_bad_arguments(training):
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps must be"):
        bn_ext.functional.batch_norm(x, rm, rv, training=training, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        bn_ext.functional.batch_norm(x, rm, rv, training=training, eps=float("nan"))
    if training:
        with pytest.raises(ValueError, match="eps must be positive during training"):
            bn_ext.functional.batch_norm(x, rm, rv, training=True, eps=0.0)
        with pytest.raises(ValueError, match="momentum must be a number"):
            bn_ext.functional.batch_norm(x, rm, rv, training=True, momentum=float("nan"))
    else:
        with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
            bn_ext.functional.batch_norm(x, None, None, training=False)
    with pytest.raises(RuntimeError, match="bias: expected 3 elements"):
        bn_ext.functional.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(4), training=training)
    with pytest.raises(RuntimeError, match="weight: expected a 1-D tensor"):
        bn_ext.functional.batch_norm(x, rm, rv, torch.ones(3, 1), None, training=training)
    with pytest.raises(RuntimeError, match="weight: expected dtype Float"):
        bn_ext.functional.batch_norm(x, rm, rv, torch.ones(3, dtype=torch.float64), None, training=training)
    with pytest.raises(ValueError, match="input: expected at least 2 dimensions"):
        bn_ext.functional.batch_norm(torch.randn(3), rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_op_level_checks():
    x = torch.randn(4, 3, 5)
    mean, var = ops.batch_norm_stats(x)
    with pytest.raises(RuntimeError, match="grad_out: expected size"):
        ops.batch_norm_backward(torch.randn(4, 3, 6), x, None, mean, var, 1e-5, True, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out: expected dtype"):
        ops.batch_norm_backward(torch.randn(4, 3, 5).double(), x, None, mean, var, 1e-5, True, [True, True, True])
    with pytest.raises(RuntimeError, match="mean: expected 3 elements"):
        ops.batch_norm_backward_reduce(torch.randn_like(x), x, torch.zeros(2))
    with pytest.raises(RuntimeError, match="eps: expected a number"):
        ops.batch_norm_train(x, None, None, float("nan"))
    with pytest.raises(RuntimeError, match="momentum: None .* needs num_batches_tracked"):
        ops.batch_norm_update_running_stats(torch.zeros(3), torch.ones(3), None, mean, var, None, 20)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    with pytest.raises(RuntimeError, match="momentum: expected a number or None, got nan"):
        ops.batch_norm_update_running_stats(rm, rv, nbt, mean, var, float("nan"), 20)
    assert nbt.item() == 0 and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(RuntimeError, match="input: expected at least 2 dimensions"):
        ops.batch_norm_stats(torch.randn(5))


@requires_cuda
def test_device_mismatch_is_reported():
    x = torch.randn(4, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="weight: expected a tensor on cuda"):
        bn_ext.functional.batch_norm(x, None, None, torch.ones(3), None, training=True)
    m = bn_ext.BatchNorm1d(3).cuda()
    m.running_mean = torch.zeros(3)
    before = snapshot(m)
    with pytest.raises(RuntimeError, match="running_mean: expected a tensor on cuda"):
        m(x)
    assert_untouched(m, before)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_extension_shares_the_process_cpp_runtime():
    """The extension must not export a libstdc++ copy of its own: linked statically (a g++ whose
    search path holds only libstdc++.a), its stream code mixed with the process's libstdc++.so.6
    and formatting an integer into an error message crashed the process. ostream::_M_insert<long>
    is instantiated inside libstdc++ only, so it is defined in our library only if a copy is."""
    lib = bn_ext._C.__file__
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    assert "_ZNSo9_M_insertIlEERSoT_" not in out, f"{lib} exports a static libstdc++'s symbols"
    with pytest.raises(RuntimeError, match=r"got 1-D input of size \[5\]"):
        ops.batch_norm_stats(torch.randn(5))
