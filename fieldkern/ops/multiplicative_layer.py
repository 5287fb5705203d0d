"""One multiplicative layer of an MFN: z_i = (A_i z_{i-1} + c_i) * g_i(x)."""

from __future__ import annotations

import torch

from fieldkern.backend import resolve
from fieldkern.ops._checks import check_floating, check_shape
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
    check_shape("linear_weight", linear_weight, (hidden, z.shape[-1]))
    check_shape("linear_bias", linear_bias, (hidden,))
    if z.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"z and x must have the same leading shape, got {tuple(z.shape)} and {tuple(x.shape)}"
        )
    resolve("multiplicative_layer", z, x)
    return multiplicative_layer_reference(z, linear_weight, linear_bias, x, weight, bias, gamma, mu)
