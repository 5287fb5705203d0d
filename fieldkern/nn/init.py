"""Frequency initialisations and the band limits they guarantee (the paper's method section; BACON, Lindell et al. 2022).

All frequencies are in radians per unit length of the [-0.5, 0.5) coordinate domain, so
the Nyquist frequency of an N-sample grid is pi * N.
"""

from __future__ import annotations

import itertools
import math

import torch


def neighbour_directions(dim: int) -> torch.Tensor:
    """Half-space neighbour directions of the integer lattice, ``(n, dim)``.

    The nonzero vectors of ``{-1, 0, 1}^dim`` whose first nonzero entry is positive:
    1D: (1,); 2D: 4 directions; 3D: the 13 of the 26-neighbourhood.
    """
    dirs = [
        v for v in itertools.product((-1, 0, 1), repeat=dim)
        if any(v) and next(c for c in v if c != 0) > 0
    ]
    return torch.tensor(dirs, dtype=torch.float32)


def growth_factor(lambda1: float, lambda2: float) -> float:
    """c = 1 + lambda1 + lambda2: each layer multiplies the band limit by c."""
    return 1.0 + lambda1 + lambda2


def residual_band_limits(n_layers: int, resolution: int, lambda1: float, lambda2: float) -> list[float]:
    """Band of scale k under the new init: ``B_k = pi N / c^(L-1-k)``."""
    c = growth_factor(lambda1, lambda2)
    return [math.pi * resolution / c ** (n_layers - 1 - k) for k in range(n_layers)]


def residual_frequencies(
    hidden: int, dim: int, n_layers: int, resolution: int, lambda1: float, lambda2: float
) -> list[torch.Tensor]:
    """The residual MFN's "new init" of the filter frequencies, one ``(hidden, dim)`` per layer.

    ``W_0 ~ U(-B_0, B_0)``; ``W_i = lambda1 U(-B_{i-1}, B_{i-1}) + lambda2 B_{i-1} r`` with
    ``r`` a neighbour direction drawn per row, so ``max |W_i|`` per axis is at most
    ``(c - 1) B_{i-1}`` and the frequencies of layers ``0..k`` sum to at most ``B_k``.
    """
    bands = residual_band_limits(n_layers, resolution, lambda1, lambda2)
    dirs = neighbour_directions(dim)
    weights = [torch.empty(hidden, dim).uniform_(-bands[0], bands[0])]
    for i in range(1, n_layers):
        prev = bands[i - 1]
        r = dirs[torch.randint(len(dirs), (hidden,))]
        weights.append(lambda1 * torch.empty(hidden, dim).uniform_(-prev, prev) + lambda2 * prev * r)
    return weights


def bacon_init_band_limits(n_layers: int, resolution: int, lambda1: float, lambda2: float) -> list[float]:
    """Bands of the residual MFN's "BACON init": ``pi N (c^-(L-1-k) - c^-L)``."""
    c = growth_factor(lambda1, lambda2)
    return [math.pi * resolution * (c ** -(n_layers - 1 - k) - c ** -n_layers) for k in range(n_layers)]


def bacon_init_frequencies(
    hidden: int, dim: int, n_layers: int, resolution: int, lambda1: float, lambda2: float
) -> list[torch.Tensor]:
    """``W_i ~ U(-pi N s_i, pi N s_i)`` with ``s_i = c^-(L-1-i) - c^-(L-i)``."""
    c = growth_factor(lambda1, lambda2)
    out = []
    for i in range(n_layers):
        bound = math.pi * resolution * (c ** -(n_layers - 1 - i) - c ** -(n_layers - i))
        out.append(torch.empty(hidden, dim).uniform_(-bound, bound))
    return out


def bacon_quantum(n_layers: int, resolution: int) -> int:
    """Largest integer m with L layers of frequencies up to 2 pi m fitting under pi N."""
    return resolution // (2 * n_layers)


def bacon_band_limits(n_layers: int, resolution: int) -> list[float]:
    """BACON's bands: ``B_k = (k + 1) 2 pi m`` with ``m = floor(N / 2L)``."""
    m = bacon_quantum(n_layers, resolution)
    return [(k + 1) * 2 * math.pi * m for k in range(n_layers)]


def bacon_frequencies(hidden: int, dim: int, n_layers: int, resolution: int) -> list[torch.Tensor]:
    """BACON (Lindell et al. 2022): integer multiples of 2 pi in ``[-2 pi m, 2 pi m]``.

    Integer multiples of 2 pi make every output periodic on the unit cell; splitting the
    Nyquist band equally over the layers gives scale k the band ``(k + 1) / L`` of Nyquist.
    """
    m = bacon_quantum(n_layers, resolution)
    return [2 * math.pi * torch.randint(-m, m + 1, (hidden, dim)).float() for _ in range(n_layers)]


def mfn_frequencies(hidden: int, dim: int, n_layers: int, input_scale: float) -> list[torch.Tensor]:
    """MFN (Fathony et al. 2021): ``U(-1, 1) / sqrt(dim) * input_scale / sqrt(L)`` per entry."""
    bound = input_scale / math.sqrt(dim) / math.sqrt(n_layers)
    return [torch.empty(hidden, dim).uniform_(-bound, bound) for _ in range(n_layers)]


@torch.no_grad()
def siren_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))``: keeps the variance of z_i near 1/2."""
    bound = math.sqrt(6.0 / weight.shape[1])
    return weight.uniform_(-bound, bound)
