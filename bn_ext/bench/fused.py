"""The fused suite (python -m bn_ext.bench --suite fused): BatchNorm + activation (+ residual
add) as bn_ext's BatchNormAct layer, against torch.nn's BatchNorm followed by the same add and
activation, and against bn_ext's unfused BatchNorm with torch's add and activation; same inputs,
calls taking turns, one run."""

import json
import os
import statistics

import torch
import torch.nn.functional as F

import bn_ext

from .cases import Case

ACT = {"relu": F.relu, "silu": F.silu, "relu6": F.relu6}


def fused_suite(device):
    """(case, activation, residual): the shapes of the networks these patterns come from."""
    gpu = device == "cuda"
    n = 32 if gpu else 4
    vol = 64 if gpu else 32
    out = []
    for layout in ("contiguous", "channels_last"):
        out += [
            (Case("resnet50.bn1", (n, 64, 112, 112), layout), "relu", False),
            (Case("resnet50.layer1", (n, 256, 56, 56), layout), "relu", True),
            (Case("resnet50.layer3", (n, 1024, 14, 14), layout), "relu", True),
            (Case("efficientnet_b0.stage2", (n, 96, 56, 56), layout), "silu", False),
            (Case("mobilenet_v2.stage3", (n, 192, 28, 28), layout), "relu6", False),
        ]
    out.append((Case("unet3d.block", (2, 32, vol, vol, vol), "contiguous"), "relu", False))
    return out


def _modules(case, activation, device):
    c = case.shape[1]
    kind = 1 if len(case.shape) <= 3 else len(case.shape) - 2
    torch_cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[kind]
    ours_cls = {1: bn_ext.BatchNorm1d, 2: bn_ext.BatchNorm2d, 3: bn_ext.BatchNorm3d}[kind]
    fused_cls = {1: bn_ext.BatchNormAct1d, 2: bn_ext.BatchNormAct2d, 3: bn_ext.BatchNormAct3d}[kind]
    theirs = torch_cls(c, device=device)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    unfused = ours_cls(c, device=device)
    fused = fused_cls(c, device=device, activation=activation)
    unfused.load_state_dict(theirs.state_dict())
    fused.load_state_dict(theirs.state_dict())
    act = ACT[activation]

    def composite(bn):
        return lambda x, r: act(bn(x) if r is None else bn(x) + r)

    return [(theirs, composite(theirs)), (unfused, composite(unfused)), (fused, fused)]


def _step(fn, x, r, mode, dy):
    if mode == "train_fwd_bwd":
        xr = x.detach().requires_grad_()

        def run():
            fn(xr, r).backward(dy)
            xr.grad = None

        return run

    def run():
        with torch.no_grad():
            fn(x, r)

    return run


