"""python -m bn_ext.bench.model [contiguous|channels_last]: a torchvision ResNet-50 training
step (batch 8, 112x112, SGD) with torch.nn's BatchNorm, with bn_ext's (convert_model) and with
bn_ext.fuse, the three taking turns step by step; median ms per step and speed against torch.nn."""

import copy
import statistics
import sys
import time

import torch

import bn_ext


def main(argv=None):
    import torchvision

    layout = (argv or sys.argv[1:] or ["contiguous"])[0]
    torch.manual_seed(0)
    base = torchvision.models.resnet50(num_classes=100)
    nets = {
        "torch.nn": copy.deepcopy(base),
        "bn_ext": bn_ext.convert_model(copy.deepcopy(base)),
        "bn_ext.fuse": bn_ext.fuse(copy.deepcopy(base)),
    }
    x = torch.randn(8, 3, 112, 112)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}
    y = torch.randint(0, 100, (8,))
    opts = {k: torch.optim.SGD(v.parameters(), lr=0.01) for k, v in nets.items()}

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(nets[k](x), y).backward()
        opts[k].step()

    times = {k: [] for k in nets}
    for k in nets:
        step(k)
        step(k)
    for _ in range(6):
        for k in nets:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch.nn"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{layout:<13} {k:<12} {m * 1e3:8.1f} ms/step  speed vs torch.nn {ref / m:.2f}x")


if __name__ == "__main__":
    main()
