"""torch.library.opcheck for every bn_ext op on representative samples."""

import pytest
import torch

from conftest import DEVICES
from bn_ext._fake import OP_NAMES

ops = torch.ops.bn_ext


def samples(device):
    """(op name, args, kwargs) for every op: dtypes, layouts, optional arguments present and not."""
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape, fmt in (
            ((4, 3, 5, 6), None),
            ((4, 3, 5, 6), torch.channels_last),
            ((6, 5), None),
            ((2, 3, 4, 3, 2), torch.channels_last_3d),
        ):
            x = (torch.randn(shape, device=device) * 2 + 1).to(dtype)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            c = shape[1]
            pdt = torch.float32 if dtype == torch.bfloat16 else dtype
            sdt = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.rand(c, device=device, dtype=pdt) + 0.5
            b = torch.randn(c, device=device, dtype=pdt)
            mean = torch.randn(c, device=device, dtype=sdt)
            var = torch.rand(c, device=device, dtype=sdt) + 0.5
            dy = torch.randn_like(x)
            count = x.numel() // c
            table = torch.cat(
                [
                    torch.tensor([[4.0], [0.0], [7.0]], device=device),
                    torch.randn(3, c, device=device),
                    torch.rand(3, c, device=device) + 0.5,
                ],
                dim=1,
            ).to(sdt)
            out += [
                ("batch_norm_stats", (x,), {}),
                ("batch_norm_stats", (x, torch.float64), {}),
                (
                    "batch_norm_gather_stats",
                    (
                        table,
                        torch.zeros(c, device=device, dtype=pdt),
                        torch.ones(c, device=device, dtype=pdt),
                        torch.tensor(2, device=device),
                        0.1,
                    ),
                    {},
                ),
                ("batch_norm_gather_stats", (table, None, None, torch.tensor(0, device=device), None), {}),
                ("batch_norm_elemt", (x, w, b, mean, var, 1e-5), {}),
                ("batch_norm_elemt", (x, None, None, mean, var, 1e-5), {}),
                ("batch_norm_train", (x, w, b, 1e-5), {}),
                ("batch_norm_train", (x, None, None, 1e-3), {}),
                (
                    "batch_norm_train_update",
                    (
                        x,
                        w,
                        b,
                        torch.zeros(c, device=device, dtype=pdt),
                        torch.ones(c, device=device, dtype=pdt),
                        torch.tensor(2, device=device),
                        0.1,
                        1e-5,
                    ),
                    {},
                ),
                (
                    "batch_norm_train_update",
                    (x, None, None, None, None, torch.tensor(0, device=device), None, 1e-5),
                    {},
                ),
                ("batch_norm_backward_reduce", (dy, x, mean), {}),
                ("batch_norm_backward_elemt", (dy, x, w, mean, var, mean * 3, var - 1, 1e-5, count), {}),
                ("batch_norm_backward", (dy, x, w, mean, var, 1e-5, True, [True, True, True]), {}),
                ("batch_norm_backward", (dy, x, None, mean, var, 1e-5, False, [True, False, True]), {}),
                ("batch_norm_backward", (dy, x, w, mean, var, 1e-5, True, [False, True, False]), {}),
                (
                    "batch_norm_update_running_stats",
                    (
                        torch.zeros(c, device=device, dtype=pdt),
                        torch.ones(c, device=device, dtype=pdt),
                        torch.tensor(2, device=device),
                        mean,
                        var,
                        0.1,
                        count,
                    ),
                    {},
                ),
                (
                    "batch_norm_update_running_stats",
                    (
                        torch.zeros(c, device=device, dtype=pdt),
                        torch.ones(c, device=device, dtype=pdt),
                        torch.tensor(2, device=device),
                        mean,
                        var,
                        None,
                        count,
                    ),
                    {},
                ),
            ]
            res = torch.randn_like(x)
            for act, res_or_none in (("relu", res), ("silu", None), ("leaky_relu", res), ("relu6", None)):
                out += [
                    ("batch_norm_act", (x, w, b, res_or_none, mean, var, 1e-5, act, 0.2), {}),
                    (
                        "batch_norm_act_train",
                        (
                            x,
                            w,
                            b,
                            res_or_none,
                            torch.zeros(c, device=device, dtype=pdt),
                            torch.ones(c, device=device, dtype=pdt),
                            torch.tensor(2, device=device),
                            0.1,
                            1e-5,
                            act,
                            0.01,
                        ),
                        {},
                    ),
                    (
                        "batch_norm_act_backward",
                        (dy, x, w, b, res_or_none, mean, var, 1e-5, True, act, 0.01, [True, True, True, True]),
                        {},
                    ),
                ]
            out += [
                ("batch_norm_act_train", (x, None, None, None, None, None, None, None, 1e-5, "identity", 0.0), {}),
                (
                    "batch_norm_act_backward",
                    (dy, x, None, b, res, mean, var, 1e-5, False, "relu", 0.0, [False, False, True, True]),
                    {},
                ),
            ]
    # differentiable samples: inputs that require grad, in float64
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    mean = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    var = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    out += [
        ("batch_norm_train", (x, w, b, 1e-5), {}),
        (
            "batch_norm_train_update",
            (
                x,
                w,
                b,
                torch.zeros(4, dtype=torch.float64, device=device),
                torch.ones(4, dtype=torch.float64, device=device),
                None,
                0.1,
                1e-5,
            ),
            {},
        ),
        ("batch_norm_elemt", (x, w, b, mean, var, 1e-5), {}),
        ("batch_norm_stats", (x,), {}),
        (
            "batch_norm_act_train",
            (x, w, b, torch.randn_like(x).requires_grad_(), None, None, None, 0.1, 1e-5, "silu", 0.01),
            {},
        ),
        ("batch_norm_act", (x, w, b, None, mean.detach(), var.detach(), 1e-5, "leaky_relu", 0.1), {}),
        (
            "batch_norm_backward",
            (
                torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True),
                x,
                w,
                mean.detach(),
                var.detach(),
                1e-5,
                True,
                [True, True, True],
            ),
            {},
        ),
    ]
    return out


def describe(sample):
    """A test id naming the sample: op, then each argument (tensors by dtype, shape and layout;
    '~' for one that requires grad), so that a failure names what it ran on."""
    name, args, _ = sample
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            layout = (
                "cl"
                if a.dim() >= 4
                and not a.is_contiguous()
                and a.is_contiguous(memory_format=torch.channels_last if a.dim() == 4 else torch.channels_last_3d)
                else ""
            )
            shape = "x".join(map(str, a.shape)) or "scalar"
            parts.append(f"{str(a.dtype)[6:]}[{shape}{layout}]{'~' if a.requires_grad else ''}")
        else:
            parts.append(str(a))
    return name + "(" + ",".join(parts) + ")"


# Each distinct sample once (the per-channel ops' samples repeat across the input layouts).
SAMPLE_IDS = {}
for _index, _sample in enumerate(samples("cpu")):
    SAMPLE_IDS.setdefault(describe(_sample), _index)


def test_every_op_has_samples():
    assert {name for name, _, _ in samples("cpu")} == set(OP_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", list(SAMPLE_IDS.values()), ids=list(SAMPLE_IDS))
def test_opcheck(index, device):
    name, args, kwargs = samples(device)[index]
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)
