"""vmap rules for the bn_ext ops.

BatchNorm of each of B batched (N, C, *) inputs is BatchNorm of one (N, B * C, *) input: the vmap
dimension folds into the channels, per-channel tensors fold alike (unbatched ones repeated), and
one op call does the whole batch. The ops that write running statistics in place refuse batched
statistics, as torch.nn's batch norm does under vmap.
"""

import torch

_ops = torch.ops.bn_ext


def _fold(t, bdim, batch):
    """(N, C, *) with the vmap dim at bdim (None: unbatched) -> (N, B * C, *)."""
    if bdim is None:
        t = t.unsqueeze(0).expand(batch, *t.shape)
        bdim = 0
    t = t.movedim(bdim, 1)  # (N, B, C, *)
    return t.reshape(t.shape[0], batch * t.shape[2], *t.shape[3:])


def _unfold(t, batch):
    """(N, B * C, *) -> (B, N, C, *)."""
    return t.reshape(t.shape[0], batch, t.shape[1] // batch, *t.shape[2:]).movedim(1, 0)


def _fold_channels(t, bdim, batch):
    """(C,) per-channel tensor with its vmap dim at bdim -> (B * C,); None stays None."""
    if t is None:
        return None
    if bdim is None:
        return t.repeat(batch)
    return t.movedim(bdim, 0).reshape(-1)


def _unfold_channels(t, batch):
    return t.reshape(batch, -1) if t.numel() else t.new_empty((batch, 0))


def _elemt(info, in_dims, input, weight, bias, mean, var, eps):
    b = info.batch_size
    x = _fold(input, in_dims[0], b)
    w, bi, m, v = (_fold_channels(t, d, b) for t, d in zip((weight, bias, mean, var), in_dims[1:5]))
    return _unfold(_ops.batch_norm_elemt(x, w, bi, m, v, eps), b), 0


def _train(info, in_dims, input, weight, bias, eps):
    b = info.batch_size
    x = _fold(input, in_dims[0], b)
    w, bi = (_fold_channels(t, d, b) for t, d in zip((weight, bias), in_dims[1:3]))
    y, mean, var = _ops.batch_norm_train(x, w, bi, eps)
    return (_unfold(y, b), mean.reshape(b, -1), var.reshape(b, -1)), (0, 0, 0)


def _stats(info, in_dims, input, dtype=None):
    b = info.batch_size
    mean, var = _ops.batch_norm_stats(_fold(input, in_dims[0], b), dtype)
    return (mean.reshape(b, -1), var.reshape(b, -1)), (0, 0)


def _backward_reduce(info, in_dims, grad_out, input, mean):
    b = info.batch_size
    sum_dy, sum_dy_xmu = _ops.batch_norm_backward_reduce(
        _fold(grad_out, in_dims[0], b), _fold(input, in_dims[1], b), _fold_channels(mean, in_dims[2], b)
    )
    return (sum_dy.reshape(b, -1), sum_dy_xmu.reshape(b, -1)), (0, 0)


def _backward_elemt(info, in_dims, grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, count):
    b = info.batch_size
    channel = [_fold_channels(t, d, b) for t, d in zip((weight, mean, var, sum_dy, sum_dy_xmu), in_dims[2:7])]
    dx = _ops.batch_norm_backward_elemt(
        _fold(grad_out, in_dims[0], b), _fold(input, in_dims[1], b), *channel, eps, count
    )
    return _unfold(dx, b), 0


def _backward(info, in_dims, grad_out, input, weight, mean, var, eps, training, output_mask):
    b = info.batch_size
    w, m, v = (_fold_channels(t, d, b) for t, d in zip((weight, mean, var), in_dims[2:5]))
    gi, gw, gb = _ops.batch_norm_backward(
        _fold(grad_out, in_dims[0], b), _fold(input, in_dims[1], b), w, m, v, eps, training, output_mask
    )
    gi = _unfold(gi, b) if output_mask[0] else gi.new_empty((b, 0))
    return (gi, _unfold_channels(gw, b), _unfold_channels(gb, b)), (0, 0, 0)


def _refuse_in_place(op):
    def rule(info, in_dims, *args):
        raise RuntimeError(
            f"bn_ext.{op}: under vmap, the running statistics (or counter) would be updated in place from batched "
            "values, or would themselves be batched. Use eval mode or track_running_stats=False inside vmap "
            "(torch.func.replace_all_batch_norm_modules_ does this for a model), as with torch.nn's BatchNorm."
        )

    return rule


def install():
    for name, rule in (
        ("batch_norm_elemt", _elemt),
        ("batch_norm_train", _train),
        ("batch_norm_stats", _stats),
        ("batch_norm_backward_reduce", _backward_reduce),
        ("batch_norm_backward_elemt", _backward_elemt),
        ("batch_norm_backward", _backward),
        ("batch_norm_update_running_stats", _refuse_in_place("batch_norm_update_running_stats")),
        ("batch_norm_train_update", _refuse_in_place("batch_norm_train_update")),
        ("batch_norm_gather_stats", _refuse_in_place("batch_norm_gather_stats")),
    ):
        torch.library.register_vmap(f"bn_ext::{name}", rule)
