"""Before/after timing of the CPU ops, for a change to the kernels:

    python -m bn_ext.bench.ops save A.json     # with one build of bn_ext, then B.json with the other
    python -m bn_ext.bench.ops compare A.json B.json [C.json D.json ...]

Each op's time is taken relative to torch's eval batch_norm on the same tensor (a read and a
write), the two called in turn, so a slower or faster spell of a shared machine moves both: the
ratio holds where absolute times drift by 30% from one process to the next. Save from
alternating processes of the two trees (A, B, A, B, ...; e.g. a git worktree of the commit before,
built), each started outside both trees with PYTHONPATH=<tree>: `python -m` puts the working
directory first on the path. compare takes the median per op of the files given for each side
(odd positions: before, even: after). Freed blocks stay in glibc's heap as in the main bench
(bench/allocator.py), so that no op's time includes page-faulting its output in."""

import argparse
import json
import statistics
import sys
import time

import torch

import bn_ext  # noqa: F401  (registers the ops)

from .allocator import keep_freed_memory

CASES = [
    ("resnet50.bn1", (4, 64, 112, 112), None),
    ("resnet50.layer2", (4, 512, 28, 28), None),
    ("many_channels.c2048x7x7", (4, 2048, 7, 7), None),
    ("unet3d.block", (2, 32, 32, 32, 32), None),
    ("resnet50.bn1", (4, 64, 112, 112), torch.channels_last),
    ("bn1d.4096x1024", (4096, 1024), None),
]


def op_fns(x):
    """Our ops on x (training forward, eval forward, training backward) and the reference call."""
    ops = torch.ops.bn_ext
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    mean, var = ops.batch_norm_stats(x)
    dy = torch.randn_like(x)
    fns = {
        "train": lambda: ops.batch_norm_train(x, w, b, 1e-5),
        "elemt": lambda: ops.batch_norm_elemt(x, w, b, mean, var, 1e-5),
        "backward": lambda: ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True]),
    }
    return fns, lambda: torch.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5, False)


def fused_op_fns(x):
    """As op_fns, for the fused ops: BN + add + ReLU and BN + SiLU, training forward and backward."""
    ops = torch.ops.bn_ext
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    r, dy = torch.randn_like(x), torch.randn_like(x)
    _, mean, var = ops.batch_norm_act_train(x, w, b, None, None, None, None, 0.1, 1e-5, "identity", 0.0)
    mask = [True] * 4
    fns = {
        "act_train add+relu": lambda: ops.batch_norm_act_train(x, w, b, r, None, None, None, 0.1, 1e-5, "relu", 0.0),
        "act_train silu": lambda: ops.batch_norm_act_train(x, w, b, None, None, None, None, 0.1, 1e-5, "silu", 0.0),
        "act_backward add+relu": lambda: ops.batch_norm_act_backward(
            dy, x, w, b, r, mean, var, 1e-5, True, "relu", 0.0, mask
        ),
        "act_backward silu": lambda: ops.batch_norm_act_backward(
            dy, x, w, b, None, mean, var, 1e-5, True, "silu", 0.0, mask
        ),
    }
    return fns, lambda: torch.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5, False)


def relative_times(repeats, fused=False):
    """{"case layout dtype op": op time / torch eval time}."""
    torch.manual_seed(0)
    out = {}
    for name, shape, fmt in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            fns, reference = (fused_op_fns if fused else op_fns)(x)
            layout = "channels_last" if fmt is not None else "contiguous"
            for op, fn in fns.items():
                for _ in range(5):
                    fn()
                    reference()
                ours, theirs = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    t1 = time.perf_counter()
                    reference()
                    theirs.append(time.perf_counter() - t1)
                    ours.append(t1 - t0)
                out[f"{name} {layout} {str(dtype)[6:]} {op}"] = statistics.median(ours) / statistics.median(theirs)
    return out


def compare(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    before, after = runs[0::2], runs[1::2]
    print(f"{'case':<60} {'before':>7} {'after':>7} {'after/before':>12}")
    for key in before[0]:
        b = statistics.median(r[key] for r in before)
        a = statistics.median(r[key] for r in after)
        print(f"{key:<60} {b:7.2f} {a:7.2f} {a / b:11.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bn_ext.bench.ops", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="time the ops of the bn_ext this Python imports")
    save.add_argument("path")
    save.add_argument("--repeats", type=int, default=60)
    save.add_argument("--fused", action="store_true", help="the fused BatchNorm + activation ops instead")
    cmp = sub.add_parser("compare", help="before/after medians of saved files, given alternately")
    cmp.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    if args.command == "save":
        keep_freed_memory()
        with open(args.path, "w") as f:
            json.dump(relative_times(args.repeats, args.fused), f, indent=1)
        return 0
    if len(args.paths) < 2 or len(args.paths) % 2:
        p.error("compare: give the files in before/after pairs")
    compare(args.paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
