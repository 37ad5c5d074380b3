"""float64 reference BatchNorm, written from the definition, for checking both bn_ext and torch."""

import torch


def reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def channel_view(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def batch_stats(x):
    """Per-channel mean and biased variance in float64 (two-pass, exact enough to be a reference)."""
    x = x.double()
    mean = x.mean(reduce_dims(x))
    var = ((x - channel_view(mean, x)) ** 2).mean(reduce_dims(x))
    return mean, var


def forward(x, mean, var, weight, bias, eps):
    x = x.double()
    y = (x - channel_view(mean.double(), x)) / torch.sqrt(channel_view(var.double(), x) + eps)
    if weight is not None:
        y = y * channel_view(weight.double(), x)
    if bias is not None:
        y = y + channel_view(bias.double(), x)
    return y


def backward_training(x, dy, weight, eps):
    """(dx, dweight, dbias) in float64 for training-mode BatchNorm."""
    x = x.double()
    dy = dy.double()
    mean, var = batch_stats(x)
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = (x - channel_view(mean, x)) * channel_view(invstd, x)
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    dbias = dy.sum(dims)
    dweight = (dy * xhat).sum(dims)
    w = weight.double() if weight is not None else torch.ones_like(mean)
    dx = channel_view(w * invstd, x) * (dy - channel_view(dbias / m, x) - xhat * channel_view(dweight / m, x))
    return dx, dweight, dbias
