"""Worker processes for tests/test_sync.py: each joins a gloo (or NCCL) process group through a
file store, runs its checks, and raises on a mismatch (torch.multiprocessing.spawn re-raises it
in the test process with the worker's traceback)."""

import datetime
import os
import time

import torch
import torch.distributed as dist

import bn_ext

F64 = dict(rtol=1e-10, atol=1e-11)
F32 = dict(rtol=2e-5, atol=2e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)  # bfloat16 outputs round to 8 bits; PyTorch's and ours may differ by an ulp


def _init(rank, world, store_file, backend="gloo", timeout_s=60):
    torch.set_num_threads(1)  # several processes share this machine's cores
    dist.init_process_group(
        backend,
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _release_group():
    """Destroy the process group once nothing else holds it. DDP's reducer and compiled graphs
    keep references to the group; destroying it under them can leave a thread to be torn down
    at exit ("terminate called without an active exception", SIGABRT), seen with gloo on torch
    2.14. So: the caller drops them first; here compiled code is dropped, garbage collected, the
    ranks lined up, then the group destroyed."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _shared_batch(sizes, shape_tail, channels, dtype, device, memory_format, seed):
    """Every rank's batch (the same on every rank, from one seed), and the dy for each."""
    g = torch.Generator().manual_seed(seed)
    xs, dys = [], []
    for n in sizes:
        x = torch.randn((n, channels, *shape_tail), generator=g, dtype=torch.float64) * 2.5 + 3.0
        dy = torch.randn((n, channels, *shape_tail), generator=g, dtype=torch.float64)
        xs.append(x.to(dtype).to(device).contiguous(memory_format=memory_format))
        dys.append(dy.to(dtype).to(device).contiguous(memory_format=memory_format))
    return xs, dys


def _all_equal_across_ranks(t, what):
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise AssertionError(f"{what} differs between rank 0 and rank {r}: {gathered[0]} vs {other}")


def _check_close(actual, expected, tol, what):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


CASES = [
    # (name, shape after (N, C), memory format, module kwargs)
    ("1d (N, C)", (), torch.contiguous_format, {}),
    ("1d (N, C, L)", (9,), torch.contiguous_format, {}),
    ("2d", (5, 6), torch.contiguous_format, {}),
    ("2d channels_last", (5, 6), torch.channels_last, {}),
    ("3d", (3, 4, 5), torch.contiguous_format, {}),
    ("3d channels_last_3d", (3, 4, 5), torch.channels_last_3d, {}),
    ("2d momentum=None", (5, 3), torch.contiguous_format, {"momentum": None}),
    ("2d affine=False", (4, 3), torch.contiguous_format, {"affine": False}),
    ("1d no running stats", (7,), torch.contiguous_format, {"track_running_stats": False}),
]


def parity(rank, world, store_file, sizes, dtypes, device="cpu", backend="gloo"):
    """Outputs, grads and running stats of bn_ext.SyncBatchNorm on uneven per-rank batches equal
    those of torch.nn.BatchNorm (and bn_ext's own) over the concatenated batch."""
    _init(rank, world, store_file, backend)
    if device == "cuda":
        torch.cuda.set_device(rank)
    channels = 5
    for dtype in dtypes:
        tol = {torch.float64: F64, torch.float32: F32, torch.bfloat16: BF16}[dtype]
        for case, (name, tail, fmt, kwargs) in enumerate(CASES):
            what = f"[rank {rank}, {dtype}, {name}, sizes {sizes}]"
            dims = max(len(tail), 1)
            ref = getattr(torch.nn, f"BatchNorm{dims}d")(channels, device=device, dtype=dtype, **kwargs)
            ours_plain = getattr(bn_ext, f"BatchNorm{dims}d")(channels, device=device, dtype=dtype, **kwargs)
            sync = bn_ext.SyncBatchNorm(channels, device=device, dtype=dtype, **kwargs)
            if ref.affine:
                with torch.no_grad():
                    ref.weight.uniform_(0.5, 1.5, generator=torch.Generator(device).manual_seed(case))
                    ref.bias.normal_(generator=torch.Generator(device).manual_seed(case + 100))
            ours_plain.load_state_dict(ref.state_dict())
            sync.load_state_dict(ref.state_dict())
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            for step in range(2):  # two steps: the running stats move twice (momentum None averages)
                xs, dys = _shared_batch(sizes, tail, channels, dtype, device, fmt, seed=1000 * case + step)
                x_full = torch.cat(xs).contiguous(memory_format=fmt).requires_grad_()
                dy_full = torch.cat(dys).contiguous(memory_format=fmt)
                y_ref = ref(x_full)
                y_ref.backward(dy_full)
                x_plain = x_full.detach().clone().requires_grad_()
                y_plain = ours_plain(x_plain)
                y_plain.backward(dy_full)

                x = xs[rank].clone().requires_grad_()
                y = sync(x)
                y.backward(dys[rank])
                _check_close(y, y_ref.detach()[lo:hi], tol, f"{what} step {step} output")
                _check_close(x.grad, x_full.grad[lo:hi], tol, f"{what} step {step} input grad")
                _check_close(y, y_plain.detach()[lo:hi], tol, f"{what} step {step} output vs bn_ext.BatchNorm")
                if sync.affine:
                    # sums of hundreds of O(1) products: in float32 both sides carry ~1e-5 of rounding
                    grad_tol = {torch.float64: F64, torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(
                        dtype, dict(rtol=5e-2, atol=0.5)
                    )
                    for p_name in ("weight", "bias"):
                        # each rank holds its own part, as with torch.nn.SyncBatchNorm (DDP sums them)
                        g = getattr(sync, p_name).grad.clone()
                        dist.all_reduce(g)
                        _check_close(g, getattr(ref, p_name).grad, grad_tol, f"{what} step {step} {p_name} grad")
                        getattr(sync, p_name).grad = None
                        getattr(ref, p_name).grad = None
                        getattr(ours_plain, p_name).grad = None
                if sync.track_running_stats:
                    for b_name in ("running_mean", "running_var"):
                        buf = getattr(sync, b_name)
                        _check_close(buf, getattr(ref, b_name), tol, f"{what} step {step} {b_name}")
                        _all_equal_across_ranks(buf, f"{what} {b_name}")
                    assert sync.num_batches_tracked.item() == step + 1, what
            sync.eval()  # eval: the running stats, no collective
            x_eval = _shared_batch(sizes, tail, channels, dtype, device, fmt, seed=7)[0][rank]
            ref.eval()
            y_eval_ref = ref(x_eval)
            _check_close(sync(x_eval), y_eval_ref, tol, f"{what} eval output")
    dist.destroy_process_group()


ACT_CASES = [
    # (activation, negative_slope, shape after (N, C), memory format, with a residual)
    ("relu", 0.01, (5, 6), torch.contiguous_format, True),
    ("relu", 0.01, (5, 6), torch.channels_last, False),
    ("relu6", 0.01, (7,), torch.contiguous_format, True),
    ("leaky_relu", 0.2, (3, 4, 5), torch.channels_last_3d, True),
    ("silu", 0.01, (), torch.contiguous_format, True),
    ("identity", 0.01, (4, 3), torch.contiguous_format, True),
]


def _torch_act(z, activation, negative_slope):
    F = torch.nn.functional
    return {
        "relu": F.relu,
        "relu6": F.relu6,
        "leaky_relu": lambda t: F.leaky_relu(t, negative_slope),
        "silu": F.silu,
        "identity": lambda t: t,
    }[activation](z)


def parity_act(rank, world, store_file, sizes, dtypes):
    """bn_ext.SyncBatchNorm with a fused activation (and residual) on uneven per-rank batches
    equals torch.nn.BatchNorm, the add and torch's activation over the concatenated batch:
    output, input/residual/parameter gradients, running stats."""
    _init(rank, world, store_file)
    channels = 4
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for dtype in dtypes:
        tol = {torch.float64: F64, torch.float32: F32}[dtype]
        for case, (activation, slope, tail, fmt, with_res) in enumerate(ACT_CASES):
            what = f"[rank {rank}, {dtype}, {activation}, {tail}, residual={with_res}, sizes {sizes}]"
            ref = getattr(torch.nn, f"BatchNorm{max(len(tail), 1)}d")(channels, dtype=dtype)
            with torch.no_grad():
                ref.weight.uniform_(-1.5, 1.5, generator=torch.Generator().manual_seed(case))
                ref.bias.normal_(generator=torch.Generator().manual_seed(case + 100))
            sync = bn_ext.SyncBatchNorm(channels, dtype=dtype, activation=activation, negative_slope=slope)
            sync.load_state_dict(ref.state_dict())
            xs, dys = _shared_batch(sizes, tail, channels, dtype, "cpu", fmt, seed=500 + case)
            rs, _ = _shared_batch(sizes, tail, channels, dtype, "cpu", fmt, seed=900 + case)
            x_full = torch.cat(xs).contiguous(memory_format=fmt).requires_grad_()
            r_full = (torch.cat(rs) - 3.0).contiguous(memory_format=fmt).requires_grad_()
            z = ref(x_full)
            y_ref = _torch_act(z + r_full if with_res else z, activation, slope)
            y_ref.backward(torch.cat(dys).contiguous(memory_format=fmt))

            x = xs[rank].clone().requires_grad_()
            r = (rs[rank] - 3.0).requires_grad_()
            y = sync(x, r) if with_res else sync(x)
            y.backward(dys[rank])
            _check_close(y, y_ref.detach()[lo:hi], tol, f"{what} output")
            _check_close(x.grad, x_full.grad[lo:hi], tol, f"{what} input grad")
            if with_res:
                _check_close(r.grad, r_full.grad[lo:hi], tol, f"{what} residual grad")
            grad_tol = {torch.float64: F64, torch.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]
            for p_name in ("weight", "bias"):
                g = getattr(sync, p_name).grad.clone()
                dist.all_reduce(g)
                _check_close(g, getattr(ref, p_name).grad, grad_tol, f"{what} {p_name} grad")
            for b_name in ("running_mean", "running_var"):
                _check_close(getattr(sync, b_name), getattr(ref, b_name), tol, f"{what} {b_name}")
            sync.eval()
            ref.eval()
            x_eval = xs[rank].detach()
            expected = _torch_act(ref(x_eval) + r.detach() if with_res else ref(x_eval), activation, slope)
            _check_close(sync(x_eval, r.detach()) if with_res else sync(x_eval), expected, tol, f"{what} eval output")
    dist.destroy_process_group()


def subgroup(rank, world, store_file):
    """A process_group of ranks 0 and 2 out of 3: those two synchronise, rank 1 stays alone."""
    _init(rank, world, store_file)
    members = [0, 2]
    group = dist.new_group(members)
    alone = dist.new_group([1])  # every rank takes part in creating every group
    sizes = {0: 3, 1: 4, 2: 6}
    xs, _ = _shared_batch(
        [sizes[r] for r in range(world)], (4,), 3, torch.float64, "cpu", torch.contiguous_format, seed=3
    )
    sync = bn_ext.SyncBatchNorm(3, dtype=torch.float64, process_group=group if rank in members else alone)
    y = sync(xs[rank])
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    if rank in members:
        full = torch.cat([xs[r] for r in members])
        lo = 0 if rank == 0 else sizes[0]
        expected = ref(full)[lo : lo + sizes[rank]]
    else:
        expected = ref(xs[rank])
    _check_close(y, expected, F64, f"rank {rank} output")
    _check_close(sync.running_var, ref.running_var, F64, f"rank {rank} running_var")
    dist.destroy_process_group()


def world_of_one(rank, world, store_file):
    """An initialised group of one runs no collective: the same as bn_ext.BatchNorm2d."""
    _init(rank, world, store_file)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    sync = bn_ext.SyncBatchNorm(3, dtype=torch.float64)
    plain = bn_ext.BatchNorm2d(3, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)
    dist.destroy_process_group()


def _conv_net(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).to(dtype)


def _train(model, batches, targets, steps, loss_scale):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(steps):
        opt.zero_grad()
        out = model(batches[step])
        loss = torch.nn.functional.mse_loss(out, targets[step], reduction="sum") * loss_scale
        loss.backward()
        opt.step()
    return model


def ddp_training(rank, world, store_file, sizes, steps=3):
    """DDP over a conv net converted with convert_sync_batchnorm: after `steps` SGD steps on uneven
    per-rank batches, every parameter and buffer equals single-process training on the whole batch."""
    _init(rank, world, store_file)
    dtype = torch.float64
    g = torch.Generator().manual_seed(5)
    full_x = [torch.randn(sum(sizes), 3, 6, 6, generator=g, dtype=dtype) for _ in range(steps)]
    full_t = [torch.randn(sum(sizes), 2, generator=g, dtype=dtype) for _ in range(steps)]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])

    single = _train(bn_ext.convert_model(_conv_net(dtype)), full_x, full_t, steps, 1.0 / sum(sizes))

    model = bn_ext.SyncBatchNorm.convert_sync_batchnorm(_conv_net(dtype))
    assert sum(isinstance(m, bn_ext.SyncBatchNorm) for m in model.modules()) == 2
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    # DDP averages gradients over ranks: scale each rank's summed loss so the average is the
    # gradient of the whole batch's mean loss.
    _train(ddp, [x[lo:hi] for x in full_x], [t[lo:hi] for t in full_t], steps, world / sum(sizes))

    for (name, a), b in zip(model.state_dict().items(), single.state_dict().values()):
        if a.is_floating_point():
            _check_close(a, b, dict(rtol=1e-9, atol=1e-10), f"rank {rank} {name} after {steps} steps")
        else:
            assert torch.equal(a, b), name
    del ddp, model
    _release_group()


