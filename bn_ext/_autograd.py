"""Autograd for the bn_ext ops.

First-order gradients run our kernels (batch_norm_backward). Higher orders go through a composite
of differentiable torch ops: batch_norm_backward's own backward re-derives the first-order formula
with torch ops and differentiates it, keeping the graph when a further order is asked for.
"""

import torch

_ops = torch.ops.bn_ext


def _reduce_dims(input):
    return [0] + list(range(2, input.dim()))


def _per_channel(t, input):
    """View a (C,) tensor so that it broadcasts against input's channel dimension."""
    return t.view([1, -1] + [1] * (input.dim() - 2))


# ---- batch_norm_train: autograd in C++ (csrc/autograd.cpp), backward by batch_norm_backward -----


# ---- batch_norm_elemt (eval): autograd in C++ (csrc/autograd.cpp), backward by batch_norm_backward


# ---- batch_norm_stats -----------------------------------------------------------------------


def _stats_setup(ctx, inputs, output):
    input = inputs[0]
    mean, _ = output
    ctx.save_for_backward(input, mean)


def _stats_backward(ctx, grad_mean, grad_var):
    input, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    count = input.numel() // max(input.shape[1], 1)
    x = input.to(mean.dtype)
    # mean = sum(x) / M;  var = sum((x - mean)^2) / M  (the mean's own gradient term sums to 0)
    grad = _per_channel(grad_mean / count, input) + _per_channel(grad_var * (2.0 / count), input) * (
        x - _per_channel(mean, input)
    )
    return grad.to(input.dtype), None


torch.library.register_autograd("bn_ext::batch_norm_stats", _stats_backward, setup_context=_stats_setup)


# ---- batch_norm_backward: second order through a differentiable composite -------------------


def composite_backward(grad_out, input, weight, mean, var, eps, training):
    """batch_norm_backward written with differentiable torch ops (float32 or wider).

    In training the statistics are recomputed from input, since they are functions of it.
    """
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc)
    g = grad_out.to(acc)
    dims = _reduce_dims(input)
    count = input.numel() // max(input.shape[1], 1)
    if training:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    else:
        mean = mean.to(acc)
        var = var.to(acc)
    invstd = torch.rsqrt(var + eps)
    xhat = (x - _per_channel(mean, input)) * _per_channel(invstd, input)
    scale = invstd if weight is None else weight.to(acc) * invstd
    grad_bias = g.sum(dims)
    grad_weight = (g * xhat).sum(dims)
    if training:
        centred = g - _per_channel(grad_bias / count, input) - xhat * _per_channel(grad_weight / count, input)
        grad_input = _per_channel(scale, input) * centred
    else:
        grad_input = _per_channel(scale, input) * g
    return grad_input.to(input.dtype), grad_weight, grad_bias


def _backward_setup(ctx, inputs, output):
    grad_out, input, weight, mean, var, eps, training, output_mask = inputs
    ctx.save_for_backward(grad_out, input, weight, mean, var)
    ctx.eps = eps
    ctx.training = training
    ctx.output_mask = list(output_mask)


def _backward_backward(ctx, gg_input, gg_weight, gg_bias):
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad[:5]
    wrt = [i for i, (t, n) in enumerate(zip(saved, need)) if n and t is not None and t.is_floating_point()]
    picked = [
        k for k, (gg, m) in enumerate(zip((gg_input, gg_weight, gg_bias), ctx.output_mask)) if m and gg is not None
    ]
    if not wrt or not picked:
        return (None,) * 8
    gg = (gg_input, gg_weight, gg_bias)

    def selected_outputs(*primals):
        args = list(saved)
        for i, p in zip(wrt, primals):
            args[i] = p
        outs = composite_backward(*args, ctx.eps, ctx.training)
        return tuple(outs[k] for k in picked)

    if torch.is_grad_enabled():
        # The graph of this backward is built too (a third or higher order). torch.func.vjp takes
        # the partial derivatives in the saved tensors (grad_out is itself a function of input, a
        # path the outer graph already carries) and keeps them differentiable in those tensors.
        outs, vjp_fn = torch.func.vjp(selected_outputs, *[saved[i] for i in wrt])
        grads = vjp_fn(tuple(gg[k].to(o.dtype) for k, o in zip(picked, outs)))
    else:
        with torch.enable_grad():
            leaves = [saved[i].detach().requires_grad_() for i in wrt]
            outs = selected_outputs(*leaves)
            # An output that depends on no such tensor (eval mode, no weight) adds nothing.
            used = [(o, gg[k].to(o.dtype)) for k, o in zip(picked, outs) if o.requires_grad]
            grads = (
                torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True)
                if used
                else [None] * len(leaves)
            )
    result = [None] * 5
    for i, g in zip(wrt, grads):
        result[i] = g
    return (*result, None, None, None)


torch.library.register_autograd("bn_ext::batch_norm_backward", _backward_backward, setup_context=_backward_setup)
