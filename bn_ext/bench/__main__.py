"""python -m bn_ext.bench: time bn_ext against PyTorch's BatchNorm on the same inputs, same run.

For every case it first checks that our output matches PyTorch's (a benchmark of a wrong kernel
is worthless), then reports median times, the speed-up, and effective bandwidth counted on the
bytes the operation must move, as a fraction of a plain copy of the same tensor timed alongside.
"""

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import bn_ext

from .allocator import keep_freed_memory
from .cases import suite
from .fused import torch_label

MODES = {
    # name: (bytes moved per element of input, in units of the element size)
    "train_fwd": 2,  # read x, write y
    "train_fwd_bwd": 5,  # forward (read x, write y) + backward (read x and dy, write dx)
    "eval_fwd": 2,  # read x, write y
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The bandwidth target (training forward at 70% of a copy) is for tensors of this size and
# more; on the CPU those cases also time the two-reads reference (two_reads_fns).
BW_TARGET_BYTES = 8e6
TORCH_CLS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
OUR_CLS = {1: bn_ext.BatchNorm1d, 2: bn_ext.BatchNorm2d, 3: bn_ext.BatchNorm3d}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup, min_time=0.0):
    """Median seconds per call of fn, after warm-up. On the GPU each sample is CUDA events
    around a burst of calls (so launch-bound cases are not drowned by synchronisation)."""
    warm(fn, device, warmup)
    if device == "cuda":
        burst = 10
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(burst):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / burst)
        return statistics.median(samples)
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def warm(fn, device, warmup, seconds=None):
    """At least `warmup` calls and `seconds` of them: the first tens of calls on a big tensor pay
    for the allocator taking fresh pages from the OS (page faults), not for the kernel. The GPU's
    caching allocator has no such start-up, so there a few calls do."""
    if seconds is None:
        seconds = 0.02 if device == "cuda" else 0.15
    started = time.perf_counter()
    calls = 0
    while calls < warmup or (time.perf_counter() - started < seconds and calls < 200):
        fn()
        calls += 1
    sync(device)


def interleaved_times(fns, device, repeats, warmup, min_time=0.0):
    """Seconds per call of each of fns, a list of samples each. On the CPU they take turns call by
    call, so that each sees the same machine state: a noisy neighbour slows all of them, not one,
    and each call follows one that read the same input and wrote an output of the same size. The
    callers never put two of bn_ext's calls on the same tensors one after the other: the second
    would find its threads' shares of the input in their own L2s, left there by the first, which
    split the tensor between the threads the same way. On the GPU each is timed by median_time
    (one sample each)."""
    if device == "cuda":
        return [[median_time(fn, device, repeats, warmup, min_time)] for fn in fns]
    for fn in fns:
        warm(fn, device, warmup)
    times = [[] for _ in fns]
    started = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - started < min_time:
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        if len(times[0]) >= 10 * repeats:
            break
    return times


def make_modules(case, dtype, device):
    c = case.shape[1]
    theirs = TORCH_CLS[case.kind](c, device=device)
    ours = OUR_CLS[case.kind](c, device=device)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())  # float32 parameters beside any input dtype (mixed)
    return theirs, ours


def make_input(case, dtype, device):
    x = torch.randn(case.shape, device=device, dtype=dtype)
    fmt = case.memory_format()
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def step_fn(module, x, mode, dy):
    if mode == "train_fwd_bwd":
        xr = x.detach().requires_grad_()

        def run():
            module(xr).backward(dy)
            xr.grad = None

        return run

    def run():
        with torch.no_grad():
            module(x)

    return run


def two_reads_fns(ours, x):
    """A training forward must take the batch statistics before it writes any output. Where a
    channel's data cannot stay in cache from the one pass to the other (channels-last: every row
    holds every channel), it reads x twice. These two calls are such a forward at the speed of a
    plain read of x (x.sum()) followed by our elementwise pass alone (the eval op, read x and
    write y): the reference for a forward that reads x twice."""
    w, b = ours.weight.detach(), ours.bias.detach()
    mean, var = ours.running_mean, ours.running_var
    return [lambda: x.sum(), lambda: torch.ops.bn_ext.batch_norm_elemt(x, w, b, mean, var, ours.eps)]


