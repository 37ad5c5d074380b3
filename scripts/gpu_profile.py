"""Where a CUDA training step's time goes: per-kernel device time (torch.profiler) for bn_ext and
PyTorch on a few bench cases, and the host time per call, so launch-bound and kernel-bound cases
can be told apart. Run on a GPU machine after building: python scripts/gpu_profile.py"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bn_ext

CASES = [  # (name, shape, memory format, dtype)
    ("resnet50.bn1 CL", (32, 64, 112, 112), torch.channels_last, torch.float32),
    ("resnet50.bn1", (32, 64, 112, 112), None, torch.float32),
    ("resnet50.layer1", (32, 256, 56, 56), None, torch.bfloat16),
    ("resnet50.layer1 CL", (32, 256, 56, 56), torch.channels_last, torch.bfloat16),
    ("c2048x7x7", (32, 2048, 7, 7), None, torch.float32),
    ("bn1d.sequence", (256, 256, 128), None, torch.float32),
    ("resnet50.layer3 CL", (32, 1024, 14, 14), torch.channels_last, torch.float32),
    ("c2048x7x7 CL", (32, 2048, 7, 7), torch.channels_last, torch.float32),
    ("c3x224 CL", (32, 3, 224, 224), torch.channels_last, torch.float32),
    ("bn1d.4096x1024", (4096, 1024), None, torch.float32),
]


def step(module, x, dy):
    module(x).backward(dy)
    x.grad = None


def host_us(fn, calls=50):
    """Host time per call while the GPU keeps up (no sync inside the loop)."""
    torch.cuda.synchronize()
    t = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(t) * 1e6


def main():
    only = sys.argv[1:]
    for name, shape, fmt, dtype in CASES:
        if only and not any(o in name for o in only):
            continue
        x = torch.randn(shape, device="cuda", dtype=dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        dy = torch.randn_like(x)
        kind = {2: 1, 3: 1, 4: 2, 5: 3}[x.dim()]
        mods = {
            "torch": getattr(torch.nn, f"BatchNorm{kind}d")(shape[1]).cuda(),
            "bn_ext": getattr(bn_ext, f"BatchNorm{kind}d")(shape[1]).cuda(),
        }
        print(f"\n### {name} {tuple(shape)} {str(dtype)[6:]}")
        for who, m in mods.items():
            fn = lambda m=m, x=x, dy=dy: step(m, x, dy)  # noqa: E731
            for _ in range(5):
                fn()
            hu = host_us(fn)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            rows = []
            for e in prof.key_averages():
                dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                if dev > 0:
                    rows.append((dev / 10, e.count // 10, e.key))
            rows.sort(reverse=True)
            total = sum(r[0] for r in rows)
            print(f"  {who:7s} host {hu:7.1f} us/step   device {total:8.1f} us/step")
            for us, n, key in rows[:7]:
                print(f"      {us:8.1f} us x{n}  {key[:110]}")


if __name__ == "__main__":
    main()
