"""bn_ext.SyncBatchNorm: several processes spawned here on gloo (CPU), NCCL where GPUs allow;
checks against torch.nn / bn_ext BatchNorm over the concatenated batch, and the single-process
behaviour (state_dicts, conversion, eval, no torch.distributed)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bn_ext
import sync_workers
from conftest import CUDA, DEVICES, repo_env

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def spawn(worker, world, tmp_path, *args):
    store = tmp_path / "store"
    mp.spawn(worker, args=(world, str(store), *args), nprocs=world, join=True)


# ---- multi-process ----------------------------------------------------------------------------


@requires_gloo
@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([3, 6], id="2 ranks, N=3,6"),
        pytest.param([1, 4, 7], id="3 ranks, N=1,4,7"),
        pytest.param([0, 5, 2], id="3 ranks, N=0,5,2"),
    ],
)
def test_matches_single_process_over_whole_batch(tmp_path, sizes):
    spawn(sync_workers.parity, len(sizes), tmp_path, sizes, [torch.float64, torch.float32])


@requires_gloo
def test_matches_single_process_bfloat16(tmp_path):
    spawn(sync_workers.parity, 2, tmp_path, [5, 2], [torch.bfloat16])


@requires_gloo
@pytest.mark.parametrize(
    "sizes", [pytest.param([3, 6], id="2 ranks, N=3,6"), pytest.param([0, 5, 2], id="3 ranks, N=0,5,2")]
)
def test_fused_activation_matches_single_process(tmp_path, sizes):
    spawn(sync_workers.parity_act, len(sizes), tmp_path, sizes, [torch.float64, torch.float32])


@requires_gloo
def test_process_group_subset(tmp_path):
    spawn(sync_workers.subgroup, 3, tmp_path)


@requires_gloo
def test_world_of_one_is_plain_batch_norm(tmp_path):
    spawn(sync_workers.world_of_one, 1, tmp_path)


@requires_gloo
def test_ddp_training_matches_single_process(tmp_path):
    spawn(sync_workers.ddp_training, 2, tmp_path, [2, 5])


@requires_gloo
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(tmp_path, backend):
    spawn(sync_workers.compiled, 2, tmp_path, [3, 5], backend)


@requires_gloo
def test_one_value_per_channel_across_the_group_raises_on_every_rank(tmp_path):
    spawn(sync_workers.one_value_per_channel, 2, tmp_path)


@requires_gloo
def test_mismatched_num_features_raises_on_every_rank(tmp_path):
    spawn(sync_workers.mismatched_features, 2, tmp_path)


@requires_gloo
def test_rank_that_raises_makes_the_others_fail_not_hang(tmp_path):
    spawn(sync_workers.rank_raises, 2, tmp_path, 4)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="NCCL across processes needs two GPUs")
@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="NCCL is not available")
def test_nccl_matches_single_process(tmp_path):
    spawn(sync_workers.parity, 2, tmp_path, [3, 6], [torch.float32, torch.float64], "cuda", "nccl")


# ---- single process ---------------------------------------------------------------------------


def test_constructor_and_state_dict_both_ways():
    theirs = torch.nn.SyncBatchNorm(6, eps=1e-3, momentum=0.2)
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.bias.normal_()
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.5, 2)
        theirs.num_batches_tracked.fill_(7)
    ours = bn_ext.SyncBatchNorm(6, eps=1e-3, momentum=0.2)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.SyncBatchNorm(6, eps=1e-3, momentum=0.2)
    back.load_state_dict(ours.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert bn_ext.SyncBatchNorm(4, bias=False).bias is None
    assert bn_ext.SyncBatchNorm(4, process_group="g").process_group == "g"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 9), (3, 4, 5, 6), (2, 4, 3, 4, 5)])
def test_without_torch_distributed_is_plain_batch_norm(device, shape):
    """No initialised process group (this test process has none): a local BatchNorm, on CPU too
    (torch.nn.SyncBatchNorm refuses CPU tensors)."""
    assert not (dist.is_available() and dist.is_initialized())
    x = torch.randn(shape, device=device, dtype=torch.float64) * 2 + 1
    ref = getattr(torch.nn, f"BatchNorm{max(len(shape) - 2, 1)}d")(4, device=device, dtype=torch.float64)
    ours = bn_ext.SyncBatchNorm(4, device=device, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=0)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-11)


def test_input_errors():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn_ext.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(RuntimeError, match="expected 3 channels"):
        bn_ext.SyncBatchNorm(3)(torch.randn(4, 5, 2))


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.BatchNorm1d(4, momentum=None), bn_ext.BatchNorm3d(4, affine=False)),
        torch.nn.SyncBatchNorm(4, eps=1e-3),
    )


def test_convert_sync_batchnorm_keeps_parameters_and_buffers():
    model = _model()
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    converted = bn_ext.SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 4 and all(type(m) is bn_ext.SyncBatchNorm for m in norms)
    assert all(m.process_group == "group" for m in norms)
    assert norms[1].momentum is None and norms[2].affine is False and norms[3].eps == 1e-3
    after = dict(list(converted.named_parameters()) + list(converted.named_buffers()))
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)  # the same objects: optimisers keep tracking them

    single = bn_ext.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3).eval())
    assert type(single) is bn_ext.SyncBatchNorm and not single.training
    with pytest.raises(ValueError, match="has not seen an input"):
        bn_ext.SyncBatchNorm.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d())


def test_convert_model_to_sync_and_back():
    model = bn_ext.convert_model(_model(), to="sync")
    assert sum(type(m) is bn_ext.SyncBatchNorm for m in model.modules()) == 4
    back = bn_ext.convert_model(model, to="torch")
    assert sum(type(m) is torch.nn.SyncBatchNorm for m in back.modules()) == 4
    again = bn_ext.convert_model(back, to="bn_ext")
    assert sum(type(m) is bn_ext.SyncBatchNorm for m in again.modules()) == 4
    with pytest.raises(ValueError, match="'bn_ext', 'torch' or 'sync'"):
        bn_ext.convert_model(model, to="nccl")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
def test_fused_activation_without_torch_distributed_is_batch_norm_act(activation):
    x = torch.randn(6, 4, 5, 3, dtype=torch.float64)
    res = torch.randn(6, 4, 5, 3, dtype=torch.float64)
    ref = bn_ext.BatchNormAct2d(4, dtype=torch.float64, activation=activation, negative_slope=0.3)
    ours = bn_ext.SyncBatchNorm(4, dtype=torch.float64, activation=activation, negative_slope=0.3)
    assert f"activation='{activation}'" in repr(ours) and "activation" not in repr(bn_ext.SyncBatchNorm(4))
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        getattr(ours, mode)()
        assert torch.equal(ours(x, res), ref(x, res)), mode
        assert torch.equal(ours(x), ref(x)), mode
    assert torch.equal(ours.running_var, ref.running_var)
    with pytest.raises(ValueError, match="expected one of"):
        bn_ext.SyncBatchNorm(4, activation="gelu")


def test_convert_keeps_the_fused_activation():
    model = torch.nn.Sequential(
        bn_ext.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2), bn_ext.BatchNorm2d(4)
    )
    sync = bn_ext.convert_model(model, to="sync")
    assert type(sync[0]) is bn_ext.SyncBatchNorm and type(sync[1]) is bn_ext.SyncBatchNorm
    assert (sync[0].activation, sync[0].negative_slope) == ("leaky_relu", 0.2) and sync[1].activation == "identity"
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(sync[0](x), torch.nn.functional.leaky_relu(torch.nn.BatchNorm2d(4)(x), 0.2))
    with pytest.warns(UserWarning, match=r"left 1 BatchNorm layer.*0 \(bn_ext.modules.SyncBatchNorm\)"):
        back = bn_ext.convert_model(sync, to="torch")
    assert type(back[0]) is bn_ext.SyncBatchNorm and type(back[1]) is torch.nn.SyncBatchNorm


def test_fuse_gives_sync_batch_norm_the_activation():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = torch.nn.SyncBatchNorm(4)
            self.bn2 = bn_ext.SyncBatchNorm(4, process_group="g")

        def forward(self, x):
            out = torch.relu(self.bn1(x))
            out = self.bn2(out)
            out += x
            return torch.nn.functional.silu(out)

    x = torch.randn(3, 4, 5, 5)
    expected = Block()(x)
    fused = bn_ext.fuse(Block())
    assert fused.bn_ext_fused == 2
    assert type(fused.bn1) is bn_ext.SyncBatchNorm and fused.bn1.activation == "relu"
    assert fused.bn2.activation == "silu" and fused.bn2.process_group == "g"
    torch.testing.assert_close(fused(x), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
def test_gather_stats_merges_rows_exactly(device, stats_dtype):
    """batch_norm_gather_stats against a float64 reference over the concatenated batch, with an
    empty rank, and its running-stat update against batch_norm_update_running_stats."""
    sizes = [4, 0, 9, 1]
    xs = [torch.randn(n, 3, 5, dtype=torch.float64, device=device) * 3 + 1e3 for n in sizes]
    rows = []
    for x in xs:
        mean, var = bn_ext.ops.batch_norm_stats(x, torch.float64)
        rows.append(torch.cat([mean.new_full((1,), x.numel() // 3), mean, var]))
    table = torch.stack(rows).to(stats_dtype)
    rm, rv, nbt = (
        torch.zeros(3, device=device),
        torch.ones(3, device=device),
        torch.zeros((), dtype=torch.long, device=device),
    )
    mean, var, count = bn_ext.ops.batch_norm_gather_stats(table, rm, rv, nbt, None)
    full = torch.cat(xs)
    ref_mean = full.mean((0, 2))
    ref_var = full.var((0, 2), unbiased=False)
    tol = dict(rtol=1e-12, atol=1e-9) if stats_dtype == torch.float64 else dict(rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(mean.double(), ref_mean, **tol)
    torch.testing.assert_close(var.double(), ref_var, **tol)
    assert count.item() == full.numel() // 3 and mean.dtype == stats_dtype
    erm, erv, enbt = (
        torch.zeros(3, device=device),
        torch.ones(3, device=device),
        torch.zeros((), dtype=torch.long, device=device),
    )
    bn_ext.ops.batch_norm_update_running_stats(erm, erv, enbt, mean, var, None, full.numel() // 3)
    torch.testing.assert_close(rm, erm, rtol=0, atol=0)
    torch.testing.assert_close(rv, erv, rtol=0, atol=0)
    assert nbt.item() == enbt.item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_gather_stats_all_empty_counts_the_batch_only(device):
    table = torch.zeros(2, 7, dtype=torch.float64, device=device)
    rm, rv = torch.full((3,), 0.5, device=device), torch.full((3,), 2.0, device=device)
    nbt = torch.tensor(4, device=device)
    mean, var, count = bn_ext.ops.batch_norm_gather_stats(table, rm, rv, nbt, 0.1)
    assert count.item() == 0 and nbt.item() == 5
    assert torch.equal(rm, torch.full((3,), 0.5, device=device)) and torch.equal(
        rv, torch.full((3,), 2.0, device=device)
    )


def test_gather_stats_errors_leave_state_alone():
    nbt = torch.tensor(3)
    rm = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"stats: expected a 2-D tensor with a row per rank of 2 \* C \+ 1"):
        bn_ext.ops.batch_norm_gather_stats(torch.zeros(2, 8, dtype=torch.float64), None, None, nbt, 0.1)
    with pytest.raises(RuntimeError, match="running_mean: expected a 1-D tensor of 3 elements"):
        bn_ext.ops.batch_norm_gather_stats(torch.zeros(2, 7, dtype=torch.float64), rm, None, nbt, 0.1)
    with pytest.raises(RuntimeError, match="momentum: None"):
        bn_ext.ops.batch_norm_gather_stats(torch.zeros(2, 7, dtype=torch.float64), None, None, None, None)
    assert nbt.item() == 3 and torch.equal(rm, torch.zeros(4))


def test_stats_dtype_argument():
    x = torch.randn(5, 3, 4) + 1e4
    m32, v32 = bn_ext.ops.batch_norm_stats(x)
    m64, v64 = bn_ext.ops.batch_norm_stats(x, torch.float64)
    assert m32.dtype == torch.float32 and m64.dtype == torch.float64
    torch.testing.assert_close(m64, x.double().mean((0, 2)), rtol=1e-13, atol=0)
    assert torch.equal(m64.float(), m32) and torch.equal(v64.float(), v32)
    with pytest.raises(RuntimeError, match=r"dtype: expected None \(the default statistics dtype\) or float64"):
        bn_ext.ops.batch_norm_stats(x, torch.float16)


@requires_gloo
def test_readme_launch_example_runs_under_torchrun():
    """The README's example, launched as the README says (torchrun, two CPU processes)."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "sync_batch_norm.py")
    env = dict(repo_env(), CUDA_VISIBLE_DEVICES="")  # CPU and gloo, whatever this machine has
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", example],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step 2: loss" in run.stdout and "running stats identical on all 2 ranks: True" in run.stdout, run.stdout
