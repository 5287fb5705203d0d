"""One multiplicative layer of an MFN: z_i = (A_i z_{i-1} + c_i) * g_i(x)."""

from __future__ import annotations

import torch

from fieldkern.backend import resolve
from fieldkern.ops._precision import get_precision
from fieldkern.checks import check_dtype, check_floating, check_shape
from fieldkern.ops.filters import (
    _check_filter_args,
    fourier_filter_reference,
    gabor_filter_reference,
)


def multiplicative_layer_reference(z, linear_weight, linear_bias, x, weight, bias, gamma=None, mu=None):
    lin = torch.nn.functional.linear(z, linear_weight, linear_bias)
    if gamma is None:
        return lin * fourier_filter_reference(x, weight, bias)
    return lin * gabor_filter_reference(x, weight, bias, gamma, mu)


def multiplicative_layer(
    z: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gamma: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(z A^T + c) * g(x)`` with ``g`` a Fourier filter, or a Gabor filter when
    ``gamma`` and ``mu`` are given.

    Args:
        z: previous hidden features ``(..., h_in)``.
        linear_weight: ``A`` ``(h, h_in)``; linear_bias: ``c`` ``(h,)`` or None.
        x: coordinates ``(..., d)`` with the same leading shape as ``z``.
        weight, bias, gamma, mu: the filter's parameters, as in :func:`gabor_filter`.

    Returns:
        ``(..., h)``.
    """
    if (gamma is None) != (mu is None):
        raise ValueError("gamma and mu must be given together (Gabor) or both be None (Fourier)")
    _check_filter_args(x, weight, bias, gamma, mu)
    hidden = weight.shape[0]
    check_floating("z", z)
    check_dtype("z", z, weight.dtype)
    check_shape("linear_weight", linear_weight, (hidden, z.shape[-1]), weight.dtype)
    check_shape("linear_bias", linear_bias, (hidden,), weight.dtype)
    if z.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"z and x must have the same leading shape, got {tuple(z.shape)} and {tuple(x.shape)}"
        )
    if resolve("multiplicative_layer", z, x) == "triton" and torch.float64 not in (z.dtype, x.dtype):
        return _multiplicative_layer_triton(z, linear_weight, linear_bias, x, weight, bias, gamma, mu)
    return multiplicative_layer_reference(z, linear_weight, linear_bias, x, weight, bias, gamma, mu)


# --- Triton path: torch.library custom ops (see fieldkern/ops/mfn_stack.py for why
# custom_op). float64 inputs take the reference; half inputs are computed in fp32.


@torch.library.custom_op("fieldkern::multiplicative_layer", mutates_args=())
def _multiplicative_layer_op(
    z: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor | None,
    mu: torch.Tensor | None, precision: str,
) -> torch.Tensor:
    from fieldkern.kernels.multiplicative_layer import multiplicative_layer_forward

    return multiplicative_layer_forward(z, linear_weight, linear_bias, x, weight, bias, gamma,
                                        mu, precision)


@_multiplicative_layer_op.register_fake
def _(z, linear_weight, linear_bias, x, weight, bias, gamma, mu, precision):
    return z.new_empty((z.shape[0], linear_weight.shape[0]))


@torch.library.custom_op("fieldkern::multiplicative_layer_backward", mutates_args=())
def _multiplicative_layer_backward_op(
    grad: torch.Tensor, z: torch.Tensor, linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    gamma: torch.Tensor | None, mu: torch.Tensor | None, need_dw: bool, precision: str,
) -> list[torch.Tensor]:
    """[dz, dA, dc, dx, dW, db, dgamma, dmu]; absent ones (no c / Fourier) are empty."""
    from fieldkern.kernels.multiplicative_layer import multiplicative_layer_backward

    grads = multiplicative_layer_backward(grad, z, linear_weight, linear_bias, x, weight, bias,
                                          gamma, mu, need_dw, precision)
    return [g if g is not None else z.new_empty((0,)) for g in grads]


@_multiplicative_layer_backward_op.register_fake
def _(grad, z, linear_weight, linear_bias, x, weight, bias, gamma, mu, need_dw, precision):
    def like(t):
        return z.new_empty(t.shape) if t is not None else z.new_empty((0,))

    return [like(z), like(linear_weight), like(linear_bias), like(x), like(weight), like(bias),
            like(gamma), like(mu)]


def _ml_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.precision = inputs[8]


def _ml_autograd_backward(ctx, grad):
    z, a, c, x, w, b, gamma, mu = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.fieldkern.multiplicative_layer_backward(
        grad.contiguous(), z, a, c, x, w, b, gamma, mu, bool(need[4]), ctx.precision)
    out = [g if n and t is not None else None
           for g, n, t in zip(grads, need, (z, a, c, x, w, b, gamma, mu))]
    return (*out, None)


torch.library.register_autograd("fieldkern::multiplicative_layer", _ml_autograd_backward,
                                setup_context=_ml_setup_context)


def _f32(t):
    return t.float().contiguous() if t is not None else None


def _multiplicative_layer_triton(z, linear_weight, linear_bias, x, weight, bias, gamma, mu):
    lead = z.shape[:-1]
    out = torch.ops.fieldkern.multiplicative_layer(
        _f32(z.reshape(-1, z.shape[-1])), _f32(linear_weight), _f32(linear_bias),
        _f32(x.reshape(-1, x.shape[-1])), _f32(weight), _f32(bias), _f32(gamma), _f32(mu),
        get_precision(),
    )
    return out.reshape(*lead, weight.shape[0]).to(z.dtype)