def check_parity(theirs, ours, x, mode, dtype):
    """Our output (and grad_input for fwd+bwd) against PyTorch's on this case's data."""
    tol = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    xt = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    yt, yo = theirs(xt), ours(xo)
    err = (yt.float() - yo.float()).abs().max().item()
    if mode == "train_fwd_bwd":
        dy = torch.randn_like(yt)
        yt.backward(dy)
        yo.backward(dy)
        scale = xt.grad.float().abs().max().item() or 1.0
        err = max(err, (xt.grad.float() - xo.grad.float()).abs().max().item() / scale)
    theirs.zero_grad()
    ours.zero_grad()
    return err, err <= tol


def torch_backend(device):
    if device != "cuda":
        return "native-cpu"
    return "cudnn" if torch.backends.cudnn.enabled and torch.backends.cudnn.is_available() else "native-cuda"


def git_commit():
    """The checkout's commit; BN_EXT_COMMIT names it where the tree travelled without .git."""
    if os.environ.get("BN_EXT_COMMIT"):
        return os.environ["BN_EXT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The CPU features the kernel builds choose by, as /proc/cpuinfo names them.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def cpu_flags():
    """This CPU's family/model and which of CPU_FLAGS it has (Linux; None elsewhere): the
    "model name" of a virtual machine can be as vague as "AMD EPYC"."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "has": [f for f in CPU_FLAGS if f in flags],
    }


def machine_info(device, allocator):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bn_ext_commit": git_commit(),
        "bn_ext_cpu_kernels": bn_ext.build_info()["cpu_kernels"],
        "bn_ext_cpu_prefetch": bn_ext.build_info()["cpu_prefetch"],
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "allocator": allocator,
    }


def progress(i, total, label):
    width = 30
    done = int(width * i / max(total, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label[:60]:<60}")
    sys.stderr.flush()
    if i == total:
        sys.stderr.write("\n")


def geomean(values):
    values = [v for v in values if v > 0]
    if not values:
        return float("nan")
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp())


def two_reads_case(case, dname, mode, device):
    """Whether a job is one of the bandwidth target's (CPU training forward of 8 MB and more)."""
    return device == "cpu" and mode == "train_fwd" and math.prod(case.shape) * DTYPES[dname].itemsize >= BW_TARGET_BYTES


def on_build(build, fn):
    """fn, run under the CPU kernel build `build` (switched before each call: the builds take turns
    call by call with torch's, as everything interleaved_times times does)."""

    def run():
        bn_ext._C._use_cpu_kernels(build)
        fn()

    return run


def cpu_builds(args):
    """The CPU kernel builds to time: --isa's, "native" resolved to this CPU's best, each once;
    by default the one in use (BN_EXT_CPU_ISA caps it)."""
    in_use = bn_ext.build_info()["cpu_kernels"]
    if args.device != "cpu" or not args.isa:
        return [in_use]
    builds = []
    for name in args.isa.split(","):
        before = bn_ext._C._use_cpu_kernels(name)  # ValueError where this CPU cannot run it
        got = bn_ext.build_info()["cpu_kernels"]
        bn_ext._C._use_cpu_kernels(before)
        if got not in builds:
            builds.append(got)
    return builds


def run(args, builds):
    """Every job's rows, one per CPU kernel build in `builds` (cpu_builds)."""
    device = args.device
    side_by_side = len(builds) > 1  # else the build in use, never switched
    start_build = bn_ext.build_info()["cpu_kernels"]
    cases = [c for c in suite(device) if not args.quick or c.quick]
    if args.shapes:
        cases = [c for c in cases if any(s in c.name for s in args.shapes.split(","))]
    dtypes = args.dtype.split(",")
    modes = args.mode.split(",")
    backends = [True] + ([False] if device == "cuda" and not args.quick else [])
    jobs = [(c, d, m, b) for c in cases for d in dtypes for m in modes for b in backends]
    # Each round times every job; a job's samples from all rounds are pooled before the medians,
    # so that one spell of a noisy neighbour (seconds long, on a shared machine) weighs on one
    # round's share of a case, not on the whole case.
    samples = [None] * len(jobs)
    parity = [None] * len(jobs)
    steps = len(jobs) * args.rounds
    for step in range(steps):
        i = step % len(jobs)
        case, dname, mode, cudnn = jobs[i]
        progress(step, steps, f"round {step // len(jobs) + 1}/{args.rounds} {case.name} {case.layout} {dname} {mode}")
        dtype = DTYPES[dname]
        torch.backends.cudnn.enabled = cudnn
        theirs, ours = make_modules(case, dtype, device)
        x = make_input(case, dtype, device)
        if mode == "eval_fwd":
            theirs.eval()
            ours.eval()
        if parity[i] is None:
            parity[i] = []
            for build in builds:
                if side_by_side:
                    bn_ext._C._use_cpu_kernels(build)
                parity[i].append(check_parity(theirs, ours, x, mode, dtype))
        dy = torch.randn_like(x)
        y = torch.empty_like(x)
        ours_fns = [step_fn(ours, x, mode, dy)]
        if side_by_side:
            ours_fns = [on_build(build, ours_fns[0]) for build in builds]
        theirs_fn, copy_fn = step_fn(theirs, x, mode, dy), (lambda y=y, x=x: y.copy_(x))
        extra = []
        if two_reads_case(case, dname, mode, device):
            extra = [on_build(start_build, fn) if side_by_side else fn for fn in two_reads_fns(ours, x)]
        # Each build takes its turns after torch's call, one build at a time: a build timed right
        # after another on the same tensors finds its thread's share of x in its own L2 (the
        # second of two builds came out 1.17x its speed alone, geomean), which no layer of a
        # network does.
        # times: torch's (pooled), each build's, the copy's (pooled), then the two-reads pair.
        times = [[] for _ in range(len(ours_fns) + 2 + len(extra))]
        for j, fn in enumerate(ours_fns):
            t = interleaved_times(
                [theirs_fn, fn, copy_fn, *(extra if j == 0 else [])], device, args.repeats, args.warmup, args.min_time
            )
            times[0] += t[0]
            times[1 + j] += t[1]
            times[1 + len(ours_fns)] += t[2]
            for e, te in enumerate(t[3:]):
                times[2 + len(ours_fns) + e] += te
        samples[i] = times if samples[i] is None else [a + b for a, b in zip(samples[i], times)]
    progress(steps, steps, "done")
    torch.backends.cudnn.enabled = True
    if side_by_side:
        bn_ext._C._use_cpu_kernels(start_build)
    rows = []
    k = len(builds)
    for (case, dname, mode, cudnn), times, checks in zip(jobs, samples, parity):
        t_theirs, t_copy = statistics.median(times[0]), statistics.median(times[1 + k])
        two_reads = sum(statistics.median(ts) for ts in times[2 + k :]) if len(times) > 2 + k else None
        for build, ts, check in zip(builds, times[1 : 1 + k], checks):
            # the two-reads reference ran the build in use at the start: its rows carry it
            reference = two_reads if build == start_build else None
            times_s = (t_theirs, statistics.median(ts), t_copy, reference)
            rows.append(result_row(case, dname, mode, cudnn, device, build, times_s, check))
    return rows


def result_row(case, dname, mode, cudnn, device, build, times_s, check):
    """One job's row for one CPU kernel build: times (torch, ours, the copy, the two-reads
    reference or None, in seconds), speed-up, bandwidths, and the parity check's (error, ok)."""
    t_theirs, t_ours, t_copy, two_reads = times_s
    err, ok = check
    nbytes = math.prod(case.shape) * DTYPES[dname].itemsize
    bw = MODES[mode] * nbytes / t_ours / 1e9
    copy_bw = 2 * nbytes / t_copy / 1e9
    return {
        "case": case.name,
        "shape": "x".join(map(str, case.shape)),
        "layout": case.layout,
        "dtype": dname,
        "mode": mode,
        "device": device,
        "cpu_kernels": build if device == "cpu" else None,
        "torch_backend": torch_backend(device) if cudnn else "native-cuda",
        "torch_ms": t_theirs * 1e3,
        "bn_ext_ms": t_ours * 1e3,
        "speedup": t_theirs / t_ours,
        "bn_ext_GBps": bw,
        "copy_GBps": copy_bw,
        "bw_fraction_of_copy": bw / copy_bw,
        "tensor_MB": nbytes / 1e6,
        "max_err": err,
        "parity": "ok" if ok else "MISMATCH",
        "two_reads_ms": two_reads * 1e3 if two_reads else None,
        "two_reads_fraction_of_copy": t_copy / two_reads if two_reads else None,
    }


def print_table(rows, info):
    print(
        f"\nbn_ext vs PyTorch on {rows[0]['device'] if rows else '?'}: {info['cpu'] if not info['gpu'] else info['gpu']}, "
        f"{info['threads']} threads, {torch_label(info)}, bn_ext {info['bn_ext_commit']}, malloc {info['allocator']}"
    )
    head = f"{'case':<26} {'layout':<13} {'dtype':<8} {'mode':<13} {'ours':>10} {'torch':>6} {'torch ms':>9} {'ours ms':>9} {'speedup':>8} {'GB/s':>7} {'of copy':>7} parity"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['case']:<26} {r['layout']:<13} {r['dtype']:<8} {r['mode']:<13} {ours_label(r, info):>10} "
            f"{r['torch_backend'][:6]:>6} {r['torch_ms']:9.3f} {r['bn_ext_ms']:9.3f} {r['speedup']:7.2f}x "
            f"{r['bn_ext_GBps']:7.1f} {r['bw_fraction_of_copy']:6.0%} {r['parity']}"
        )
    print("-" * len(head))
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], ours_label(r, info), r["torch_backend"]), []).append(r["speedup"])
    for (mode, dtype, ours, backend), values in sorted(groups.items()):
        print(
            f"geomean speedup {mode:<13} {dtype:<8} {ours:>10} vs {backend:<11}: {geomean(values):.2f}x "
            f"(min {min(values):.2f}x over {len(values)} cases)"
        )
    target = [r for r in rows if r.get("two_reads_fraction_of_copy") is not None]
    if target:
        print(
            f"\ntraining forward from {BW_TARGET_BYTES / 1e6:.0f} MB, bandwidth as a fraction of the copy's (target 70%); "
            "'two reads': x.sum() then our elementwise pass alone, a forward that reads x twice at a plain read's speed"
        )
        for r in target:
            print(
                f"{r['case']:<26} {r['layout']:<13} {r['dtype']:<8} {r['tensor_MB']:5.1f} MB  ours "
                f"{r['bw_fraction_of_copy']:4.0%}  two reads {r['two_reads_fraction_of_copy']:4.0%}"
            )


