"""The CPU kernel build this process picks (BN_EXT_CPU_ISA caps it), then training forward and
backward over a few shapes in every dtype; saves both to argv[1] (tests/test_numerics.py
compares the builds)."""

import sys

import torch

import bn_ext

torch.manual_seed(0)
ops = torch.ops.bn_ext
out = [bn_ext.build_info()["cpu_kernels"]]
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for shape, fmt in [
        ((4, 40, 9, 9), None),
        ((4, 6, 33, 31), None),
        ((4, 24, 9, 9), torch.channels_last),
        ((300, 21), None),
    ]:
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        w = torch.rand(shape[1]) + 0.5
        if dtype == torch.float64:
            w = w.double()
        y, mean, var = ops.batch_norm_train(x, w, None, 1e-5)
        dy = torch.randn_like(x)
        out += [y, mean, var, *ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])]
torch.save(out, sys.argv[1])
