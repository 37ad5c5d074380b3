"""Training forward and backward over shapes on every CPU path, with argv[1] threads; saves
every output to argv[2] (tests/test_numerics.py compares thread counts)."""

import sys

import torch

import bn_ext  # noqa: F401  (registers the ops)

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
ops = torch.ops.bn_ext
out = []
for shape, fmt in [
    ((8, 3, 64, 64), None),
    ((8, 3, 64, 64), torch.channels_last),
    ((4096, 96), None),
    ((4, 5, 7, 9, 11), None),
    ((4, 2070, 3, 5), torch.channels_last),
    ((16, 64, 20, 20), None),
    ((16, 64, 20, 20), torch.channels_last),
    ((4, 2048, 7, 7), None),
    ((2, 266, 45, 47), torch.channels_last),
    # planes of fewer than 16 values: one thread pipelines the channels (their runs summed one
    # by one), two or more take the whole-tensor passes (a block's runs summed in one loop)
    ((600, 6, 3, 3), None),
    ((3000, 5, 1, 3), None),  # a run split where a reduction block ends (8192 values)
]:
    x = torch.randn(shape) * 3 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = torch.rand(shape[1]) + 0.5
    y, mean, var = ops.batch_norm_train(x, w, None, 1e-5)
    dy = torch.randn_like(x)
    gi, gw, gb = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
    out += [y, mean, var, gi, gw, gb]
torch.save(out, sys.argv[2])