def ours_label(row, info):
    """Which of our builds a row timed: the CPU kernel build (results from before the column
    existed ran the machine's), or "cuda"."""
    if row["device"] != "cpu":
        return "cuda"
    return row.get("cpu_kernels") or info.get("bn_ext_cpu_kernels", "?")


def render_table(rows, info):
    """The printed table as text, for the .txt beside the results file."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(rows, info)
    return buf.getvalue()


def write_results(rows, info, out_dir, tag):
    """bench-<tag>.json, the results file, and what is rendered from it: .txt (and .png)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"bench-{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "results": rows}, f, indent=1)
    return render_files(rows, info, base)


def render_files(rows, info, base):
    with open(base + ".txt", "w") as f:
        f.write(render_table(rows, info).lstrip("\n"))
    plotted = write_plot(rows, info, base + ".png")
    return f"{base}.json, {base}.txt" + (f" and {base}.png" if plotted else " (no plot: matplotlib is not installed)")


def default_tag(device, info):
    """One results file per device: the CPU kernel build (cpu-avx2, cpu-avx512bf16) or the GPU
    model (cuda-h200)."""
    if device == "cpu":
        builds = info.get("bn_ext_cpu_kernels_timed") or [info["bn_ext_cpu_kernels"]]
        return "cpu-" + "-".join(builds)
    return "cuda-" + (info["gpu"] or "gpu").split()[-1].lower()