def compiled(rank, world, store_file, sizes, backend="aot_eager"):
    """torch.compile(fullgraph=True) of a SyncBatchNorm training step: the functional collectives
    trace into the graph, and the result equals eager."""
    _init(rank, world, store_file)
    dtype = torch.float64
    xs, dys = _shared_batch(sizes, (4, 3), 4, dtype, "cpu", torch.channels_last, seed=11)
    eager = bn_ext.SyncBatchNorm(4, dtype=dtype, momentum=None)
    comp = bn_ext.SyncBatchNorm(4, dtype=dtype, momentum=None)
    comp.load_state_dict(eager.state_dict())

    def step(module, x, dy):
        x = x.clone().requires_grad_()
        y = module(x)
        y.backward(dy)
        return y.detach(), x.grad

    comp_fn = torch.compile(comp, fullgraph=True, backend=backend)
    for _ in range(2):
        y_e, g_e = step(eager, xs[rank], dys[rank])
        y_c, g_c = step(comp_fn, xs[rank], dys[rank])
        _check_close(y_c, y_e, F64, f"rank {rank} compiled output")
        _check_close(g_c, g_e, F64, f"rank {rank} compiled input grad")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(comp, name), getattr(eager, name), **F64)
    del comp_fn, comp
    _release_group()


