"""Sinusoidal filters g(x) of multiplicative filter networks."""

from __future__ import annotations

import torch

from fieldkern.backend import resolve
from fieldkern.ops._checks import check_coordinates, check_shape


def _check_filter_args(x, weight, bias, gamma=None, mu=None):
    hidden, in_features = weight.shape
    check_coordinates(x, in_features)
    check_shape("weight", weight, (hidden, in_features))
    check_shape("bias", bias, (hidden,))
    check_shape("gamma", gamma, (hidden,))
    check_shape("mu", mu, (hidden, in_features))


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
    resolve("fourier_filter", x)
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
    resolve("gabor_filter", x)
    return gabor_filter_reference(x, weight, bias, gamma, mu)