def write_plot(rows, info, path):
    """Speed-up and bandwidth fraction per case, one panel each; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [
        f"{r['case']} {r['layout'][:2]} {r['dtype']} {r['mode']}"
        + ("" if r["torch_backend"] != "native-cuda" or r["device"] != "cuda" else " (no cuDNN)")
        for r in rows
    ]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, 0.28 * len(rows)), 10), sharex=True)
    colors = {"train_fwd": "tab:blue", "train_fwd_bwd": "tab:orange", "eval_fwd": "tab:green"}
    xs = range(len(rows))
    ax1.bar(xs, [r["speedup"] for r in rows], color=[colors[r["mode"]] for r in rows])
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("speed-up over PyTorch (x)")
    ax1.set_title(
        f"bn_ext vs PyTorch: {info['gpu'] or info['cpu']}, {info['threads']} threads, {torch_label(info)}, bn_ext {info['bn_ext_commit']}"
    )
    ax2.bar(xs, [r["bw_fraction_of_copy"] for r in rows], color=[colors[r["mode"]] for r in rows])
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_ylabel("bandwidth / copy bandwidth")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, rotation=90, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax1.legend(handles, list(colors), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bn_ext.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a small subset (CI smoke, under a minute)")
    p.add_argument("--shapes", default="", help="comma-separated substrings of case names to keep")
    p.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--mode", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.0, help="time each measurement for at least this many s")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="times to run the whole suite, samples pooled per case (default 3 on the CPU, 1 quick or on GPU)",
    )
    p.add_argument(
        "--isa",
        default=None,
        help="CPU kernel builds to time side by side, comma-separated: default,avx2,avx512bf16,native "
        "(native: the best this CPU runs); default: the build in use",
    )
    p.add_argument("--out", default="benchmarks", help="folder for the results (JSON, with .txt and .png from it)")
    p.add_argument("--tag", default=None, help="results file name tag (default: the CPU kernel build or the GPU model)")
    p.add_argument("--render", metavar="JSON", default=None, help="only render .txt/.png from a results file")
    p.add_argument(
        "--suite",
        default="batchnorm",
        choices=["batchnorm", "fused"],
        help="batchnorm: BatchNorm alone; fused: BatchNorm + activation (+ add) against torch's composite",
    )
    p.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="keep glibc's malloc thresholds (by default freed blocks stay in the heap: bench/allocator.py)",
    )
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        base = os.path.splitext(args.render)[0]
        if saved["results"] and "fused_ms" in saved["results"][0]:  # the fused suite's: a table only
            from .fused import render_fused

            render_fused(saved["results"], saved["machine"], base, geomean)
            print(f"wrote {base}.txt")
            return 0
        print("wrote " + render_files(saved["results"], saved["machine"], base))
        return 0
    allocator = "default" if args.malloc_defaults else (keep_freed_memory() or "default")
    # A filtered run (--shapes, --dtype, --mode) writes bench-<device>-partial.*, so that it never
    # overwrites the results of a whole suite kept in benchmarks/.
    partial = bool(args.shapes) or args.dtype is not None or set(args.mode.split(",")) != set(MODES)
    if args.dtype is None:
        args.dtype = (
            "float32" if args.quick else ("float32,bfloat16" if args.device == "cpu" else "float32,bfloat16,float16")
        )
    if args.rounds is None:
        args.rounds = 3 if args.device == "cpu" and not args.quick else 1
    if args.repeats is None:
        args.repeats = 5 if args.quick else (25 if args.device == "cpu" else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    try:
        builds = cpu_builds(args)
    except ValueError as e:
        p.error(f"--isa: {e}")
    if args.isa and args.suite == "fused":
        p.error("--isa: the fused suite times the build in use only (BN_EXT_CPU_ISA caps it)")
    if args.suite == "fused":
        from .fused import run_fused, write_fused

        rows = run_fused(args, interleaved_times)
        info = machine_info(args.device, allocator)
        tag = args.tag or f"{default_tag(args.device, info)}-fused{'-partial' if partial else ''}"
        base, text = write_fused(rows, info, args.out, tag, geomean)
        print(text + f"wrote {base}.json and {base}.txt")
        return 0 if all(r["parity"] == "ok" for r in rows) else 1
    rows = run(args, builds)
    info = machine_info(args.device, allocator)
    info["bn_ext_cpu_kernels_timed"] = list(dict.fromkeys(r["cpu_kernels"] for r in rows if r["cpu_kernels"]))
    print_table(rows, info)
    tag = args.tag or f"{default_tag(args.device, info)}{'-quick' if args.quick else ''}{'-partial' if partial else ''}"
    print("wrote " + write_results(rows, info, args.out, tag))
    if any(r["parity"] != "ok" for r in rows):
        print("PARITY FAILURES: see the parity column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
