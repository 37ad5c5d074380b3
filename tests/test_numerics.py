"""bn_ext against a float64 reference: accuracy, stability with large means, determinism."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import bn_ext
import reference as ref
from conftest import DEVICES, TOL, repo_env

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")

ops = torch.ops.bn_ext


def rand(shape, device, dtype=torch.float64, mean=0.0, std=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * std + mean).to(dtype)


LAYOUT_CASES = [
    ((7, 5, 9, 11), None),
    ((7, 5, 9, 11), torch.channels_last),
    ((3, 4, 5, 6, 7), torch.channels_last_3d),
    ((33, 17), None),
    ((4, 6, 300), None),
    # blocks that span many planes, and planes that span many blocks
    ((64, 3, 7, 7), None),
    ((2, 3, 150, 150), None),
    ((2, 3, 150, 150), torch.channels_last),
    ((1000, 37, 3), None),
    # channels-last rows of a few channels, walked 8 rows at a time, with rows left over
    ((5, 12, 7, 3), torch.channels_last),
    ((6, 3), None),
    ((61, 3), None),
    # channels-last rows of 64 channels, summed two at a time as one row of 128 (in_order_tiles),
    # with a row left over, and over several row blocks; rows of 32 and 16 channels
    ((3, 64, 5, 7), torch.channels_last),
    ((4, 64, 33, 35), torch.channels_last),
    ((5, 64, 3, 3, 3), torch.channels_last_3d),
    ((5, 32, 3, 3, 3), torch.channels_last_3d),
    ((7, 16, 5, 3), torch.channels_last),
    # channels-last rows streamed (over 4 MiB read: kStreamedReadBytes) as four streams per block,
    # blocks of rows not a multiple of four, two channels past the last vector
    ((2, 266, 45, 47), torch.channels_last),
    # many channels over few rows: the channels-last reductions split the channels across tasks
    ((4, 1030, 3, 5), torch.channels_last),
    ((2, 1032, 4, 4), torch.channels_last),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,fmt", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_train_forward_backward_vs_float64(shape, fmt, dtype, device):
    x = rand(shape, device, dtype, mean=3.0, std=2.0)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[1]
    w = rand((c,), device, dtype, 1.0, 0.3)
    b = rand((c,), device, dtype)
    out, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
    rmean, rvar = ref.batch_stats(x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(mean.double(), rmean, **tol)
    torch.testing.assert_close(var.double(), rvar, **tol)
    torch.testing.assert_close(out.double(), ref.forward(x, rmean, rvar, w, b, 1e-5), **tol)
    if fmt is not None:
        assert out.is_contiguous(memory_format=fmt)

    dy = rand(shape, device, dtype)
    gi, gw, gb = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
    rdx, rdw, rdb = ref.backward_training(x, dy, w, 1e-5)
    gtol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gi.double(), rdx, **gtol)
    torch.testing.assert_close(gw.double(), rdw, **gtol)
    torch.testing.assert_close(gb.double(), rdb, **gtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("shape", [(8, 6, 10, 12), (3, 64, 9, 11)])
def test_low_precision_error_no_worse_than_torch(dtype, fmt, shape, device):
    """In bf16/fp16 both we and PyTorch round; our error against float64 stays within PyTorch's."""
    x = rand(shape, device, dtype, mean=1.0, std=2.0)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = rand((shape[1],), device, torch.float32, 1.0, 0.3)
    b = rand((shape[1],), device, torch.float32)
    rmean, rvar = ref.batch_stats(x)
    expected = ref.forward(x, rmean, rvar, w, b, 1e-5)
    ours = bn_ext.functional.batch_norm(x, None, None, w, b, training=True)
    theirs = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
    err_ours = (ours.double() - expected).abs().max().item()
    err_theirs = (theirs.double() - expected).abs().max().item()
    ulp = torch.finfo(dtype).eps * expected.abs().max().item()
    assert err_ours <= max(1.5 * err_theirs, ulp), (err_ours, err_theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_large_mean_float32_is_stable(fmt, device):
    """mean 1e4, std 1 in float32: a sum/sum-of-squares variance loses everything here."""
    x = rand((16, 4, 32, 32), device, torch.float32, mean=1e4, std=1.0)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    rmean, rvar = ref.batch_stats(x)
    out, mean, var = ops.batch_norm_train(x, None, None, 1e-5)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double(), ref.forward(x, rmean, rvar, None, None, 1e-5), rtol=0, atol=2e-6)
    # what the naive formula gives, to show the test has teeth
    naive = (x.float() ** 2).mean((0, 2, 3)) - x.float().mean((0, 2, 3)) ** 2
    assert (naive.double() - rvar).abs().max() > 1e-2 or not torch.isfinite(naive).all()


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_update_values(device):
    """Unbiased variance, momentum blend, cumulative average with momentum=None."""
    mean = torch.tensor([1.0, -2.0, 0.5], device=device)
    var = torch.tensor([4.0, 0.25, 1.0], device=device)
    rm = torch.tensor([0.5, 0.5, 0.5], device=device)
    rv = torch.tensor([2.0, 2.0, 2.0], device=device)
    nbt = torch.tensor(3, device=device)
    ops.batch_norm_update_running_stats(rm, rv, nbt, mean, var, 0.25, 5)
    torch.testing.assert_close(rm, 0.25 * mean + 0.75 * 0.5)
    torch.testing.assert_close(rv, 0.25 * var * 5 / 4 + 0.75 * 2.0)
    assert nbt.item() == 4
    rm2, rv2 = rm.clone(), rv.clone()
    ops.batch_norm_update_running_stats(rm2, rv2, nbt, mean, var, None, 5)
    assert nbt.item() == 5
    torch.testing.assert_close(rm2, mean / 5 + rm * 4 / 5)
    torch.testing.assert_close(rv2, var * 5 / 4 / 5 + rv * 4 / 5)
    # count == 0 (empty batch) counts the batch but leaves the statistics alone
    before = rm2.clone(), rv2.clone()
    ops.batch_norm_update_running_stats(rm2, rv2, nbt, mean, var, 0.5, 0)
    assert nbt.item() == 6
    assert torch.equal(rm2, before[0]) and torch.equal(rv2, before[1])