def mismatched_features(rank, world, store_file):
    """Ranks built with different num_features: every rank raises a clear error, none hangs."""
    _init(rank, world, store_file, timeout_s=20)
    channels = 4 + rank
    sync = bn_ext.SyncBatchNorm(channels)
    running_before = sync.running_mean.clone()
    try:
        sync(torch.randn(3, channels, 5))
    except RuntimeError as e:
        assert "num_features differs across the ranks" in str(e), str(e)
        assert "[4, 5]" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: mismatched num_features went undetected")
    assert torch.equal(sync.running_mean, running_before) and sync.num_batches_tracked.item() == 0
    dist.destroy_process_group()


def one_value_per_channel(rank, world, store_file):
    """The group holds one value per channel in all (N=1 at 1x1 on rank 0, N=0 on rank 1): every
    rank raises torch.nn's error, and no buffer or counter moves."""
    _init(rank, world, store_file, timeout_s=20)
    sync = bn_ext.SyncBatchNorm(3)
    before = [t.clone() for t in sync.buffers()]
    try:
        sync(torch.randn(1 - rank, 3, 1, 1))
    except ValueError as e:
        assert "Expected more than 1 value per channel" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: one value per channel across the group went undetected")
    for t, b in zip(sync.buffers(), before):
        assert torch.equal(t, b), f"rank {rank}: a buffer moved"
    sync(torch.randn(1, 3, 1, 2))  # two values in all: trains, and every rank agrees
    assert sync.num_batches_tracked.item() == 1 and torch.isfinite(sync.running_var).all()
    dist.destroy_process_group()


