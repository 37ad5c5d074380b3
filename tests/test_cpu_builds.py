"""The CPU kernel builds side by side in one process (bn_ext._C._use_cpu_kernels, which the
benchmark's --isa uses), and what every build must give bit for bit."""

import os
import runpy
import subprocess
import sys

import pytest
import torch

import bn_ext
from conftest import repo_env

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
ops = torch.ops.bn_ext


def runnable_builds():
    """The builds this CPU can run, from the baseline up (what "native" picks last)."""
    builds = []
    for name in ("default", "avx2", "avx512bf16"):
        try:
            before = bn_ext._C._use_cpu_kernels(name)
        except ValueError:
            continue
        bn_ext._C._use_cpu_kernels(before)
        builds.append(name)
    return builds


@pytest.fixture
def restore_build():
    before = bn_ext.build_info()["cpu_kernels"]
    yield
    bn_ext._C._use_cpu_kernels(before)


def test_switching_builds_names_the_one_in_use(restore_build):
    builds = runnable_builds()
    assert builds[0] == "default"
    in_use = bn_ext.build_info()["cpu_kernels"]
    for name in builds:
        previous = bn_ext._C._use_cpu_kernels(name)
        assert previous == in_use and bn_ext.build_info()["cpu_kernels"] == name
        in_use = name
    bn_ext._C._use_cpu_kernels("native")
    assert bn_ext.build_info()["cpu_kernels"] == builds[-1]  # the best one, whatever BN_EXT_CPU_ISA caps


def test_unknown_or_unrunnable_build_raises_and_changes_nothing(restore_build):
    in_use = bn_ext.build_info()["cpu_kernels"]
    with pytest.raises(ValueError, match="expected 'default', 'avx2', 'avx512bf16' or 'native'.*got 'sse9'"):
        bn_ext._C._use_cpu_kernels("sse9")
    if "avx512bf16" not in runnable_builds():
        with pytest.raises(ValueError, match="got 'avx512bf16'"):
            bn_ext._C._use_cpu_kernels("avx512bf16")
    assert bn_ext.build_info()["cpu_kernels"] == in_use


