"""Every elementwise pass over shapes whose rows and runs start off the streaming stores'
alignment, every dtype; saves every output to argv[1] (tests/test_numerics.py runs it with
BN_EXT_LLC_BYTES set so that everything streams, and so that nothing does)."""

import sys

import torch

import bn_ext  # noqa: F401  (registers the ops)

torch.manual_seed(0)
ops = torch.ops.bn_ext
out = []
for isa_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    # odd channel counts and planes: rows and runs that start off the streaming stores' alignment
    for shape, fmt in [
        ((4, 40, 9, 9), None),
        ((3, 6, 33, 31), None),
        ((4, 24, 9, 9), torch.channels_last),
        ((5, 37, 7, 5), torch.channels_last),
        ((300, 21), None),
        ((2, 3, 5, 6, 7), None),
        ((64, 2, 40, 40), None),
        ((3, 9, 41, 37), None),
    ]:
        x = (torch.randn(shape) * 3 + 1).to(isa_dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        w = torch.rand(shape[1], dtype=torch.float64 if isa_dtype == torch.float64 else torch.float32) + 0.5
        b = torch.randn_like(w)
        y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
        dy = torch.randn_like(x)
        out += [y, mean, var, ops.batch_norm_elemt(x, w, b, mean, var, 1e-5)]
        out += list(ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True]))
        out += list(ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, False, [True, True, True]))
        sdy, sdx = ops.batch_norm_backward_reduce(dy, x, mean)
        out.append(ops.batch_norm_backward_elemt(dy, x, w, mean, var, sdy, sdx, 1e-5, x.numel() // shape[1]))
torch.save(out, sys.argv[1])