def rank_raises(rank, world, store_file, timeout_s):
    """Rank 1 raises before the second step's collective (bad input) and stays alive; rank 0 gets
    a clear error within the process group's timeout instead of hanging, with its state untouched."""
    _init(rank, world, store_file, timeout_s=timeout_s)
    sync = bn_ext.SyncBatchNorm(3)
    sync(torch.randn(4, 3, 5))  # a first step every rank completes
    if rank == 1:
        try:
            sync(torch.randn(4, 5, 6))  # 5 channels for a 3-channel layer: raises in the argument checks
        except RuntimeError:
            pass
        time.sleep(timeout_s + 5)  # stay in the group while rank 0 waits
        return
    running_before = sync.running_var.clone()
    started = time.monotonic()
    try:
        sync(torch.randn(4, 3, 5))
    except RuntimeError as e:
        elapsed = time.monotonic() - started
        assert "bn_ext.SyncBatchNorm: the all-gather of batch statistics across 2 ranks failed" in str(e), str(e)
        assert elapsed < timeout_s + 15, f"took {elapsed:.1f} s against a {timeout_s} s timeout"
    else:
        raise AssertionError("rank 0 returned from a collective rank 1 never joined")
    assert torch.equal(sync.running_var, running_before) and sync.num_batches_tracked.item() == 1
    os._exit(0)  # the group is broken: skip destroy_process_group's barrier-like teardown