@pytest.mark.parametrize("build", ["default", "avx2"])
def test_switched_build_gives_the_capped_process_bits(build, tmp_path, restore_build):
    """A build switched to in process computes what a process started with BN_EXT_CPU_ISA=build
    computes, bit for bit (training forward and backward, every dtype, both layouts)."""
    if build not in runnable_builds():
        pytest.skip(f"this CPU cannot run the {build} build")
    script = os.path.join(SCRIPTS, "cpu_kernels.py")
    env = dict(repo_env(), BN_EXT_CPU_ISA=build)
    subprocess.run([sys.executable, script, str(tmp_path / "capped.pt")], check=True, env=env)
    bn_ext._C._use_cpu_kernels(build)
    argv = sys.argv
    try:
        sys.argv = [script, str(tmp_path / "switched.pt")]
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    capped, switched = torch.load(tmp_path / "capped.pt"), torch.load(tmp_path / "switched.pt")
    assert capped[0] == switched[0] == build
    assert len(capped) == len(switched) > 1
    for a, b in zip(capped[1:], switched[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting", ["0", "1"])
def test_prefetch_setting_is_reported_and_changes_no_bit(setting, tmp_path):
    """BN_EXT_PREFETCH=0 / =1 turns the streaming loops' prefetches off / on whatever the CPU
    (build_info reports it); a process either way computes the bits of one that left the choice to
    the CPU."""
    script = os.path.join(SCRIPTS, "cpu_kernels.py")
    env = dict(repo_env(), BN_EXT_PREFETCH=setting)
    subprocess.run([sys.executable, script, str(tmp_path / "set.pt")], check=True, env=env)
    env.pop("BN_EXT_PREFETCH")
    subprocess.run([sys.executable, script, str(tmp_path / "chosen.pt")], check=True, env=env)
    info = "import bn_ext; print(bn_ext.build_info()['cpu_prefetch'])"
    reported = subprocess.run(
        [sys.executable, "-c", info], env=dict(env, BN_EXT_PREFETCH=setting), capture_output=True, text=True, check=True
    ).stdout.strip()
    assert reported == str(setting == "1")
    set_, chosen = torch.load(tmp_path / "set.pt"), torch.load(tmp_path / "chosen.pt")
    assert len(set_) == len(chosen) > 1
    for a, b in zip(set_, chosen):
        assert a == b if isinstance(a, str) else torch.equal(a, b)


def _specials(n):
    """bfloat16 values: random ones of every magnitude and the special ones, n in all."""
    torch.manual_seed(0)
    v = torch.randn(n) * torch.exp2(torch.randint(-20, 20, (n,)).float())
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.3895e38, -3.3895e38, 1e-40])
    v[: len(special)] = special
    v[-len(special) :] = special
    return v.to(torch.bfloat16)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 6, 37, 41), (3, 100, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_outputs_round_to_nearest_even_in_every_build(shape, layout, restore_build):
    """y = x + b in float32, then rounded to bfloat16: each build's stores (8 or 16 at a time, the
    scalar tail) must round as torch's conversion does, ties to even, NaN kept NaN, overflow to
    Inf. The biases put x + b on ties: half a bfloat16 ulp of 1 is 2^-8. NCHW runs of 1517 and
    35 values; channels-last spans of 40 rows of 6 channels, 2 rows of 100 and a last single row
    (the 16-wide bodies, the 8-wide ones and scalar tails, with coefficients per position)."""
    c = shape[1]
    x = _specials(torch.Size(shape).numel()).reshape(shape)
    x[:, : c // 2] = torch.where(torch.rand(x[:, : c // 2].shape) < 0.5, 1.0, 1.0078125).to(torch.bfloat16)  # 1, 1+2^-7
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    b = torch.tensor([2.0**-8, -(2.0**-9), 3 * 2.0**-8, 0.3, 1e38, -7.0]).repeat(c)[:c]
    w, mean, var = torch.ones(c), torch.zeros(c), torch.ones(c)
    expected = (x.float() + b.view(1, c, 1, 1)).to(torch.bfloat16)
    for build in runnable_builds():
        bn_ext._C._use_cpu_kernels(build)
        y = ops.batch_norm_elemt(x, w, b, mean, var, 0.0)
        torch.testing.assert_close(
            y, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m, build=build: f"{build}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((2, 6, 9, 11), torch.channels_last),  # spans of 40 rows (240 values), 38 single rows
        ((2, 40, 6, 9), torch.channels_last),  # spans of 6 rows; single rows of 2.5 blocks of 16
        ((3, 100, 5, 7), torch.channels_last),  # spans of 8 rows, one single row
        ((2, 64, 5, 7), torch.channels_last),  # rows the AVX-512 plain reductions take two at a time
        ((100, 37), None),  # (N, C) rows as channels-last spans
        ((2, 24, 7, 9), None),  # NC(D)HW runs of 63 values
        ((5, 16, 7, 9), None),  # runs split where the backward's float32 lanes widen (256 values)
        ((3, 8, 53, 59), None),  # a run across a reduction block's end (8192 values)
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ("cl" if v is not None else "nchw"),
)
def test_fused_ops_agree_across_builds(shape, fmt, dtype, restore_build):
    """The fused ops' elementwise loops with given statistics compute the scalar loops' formulas
    operation for operation, whatever their width (8, 16, bfloat16 as even and odd halves with the
    per-position coefficients reordered to match): every build gives the baseline build's bits,
    forward and backward, every activation, with and without a residual. SiLU's exponential fuses
    its multiply-adds in the SIMD builds and not in the baseline: there the SIMD builds agree with
    each other to the bit and with the baseline to rounding."""
    builds = runnable_builds()
    if len(builds) < 2:
        pytest.skip("this CPU runs one build only")
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    dims = [d for d in range(x.dim()) if d != 1]
    mean, var = x.double().mean(dims), x.double().var(dims, unbiased=False)
    res, dy = torch.randn_like(x), torch.randn_like(x)
    runs = {}
    for build in builds:
        bn_ext._C._use_cpu_kernels(build)
        out = []
        for act, r in (("relu", res), ("relu6", None), ("leaky_relu", res), ("silu", None), ("identity", res)):
            mask = [True, True, True, r is not None]
            out.append((act, ops.batch_norm_act(x, w, b, r, mean, var, 1e-5, act, 0.2)))
            for training in (True, False):
                out += [
                    (act, t)
                    for t in ops.batch_norm_act_backward(dy, x, w, b, r, mean, var, 1e-5, training, act, 0.2, mask)
                ]
        runs[build] = out
    simd = builds[1:]
    for build in simd:
        for i, ((act, p), (_, q)) in enumerate(zip(runs["default"], runs[build], strict=True)):
            assert p.stride() == q.stride()
            if act != "silu":
                assert torch.equal(p, q), f"{build} differs from the baseline build in output {i} ({act})"
            else:
                # one rounding fewer per multiply-add: float32 within a few ulp of the output's
                # scale, bfloat16 and float16 at most one ulp where a value sits on a rounding boundary
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
                torch.testing.assert_close(q, p, **tol, msg=lambda m, i=i, b=build: f"{b}, output {i} (silu): {m}")
    for build in simd[1:]:
        for i, ((act, p), (_, q)) in enumerate(zip(runs[simd[0]], runs[build], strict=True)):
            assert torch.equal(p, q), f"{build} differs from {simd[0]} in output {i} ({act})"