@pytest.mark.parametrize("device", DEVICES)
# (16, 160, 2, 2): the CPU's statistics take whole channels a task (4 channels a thread and more)
@pytest.mark.parametrize("shape", [(5, 4, 6, 7), (16, 160, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_stats_and_elemt_ops_compose_to_train(device, shape):
    x = rand(shape, device, torch.float32, 2.0, 3.0)
    w, b = rand((shape[1],), device, torch.float32), rand((shape[1],), device, torch.float32)
    mean, var = ops.batch_norm_stats(x)
    out, mean2, var2 = ops.batch_norm_train(x, w, b, 1e-5)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)
    torch.testing.assert_close(ops.batch_norm_elemt(x, w, b, mean, var, 1e-5), out, rtol=1e-6, atol=1e-6)
    dy = rand(x.shape, device, torch.float32)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, mean)
    count = x.numel() // x.shape[1]
    gi = ops.batch_norm_backward_elemt(dy, x, w, mean, var, sum_dy, sum_dy_xmu, 1e-5, count)
    gi2, gw, gb = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
    torch.testing.assert_close(gi, gi2, rtol=1e-5, atol=1e-6)  # sums rounded to float32 between ops
    torch.testing.assert_close(gb, sum_dy)
    torch.testing.assert_close(gw, sum_dy_xmu * torch.rsqrt(var + 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "shape",
    [(3, 9, 41, 37), (16, 64, 20, 20), (2, 12, 17, 13, 19), (4, 24, 9, 9), (9, 24, 2, 2), (6, 16, 1, 2), (5, 20, 2, 4)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_per_channel_training_matches_one_channel_at_a_time(shape, dtype):
    """NC(D)HW training forward and backward over many channels run per channel (the reduction,
    then the elementwise pass from cache; channels of more than 8 KiB pipelined, each thread
    summing one channel while it writes the one before, in one loop). Each channel's outputs must
    be bitwise those of the same op on that channel alone, which splits one channel's work
    between the threads and never pipelines. Odd planes put runs off the vector width; planes of
    2, 4 and 8 values go several to a vector. Two threads: the per-channel path needs 4 channels a
    thread, which these shapes have for 2."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_channels_alone(shape, dtype)
    finally:
        torch.set_num_threads(old_threads)


def _check_channels_alone(shape, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    w = torch.rand(shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    b = torch.randn_like(w)
    dy = torch.randn_like(x)
    y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
    gi, gw, gb = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
    for c in range(shape[1]):
        one = slice(c, c + 1)
        xc, dyc = x[:, one].contiguous(), dy[:, one].contiguous()
        yc, mc, vc = ops.batch_norm_train(xc, w[one], b[one], 1e-5)
        gic, gwc, gbc = ops.batch_norm_backward(dyc, xc, w[one], mean[one], var[one], 1e-5, True, [True, True, True])
        for name, whole, alone in [
            ("y", y[:, one], yc),
            ("mean", mean[one], mc),
            ("var", var[one], vc),
            ("grad_input", gi[:, one], gic),
            ("grad_weight", gw[one], gwc),
            ("grad_bias", gb[one], gbc),
        ]:
            assert torch.equal(whole, alone), f"channel {c}: {name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(16, 160, 2, 2), (9, 130, 1, 2), (7, 100, 2, 4), (5, 70, 3, 3)], ids=lambda s: "x".join(map(str, s))
)
def test_elemt_matches_one_channel_at_a_time(shape, dtype):
    """The NC(D)HW elementwise pass takes planes of 2, 4 or 8 values several to a vector, each lane
    with its own channel's coefficients, from the first whole plane of a thread's piece on (the
    pieces, about 1900 values of 2 x 2 planes, start inside planes). Each channel's output must be
    bitwise that of the op on that channel alone, with means near the spread (folded into the
    shift) beside means far from it (subtracted)."""
    C = shape[1]
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    mean, var = torch.randn(C), torch.rand(C) + 0.1
    mean[::3] = 40.0
    y = ops.batch_norm_elemt(x, w, b, mean, var, 1e-5)
    for c in range(C):
        one = slice(c, c + 1)
        alone = ops.batch_norm_elemt(x[:, one].contiguous(), w[one], b[one], mean[one], var[one], 1e-5)
        assert torch.equal(y[:, one], alone), f"channel {c} differs"


def test_bitwise_deterministic_across_thread_counts(tmp_path):
    """Same bits for any thread count and any split of the work between threads. Threads take
    pieces from each other's shares when theirs are done (parallel_pieces in csrc/cpu/kernels/work_sharing.h), so the
    split changes run to run; 5 threads on this machine's 2 cores are preempted often, and pieces
    change hands in every pass."""
    script = os.path.join(SCRIPTS, "determinism.py")
    results = {}
    for threads, tag in ((1, "a"), (2, "b"), (2, "c"), (5, "d")):
        path = tmp_path / f"{tag}.pt"
        env = repo_env()
        subprocess.run([sys.executable, str(script), str(threads), str(path)], check=True, env=env)
        results[tag] = torch.load(path)
    assert len({len(r) for r in results.values()}) == 1 and len(results["a"]) > 0
    for a, b, c, d in zip(results["a"], results["b"], results["c"], results["d"]):
        assert torch.equal(a, b), "1 thread vs 2 threads differ"
        assert torch.equal(b, c), "two runs with 2 threads differ"
        assert torch.equal(a, d), "1 thread vs 5 threads differ"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_set_num_threads_is_honoured_in_process():
    """torch.set_num_threads changes how many threads our parallel loops use (they run on torch's
    own pool), and the results do not change with it."""
    x = torch.randn(16, 8, 32, 32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.batch_norm_train(x, None, None, 1e-5)
        assert bn_ext._C._parallel_threads_used() == 1
        torch.set_num_threads(2)
        b = ops.batch_norm_train(x, None, None, 1e-5)
        assert bn_ext._C._parallel_threads_used() == 2
    finally:
        torch.set_num_threads(old)
    assert len(a) == len(b) == 3
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_streaming_stores_write_the_same_values(tmp_path):
    """Outputs of ops whose tensors fill the last-level cache are written with streaming stores (stream_output):
    BN_EXT_LLC_BYTES=1 streams every output, on shapes whose rows and runs start off the stores'
    alignment (they fall back to plain stores there), in every dtype and layout, each elementwise
    pass. The values must be bitwise those of plain stores."""
    script = os.path.join(SCRIPTS, "streaming_stores.py")
    results = {}
    for llc in ("1", str(1 << 40)):
        env = repo_env()
        env["BN_EXT_LLC_BYTES"] = llc
        path = tmp_path / f"{llc}.pt"
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env)
        results[llc] = torch.load(path)
    assert len(results["1"]) == len(results[str(1 << 40)]) > 0
    for a, b in zip(results["1"], results[str(1 << 40)]):
        assert torch.equal(a, b)


def test_baseline_and_simd_kernels_agree(tmp_path):
    """The baseline build of the CPU loops (BN_EXT_CPU_ISA=default), the AVX2 one (=avx2, where the
    CPU has it) and the one this CPU picks by itself."""
    script = os.path.join(SCRIPTS, "cpu_kernels.py")
    results = {}
    for isa in ("default", "avx2", None):
        env = repo_env()
        env.pop("BN_EXT_CPU_ISA", None)
        if isa:
            env["BN_EXT_CPU_ISA"] = isa
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env)
        results[isa] = torch.load(path)
    assert results["default"][0] == "default"
    assert results["avx2"][0] in ("default", "avx2")  # a cap, never a raise
    for other in ("avx2", None):
        assert len(results[other]) == len(results["default"]) > 1
        for a, b in zip(results["default"][1:], results[other][1:]):
            tol = 1e-2 if a.dtype in (torch.bfloat16, torch.float16) else 1e-5
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mean_value", [2.0, 1000.0])
def test_channels_last_reductions_streamed_from_memory(dtype, mean_value):
    """Channels-last statistics and gradient sums over tensors too large for cache stream their
    rows (more than 4 MiB read: kStreamedReadBytes), as four streams per block of rows: against the
    float64 reference, C = 84 (16-wide, 8-wide and scalar channels), with a mean near the spread
    and one far from it. The tensors are larger than this machine's L3."""
    n = 60000 if dtype == torch.float32 else 120000
    x = rand((n, 84), "cpu", dtype, mean=mean_value, std=3.0)
    dy = rand((n, 84), "cpu", dtype)
    assert x.numel() * x.element_size() > 16 << 20
    mean, var = ops.batch_norm_stats(x)
    xd, dyd = x.double(), dy.double()
    torch.testing.assert_close(mean.double(), xd.mean(0), rtol=1e-6, atol=1e-6 * mean_value)
    torch.testing.assert_close(var.double(), xd.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, mean)
    tol = dict(rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(sum_dy.double(), dyd.sum(0), **tol)
    torch.testing.assert_close(sum_dy_xmu.double(), (dyd * (xd - mean.double())).sum(0), **tol)


NONFINITE_SHAPES = [
    ((4, 3, 5, 5), None),
    ((4, 3, 5, 5), torch.channels_last),
    ((2, 8, 40, 40), None),
    ((2, 40, 9, 9), torch.channels_last),
    ((64, 24), None),
    ((3, 6, 4, 5, 3), None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "shape, fmt", NONFINITE_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
)
def test_nan_and_inf_reach_outputs_and_running_stats_as_in_torch(shape, fmt, dtype):
    """A NaN anywhere in channel 1, +Inf first in channel 2 (where the shift is sampled), -Inf
    last in channel 0: torch.nn's running_mean gets NaN / +-Inf and running_var NaN in those
    channels, and every output of them is NaN. The others stay finite."""
    x = torch.randn(shape).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    spatial = x.shape[2:]

    def at(n, c, k):  # the k-th value (in NC(D)HW order) of sample n, channel c
        return (n, c) + tuple(divmod_all(k % max(1, x[0, 0].numel()), spatial))

    x[at(1, 1, 3)] = float("nan")
    x[at(0, 2, 0)] = float("inf")
    x[at(-1, 0, -1)] = float("-inf")
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[x.dim()]
    theirs = cls(shape[1]).to(dtype)
    ours = bn_ext.convert_model(copy.deepcopy(theirs))
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(y_ours.isnan(), y_theirs.isnan())
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), f"{name}: {a} vs {b}"
        assert torch.equal(a[:3].nan_to_num(0, 1, -1), b[:3].nan_to_num(0, 1, -1)), name
    torch.testing.assert_close(ours.running_mean[3:], theirs.running_mean[3:], **TOL[dtype])


def divmod_all(k, sizes):
    """The multi-index of flat index k in a tensor of `sizes` (row-major)."""
    index = []
    for size in reversed(sizes):
        k, r = divmod(k, size)
        index.append(r)
    return reversed(index)


def test_values_near_the_float32_maximum_keep_finite_statistics():
    """bfloat16 values near 3e38: torch.nn's float32 sums overflow (running_mean +Inf, output all
    NaN); bn_ext's float64 sums give the finite mean. The variance (about 1e74) is past float32 in
    both, so running_var is +Inf in both."""
    x = (torch.randn(4, 3, 5, 5) * 1e37 + 3e38).bfloat16()
    ours = bn_ext.BatchNorm2d(3).bfloat16()
    ours(x)
    torch.testing.assert_close(ours.running_mean.float(), 0.1 * x.double().mean((0, 2, 3)).float(), rtol=1e-2, atol=0)
    assert torch.isinf(ours.running_var).all()
