"""Every bn_ext CUDA op once, on small odd shapes in each layout and dtype: the workload that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck)."""

import torch

import bn_ext  # noqa: F401

ops = torch.ops.bn_ext


def main():
    torch.manual_seed(0)
    cases = [
        ((3, 5, 7, 9), None),
        ((3, 5, 7, 9), torch.channels_last),
        ((4, 8, 4, 4), None),
        ((37, 6), None),
        ((2, 3, 3, 4, 5), torch.channels_last_3d),
        ((2, 4, 1000), None),
    ]
    for dtype in (torch.float32, torch.float16, torch.float64):
        for shape, fmt in cases:
            x = torch.randn(shape, device="cuda").to(dtype)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            c = shape[1]
            pdt = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.rand(c, device="cuda", dtype=pdt) + 0.5
            b = torch.randn(c, device="cuda", dtype=pdt)
            y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
            ops.batch_norm_elemt(x, w, b, mean, var, 1e-5)
            ops.batch_norm_stats(x)
            dy = torch.randn_like(y)
            ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, True, [True, True, True])
            ops.batch_norm_backward(dy, x, w, mean, var, 1e-5, False, [True, True, True])
            sdy, sdx = ops.batch_norm_backward_reduce(dy, x, mean)
            ops.batch_norm_backward_elemt(dy, x, w, mean, var, sdy, sdx, 1e-5, x.numel() // c)
            rm, rv, nbt = (
                torch.zeros(c, device="cuda", dtype=pdt),
                torch.ones(c, device="cuda", dtype=pdt),
                torch.zeros((), dtype=torch.long, device="cuda"),
            )
            ops.batch_norm_update_running_stats(rm, rv, nbt, mean, var, None, x.numel() // c)
    torch.cuda.synchronize()
    print("sanitize_ops: ran every op")


if __name__ == "__main__":
    main()
