"""Every CPU op's outputs over 14 shapes x 4 dtypes, for bitwise before/after checks of a change
that must not move any result (a refactor, a compiler flag):

    python tests/scripts/op_outputs.py save OUT.pt     # with one build, under each BN_EXT_CPU_ISA
    python tests/scripts/op_outputs.py compare A.pt B.pt [KEY_PART]

KEY_PART compares only the entries whose key holds it: "-act-" takes the fused ops with given
statistics, whose SIMD loops compute the scalar loops' bits, so there the AVX2 and AVX-512
builds' outputs must be equal, and the default build's must equal theirs except in the "-silu"
entries (the SIMD builds fuse the exponential's multiply-adds; "-act-relu", "-act-leaky_relu"
and "-act-identity" leave them out).
"""

import sys

import torch

import bn_ext  # noqa: F401  (registers the ops)

SHAPES = [
    ((8, 3, 64, 64), None),
    ((8, 3, 64, 64), torch.channels_last),
    ((4096, 96), None),
    ((2048, 512), None),
    ((4, 5, 7, 9, 11), None),
    ((4, 2070, 3, 5), torch.channels_last),
    ((16, 64, 20, 20), None),
    ((16, 64, 20, 20), torch.channels_last),
    ((4, 2048, 7, 7), None),
    ((2, 266, 45, 47), torch.channels_last),
    ((4, 64, 56, 56), None),
    ((4, 64, 56, 56), torch.channels_last),
    ((3, 7, 13), None),
    ((4, 32, 8, 16, 16), torch.channels_last_3d),
]


def save(path):
    ops = torch.ops.bn_ext
    torch.manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for i, (shape, fmt) in enumerate(SHAPES):
            x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dt)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            pdt = torch.float64 if dt == torch.float64 else torch.float32
            w = torch.rand(shape[1], dtype=pdt) + 0.5
            b = torch.randn(shape[1], dtype=pdt)
            count = x.numel() // shape[1]
            y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
            dy = torch.randn_like(x)
            grads = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
            grads_eval = ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, False, [True, True, True])
            rm, rv = torch.zeros(shape[1], dtype=pdt), torch.ones(shape[1], dtype=pdt)
            ops.batch_norm_update_running_stats(rm, rv, None, mean, var, 0.1, count)
            sdy, sdx = ops.batch_norm_backward_reduce(dy, x, mean)
            out[f"{dt}-{i}"] = [
                y,
                mean,
                var,
                *grads,
                *grads_eval,
                ops.batch_norm_elemt(x, w, b, mean, var, 1e-5),
                *ops.batch_norm_stats(x),
                sdy,
                sdx,
                ops.batch_norm_backward_elemt(dy, x, w, mean, var, sdy, sdx, 1e-5, count),
                rm,
                rv,
            ]
            # the fused ops; "-act-" entries take float64 statistics from torch, so only the fused
            # loops differ between builds (the statistics kernels are each build's own)
            dims = [d for d in range(x.dim()) if d != 1]
            m64 = x.double().mean(dims)
            v64 = x.double().var(dims, unbiased=False)
            acts = ("identity", "relu", "relu6", "leaky_relu", "silu")
            for j, act in enumerate((acts[i % 5], acts[(i + 2) % 5])):
                res = torch.randn_like(x) if (i + j) % 2 == 0 else None
                mask = [True, True, True, res is not None]
                out[f"{dt}-{i}-act_train-{act}"] = list(
                    ops.batch_norm_act_train(x, w, b, res, None, None, None, 0.1, 1e-5, act, 0.2)
                )
                out[f"{dt}-{i}-act-{act}"] = [
                    ops.batch_norm_act(x, w, b, res, m64, v64, 1e-5, act, 0.2),
                    *ops.batch_norm_act_backward(dy, x, w, b, res, m64, v64, 1e-5, True, act, 0.2, mask),
                    *ops.batch_norm_act_backward(dy, x, w, b, res, m64, v64, 1e-5, False, act, 0.2, mask),
                ]
    torch.save(out, path)


def same(p, q):
    return (
        p.shape == q.shape
        and p.stride() == q.stride()
        and p.dtype == q.dtype
        and torch.equal(p.contiguous().reshape(-1).view(torch.uint8), q.contiguous().reshape(-1).view(torch.uint8))
    )


def compare(a_path, b_path, key_part=""):
    a, b = torch.load(a_path), torch.load(b_path)
    assert a.keys() == b.keys()
    keys = [k for k in a if key_part in k]
    bad = [(k, i) for k in keys for i, (p, q) in enumerate(zip(a[k], b[k], strict=True)) if not same(p, q)]
    n = sum(len(a[k]) for k in keys)
    print(f"{n - len(bad)}/{n} tensors bitwise equal" + (f"; differ: {bad[:10]}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        sys.exit(compare(*sys.argv[2:5]))
