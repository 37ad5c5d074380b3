"""python -m bn_ext.bench.model [--model resnet50] [--layout contiguous|channels_last]
[--compile] [--eval] [--steps 6] [--profile]: a torchvision model's training step (batch 8,
112x112, SGD), or its eval forward, with torch.nn's BatchNorm, with bn_ext's (convert_model) and
with bn_ext.fuse of that, the three taking turns step by step; median ms per step and speed against
torch.nn. --compile runs each through torch.compile (inductor; bn_ext.enable_compile_fusion on);
--profile adds the CPU time per step spent in BatchNorm and activation ops (and its share), and
in adds. Freed blocks stay in glibc's heap as in the main bench (bench/allocator.py;
--malloc-defaults keeps glibc's thresholds)."""

import argparse
import copy
import statistics
import time

import torch

import bn_ext

from .allocator import keep_freed_memory


def _parser():
    p = argparse.ArgumentParser(prog="python -m bn_ext.bench.model", description=__doc__.split(":", 1)[1])
    p.add_argument("--model", default="resnet50", help="a torchvision.models constructor name")
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--eval", action="store_true", help="time the eval forward instead of a training step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--profile", action="store_true", help="report each step's CPU time in BatchNorm + activation")
    p.add_argument("--malloc-defaults", action="store_true", help="keep glibc's malloc thresholds")
    return p


# op names (torch.profiler keys) counted as BatchNorm or activation work, forward and backward;
# adds apart: the residual adds go into the fused layers, but the optimiser's and gradient
# accumulation's are the same op
_BN_ACT_KEYS = ("batch_norm", "bn_ext::", "relu", "threshold_backward", "hardtanh", "silu")
_ADD_KEYS = ("aten::add", "aten::add_")
PROFILED_STEPS = 3


def bn_act_profile(step):
    """(BatchNorm + activation ms, add ms, their share of the CPU time) per call of step(), from
    the profiler's self CPU times over PROFILED_STEPS calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ours = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in _BN_ACT_KEYS))
    adds = sum(e.self_cpu_time_total for e in events if e.key in _ADD_KEYS)
    per_step_ms = 1e-3 / PROFILED_STEPS  # self_cpu_time_total is in microseconds
    return ours * per_step_ms, adds * per_step_ms, ours / total if total else 0.0


def variants(base):
    """The three models timed: base as it is, converted to bn_ext, and fused."""
    return {
        "torch.nn": copy.deepcopy(base),
        "bn_ext": bn_ext.convert_model(copy.deepcopy(base)),
        # converted first: fuse leaves a BatchNorm without an activation after it (ResNet-50's
        # downsample layers) as it was, and torch.nn's there would be timed as bn_ext.fuse's
        "bn_ext.fuse": bn_ext.fuse(bn_ext.convert_model(copy.deepcopy(base))),
    }


def main(argv=None):
    import torchvision

    args = _parser().parse_args(argv)
    allocator = "default" if args.malloc_defaults else (keep_freed_memory() or "default")
    torch.manual_seed(0)
    base = getattr(torchvision.models, args.model)(num_classes=100)
    nets = variants(base)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}
    y = torch.randint(0, 100, (args.batch,))
    opts = {k: torch.optim.SGD(v.parameters(), lr=0.01) for k, v in nets.items()}
    calls = dict(nets)
    if args.compile:
        bn_ext.enable_compile_fusion()
        calls = {k: torch.compile(v) for k, v in nets.items()}
    if args.eval:
        for v in nets.values():
            v.eval()

    def step(k):
        if args.eval:
            with torch.no_grad():
                calls[k](x)
            return
        opts[k].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(calls[k](x), y).backward()
        opts[k].step()

    times = {k: [] for k in nets}
    for k in nets:
        step(k)
        step(k)
    for _ in range(args.steps):
        for k in nets:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch.nn"])
    mode = ("compiled " if args.compile else "eager ") + ("eval" if args.eval else "train")
    print(f"{torch.get_num_threads()} threads, malloc {allocator}")
    for k, v in times.items():
        m = statistics.median(v)
        share = ""
        if args.profile:
            bn_ms, add_ms, frac = bn_act_profile(lambda k=k: step(k))
            share = f"  BN+act {bn_ms:.1f} ms {frac:.1%} of CPU time, adds {add_ms:.1f} ms"
        print(
            f"{args.model:<16} {args.layout:<13} {mode:<14} {k:<12} {m * 1e3:8.1f} ms/step  "
            f"speed vs torch.nn {ref / m:.2f}x{share}"
        )


if __name__ == "__main__":
    main()