def run_fused(args, interleaved_times):
    device = args.device
    jobs = [
        (c, a, res, d, m)
        for c, a, res in fused_suite(device)
        for d in args.dtype.split(",")
        for m in args.mode.split(",")
    ]
    if args.shapes:
        jobs = [j for j in jobs if any(s in j[0].name for s in args.shapes.split(","))]
    samples = [None] * len(jobs)
    parity = [None] * len(jobs)
    for step in range(len(jobs) * args.rounds):
        i = step % len(jobs)
        case, activation, residual, dname, mode = jobs[i]
        print(f"\r[{step + 1}/{len(jobs) * args.rounds}] {case.name} {case.layout} {dname} {mode}".ljust(90), end="")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dname]
        mods = _modules(case, activation, device)
        if mode == "eval_fwd":
            for m, _ in mods:
                m.eval()
        fmt = case.memory_format()
        x = torch.randn(case.shape, device=device, dtype=dtype)
        x = x.contiguous(memory_format=fmt) if fmt is not None else x
        r = torch.randn_like(x) if residual else None
        dy = torch.randn_like(x)
        if parity[i] is None:
            with torch.no_grad():
                ref, ours = mods[0][1](x, r).float(), mods[2][1](x, r).float()
            tol = 1e-3 if dtype == torch.float32 else 6e-2
            parity[i] = float((ref - ours).abs().max()) <= tol * max(1.0, float(ref.abs().max()))
            for m, _ in mods:
                m.load_state_dict(mods[0][0].state_dict())
        theirs, *variants = [_step(fn, x, r, mode, dy) for _, fn in mods]
        # bn_ext's two variants each in their own turns after torch's call (torch's samples
        # pooled), as the main suite's --isa builds: the fused call right after the unfused one
        # found x in its threads' L2 from the unfused BatchNorm
        times = [[] for _ in mods]
        for j, fn in enumerate(variants):
            t = interleaved_times([theirs, fn], device, args.repeats, args.warmup, args.min_time)
            times[0] += t[0]
            times[1 + j] += t[1]
        samples[i] = times if samples[i] is None else [a + b for a, b in zip(samples[i], times)]
    print()
    rows = []
    for (case, activation, residual, dname, mode), times, ok in zip(jobs, samples, parity):
        t_torch, t_unfused, t_fused = (statistics.median(ts) for ts in times)
        rows.append(
            {
                "case": case.name,
                "shape": "x".join(map(str, case.shape)),
                "layout": case.layout,
                "pattern": f"bn+{'add+' if residual else ''}{activation}",
                "dtype": dname,
                "mode": mode,
                "device": device,
                "torch_ms": t_torch * 1e3,
                "unfused_ms": t_unfused * 1e3,
                "fused_ms": t_fused * 1e3,
                "speedup": t_torch / t_fused,
                "speedup_vs_unfused": t_unfused / t_fused,
                "parity": "ok" if ok else "MISMATCH",
            }
        )
    return rows


def torch_label(info):
    """torch's version and, on the CPU, which of ATen's kernel builds ran: ATEN_CPU_CAPABILITY=avx2
    caps it, so that an AVX-512 CPU runs both libraries' AVX2 code (BN_EXT_CPU_ISA=avx2), as an
    AVX2-only CPU would."""
    cap = None if info.get("gpu") else info.get("torch_cpu_capability")
    return f"torch {info['torch']}" + (f" ({cap} kernels)" if cap else "")


def fused_table(rows, info, geomean):
    lines = [
        f"bn_ext fused BatchNorm+activation on {info['cpu'] if not info['gpu'] else info['gpu']}, "
        f"{info['threads']} threads, {torch_label(info)}, bn_ext {info['bn_ext_commit']} "
        f"({info.get('bn_ext_cpu_kernels')} kernels)",
        "torch: torch.nn BatchNorm + torch add/activation; unfused: bn_ext BatchNorm + the same; fused: BatchNormAct",
    ]
    head = (
        f"{'case':<24} {'layout':<13} {'pattern':<13} {'dtype':<8} {'mode':<13} "
        f"{'torch ms':>9} {'unfused':>9} {'fused':>9} {'vs torch':>8} {'vs unfused':>10} parity"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<24} {r['layout']:<13} {r['pattern']:<13} {r['dtype']:<8} {r['mode']:<13} "
            f"{r['torch_ms']:9.3f} {r['unfused_ms']:9.3f} {r['fused_ms']:9.3f} {r['speedup']:7.2f}x "
            f"{r['speedup_vs_unfused']:9.2f}x {r['parity']}"
        )
    lines.append("-" * len(head))
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"]), []).append(r)
    for (mode, dtype), rs in sorted(groups.items()):
        a = [r["speedup"] for r in rs]
        b = [r["speedup_vs_unfused"] for r in rs]
        lines.append(
            f"geomean {mode:<13} {dtype:<8}: {geomean(a):.2f}x torch (min {min(a):.2f}x), "
            f"{geomean(b):.2f}x unfused (min {min(b):.2f}x) over {len(rs)} cases"
        )
    return "\n".join(lines) + "\n"


def render_fused(rows, info, base, geomean):
    """The table as base.txt (from a run, or from its JSON with --render); returns the text."""
    text = fused_table(rows, info, geomean)
    with open(base + ".txt", "w") as f:
        f.write(text)
    return text


def write_fused(rows, info, out_dir, tag, geomean):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"bench-{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "results": rows}, f, indent=1)
    return base, render_fused(rows, info, base, geomean)
