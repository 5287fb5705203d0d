"""Filter modules g(x): Fourier sin(Wx + b) and Gabor exp(-gamma/2 |x - mu|^2) sin(Wx + b)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fieldkern import ops
from fieldkern.checks import is_int


def _check_features(**kwargs) -> None:
    for name, value in kwargs.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class FourierFilter(nn.Module):
    """``g(x) = sin(x W^T + b)``: ``x (..., in_features) -> (..., out_features)``.

    Frequencies ``weight`` (rad per unit length) start ``U(-max_frequency, max_frequency)``
    per entry; phases ``bias`` start ``U(-pi, pi)`` and are trained. With
    ``trainable_frequencies=False`` (the band-limited models' choice) ``weight`` is a
    buffer: it is saved in the state dict but is not a parameter, so no optimiser can
    move it and ``requires_grad_()`` on the model cannot unfreeze it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_frequency: float = 32 * math.pi,
        trainable_frequencies: bool = False,
    ):
        super().__init__()
        _check_features(in_features=in_features, out_features=out_features)
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.empty(out_features, in_features).uniform_(-max_frequency, max_frequency)
        if trainable_frequencies:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-math.pi, math.pi))

    @property
    def trainable_frequencies(self) -> bool:
        return isinstance(self.weight, nn.Parameter)

    @torch.no_grad()
    def set_frequencies(self, weight: torch.Tensor) -> None:
        """Overwrite the frequencies in place, ``(out_features, in_features)``."""
        # copy_ would broadcast a single row to every filter
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight must have shape {tuple(self.weight.shape)}, got {tuple(weight.shape)}")
        self.weight.copy_(weight)

    def filter_tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensors the filter ops take: weight, bias, gamma, mu (None for Fourier)."""
        return {"weight": self.weight, "bias": self.bias, "gamma": None, "mu": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fourier_filter(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable_frequencies={self.trainable_frequencies}")


class GaborFilter(FourierFilter):
    """``g(x) = exp(-gamma/2 |x - mu|^2) sin(x W^T + b)``.

    Envelope centres ``mu`` start ``U(-0.5, 0.5)`` (the coordinate domain) and precisions
    ``gamma`` start ``Gamma(gamma_concentration, gamma_rate)``, as in Fathony et al. 2021
    rescaled from their [-1, 1] domain to ours (rate / 4). Both are trained. The envelope
    widens each frequency by a Gaussian of standard deviation ``sqrt(gamma)`` rad per unit
    length, so Gabor models are only approximately band-limited.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_frequency: float = 32 * math.pi,
        trainable_frequencies: bool = False,
        gamma_concentration: float = 1.0,
        gamma_rate: float = 0.25,
    ):
        super().__init__(in_features, out_features, max_frequency, trainable_frequencies)
        for name, value in (("gamma_concentration", gamma_concentration), ("gamma_rate", gamma_rate)):
            if not 0 < value < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        gamma = torch.distributions.Gamma(
            torch.full((out_features,), float(gamma_concentration)), torch.tensor(float(gamma_rate))
        ).sample()
        self.gamma = nn.Parameter(gamma)
        self.mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-0.5, 0.5))

    def filter_tensors(self) -> dict[str, torch.Tensor | None]:
        return {"weight": self.weight, "bias": self.bias, "gamma": self.gamma, "mu": self.mu}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gabor_filter(x, self.weight, self.bias, self.gamma, self.mu)


FILTERS = {"fourier": FourierFilter, "gabor": GaborFilter}
