"""Sinusoidal filters g(x) of multiplicative filter networks."""

from __future__ import annotations

import torch

from fieldkern.backend import resolve
from fieldkern.checks import check_coordinates, check_shape, check_weight


def _check_filter_args(x, weight, bias, gamma=None, mu=None):
    hidden, in_features = check_weight("weight", weight)
    dtype = weight.dtype
    check_coordinates(x, in_features, dtype=dtype)
    check_shape("bias", bias, (hidden,), dtype)
    check_shape("gamma", gamma, (hidden,), dtype)
    check_shape("mu", mu, (hidden, in_features), dtype)


def gabor_envelope_reference(x, gamma, mu):
    """exp(-gamma/2 |x - mu|^2) for x (..., d), gamma (h,), mu (h, d) -> (..., h)."""
    # Difference form, not the |x|^2 - 2 x.mu + |mu|^2 expansion: exact near x = mu.
    sq = ((x.unsqueeze(-2) - mu) ** 2).sum(-1)
    return torch.exp(-0.5 * gamma * sq)


def fourier_filter_reference(x, weight, bias):
    return torch.sin(torch.nn.functional.linear(x, weight, bias))


def gabor_filter_reference(x, weight, bias, gamma, mu):
    return gabor_envelope_reference(x, gamma, mu) * fourier_filter_reference(x, weight, bias)


def fourier_filter(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fourier filter ``sin(x W^T + b)``.

    Args:
        x: coordinates ``(..., d)``.
        weight: frequencies ``W`` ``(h, d)``, radians per unit length.
        bias: phases ``b`` ``(h,)``, radians.

    Returns:
        ``(..., h)``.
    """
    _check_filter_args(x, weight, bias)
    if resolve("fourier_filter", x) == "triton" and x.dtype != torch.float64:
        return _filter_triton(x, weight, bias, None, None)
    return fourier_filter_reference(x, weight, bias)


def gabor_filter(x, weight, bias, gamma, mu) -> torch.Tensor:
    """Gabor filter ``exp(-gamma/2 |x - mu|^2) * sin(x W^T + b)``.

    Args:
        x: coordinates ``(..., d)``.
        weight: frequencies ``(h, d)``, radians per unit length.
        bias: phases ``(h,)``, radians.
        gamma: envelope precisions ``(h,)``, per squared unit length.
        mu: envelope centres ``(h, d)``, in coordinate units.

    Returns:
        ``(..., h)``.
    """
    _check_filter_args(x, weight, bias, gamma, mu)
    if resolve("gabor_filter", x) == "triton" and x.dtype != torch.float64:
        return _filter_triton(x, weight, bias, gamma, mu)
    return gabor_filter_reference(x, weight, bias, gamma, mu)


# --- Triton path: torch.library custom ops (see fieldkern/ops/mfn_stack.py for why
# custom_op). float64 inputs take the reference (the kernels compute in fp32); float16 /
# bfloat16 are computed in fp32 and the output cast back.


@torch.library.custom_op("fieldkern::fourier_filter", mutates_args=())
def _fourier_filter_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from fieldkern.kernels.filters import filter_forward

    return filter_forward(x, weight, bias)


@torch.library.custom_op("fieldkern::gabor_filter", mutates_args=())
def _gabor_filter_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     gamma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    from fieldkern.kernels.filters import filter_forward

    return filter_forward(x, weight, bias, gamma, mu)


@torch.library.custom_op("fieldkern::fourier_filter_backward", mutates_args=())
def _fourier_filter_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor, need_dw: bool) -> list[torch.Tensor]:
    """[dx, dW, db]"""
    from fieldkern.kernels.filters import filter_backward_launch

    return list(filter_backward_launch(grad, x, weight, bias, None, None, need_dw)[:3])


@torch.library.custom_op("fieldkern::gabor_filter_backward", mutates_args=())
def _gabor_filter_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, gamma: torch.Tensor, mu: torch.Tensor,
                              need_dw: bool) -> list[torch.Tensor]:
    """[dx, dW, db, dgamma, dmu]"""
    from fieldkern.kernels.filters import filter_backward_launch

    return list(filter_backward_launch(grad, x, weight, bias, gamma, mu, need_dw))


@_fourier_filter_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_gabor_filter_op.register_fake
def _(x, weight, bias, gamma, mu):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_fourier_filter_backward_op.register_fake
def _(grad, x, weight, bias, need_dw):
    return [x.new_empty(x.shape), x.new_empty(weight.shape), x.new_empty(bias.shape)]


@_gabor_filter_backward_op.register_fake
def _(grad, x, weight, bias, gamma, mu, need_dw):
    return [x.new_empty(x.shape), x.new_empty(weight.shape), x.new_empty(bias.shape),
            x.new_empty(gamma.shape), x.new_empty(mu.shape)]


def _filter_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fourier_filter_autograd_backward(ctx, grad):
    x, w, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.fieldkern.fourier_filter_backward(grad.contiguous(), x, w, b, bool(need[1]))
    return tuple(g if n else None for g, n in zip(grads, need))


def _gabor_filter_autograd_backward(ctx, grad):
    x, w, b, gamma, mu = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.fieldkern.gabor_filter_backward(grad.contiguous(), x, w, b, gamma, mu,
                                                      bool(need[1]))
    return tuple(g if n else None for g, n in zip(grads, need))


torch.library.register_autograd("fieldkern::fourier_filter", _fourier_filter_autograd_backward,
                                setup_context=_filter_setup_context)
torch.library.register_autograd("fieldkern::gabor_filter", _gabor_filter_autograd_backward,
                                setup_context=_filter_setup_context)


def _f32(t):
    return t.float().contiguous()


def _filter_triton(x, weight, bias, gamma, mu):
    lead = x.shape[:-1]
    xf = _f32(x.reshape(-1, x.shape[-1]))
    if gamma is None:
        out = torch.ops.fieldkern.fourier_filter(xf, _f32(weight), _f32(bias))
    else:
        out = torch.ops.fieldkern.gabor_filter(xf, _f32(weight), _f32(bias), _f32(gamma), _f32(mu))
    return out.reshape(*lead, weight.shape[0]).to(x.dtype)
