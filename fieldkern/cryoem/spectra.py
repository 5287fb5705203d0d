"""What the trainer fits: the particles' spectra (normalised, and phase-shifted so that each
particle sits at the box centre) and the Gaussian low-pass of each stage.

Losses are computed in Fourier space, so each rank transforms its particles once. The images
are divided by the standard deviation of all particles (over every rank: the same numbers
whatever the number of processes), a fixed gain that keeps Adam's default scales meaningful.
"""

from __future__ import annotations

import torch

from fieldkern.cryoem.fourier import fft2_centered, shift_phases
from fieldkern.distributed import DistContext

#: Images per float64 copy (statistics) and per phase-ramp product (shifts): bounds the temporaries.
_CHUNK = 1024


def lowpass_sigma(stage: int, n_scales: int, D: int, lambda1: float, lambda2: float) -> float:
    """Width (Fourier pixels) of the Gaussian low-pass applied to the data at ``stage``:
    ``sigma = band * D / 3`` with ``band = 1 / c^(L-1-stage)`` the scale's fraction of Nyquist."""
    c = 1 + lambda1 + lambda2
    return D / 3 / c ** (n_scales - 1 - stage)


#: A stage's band edge in units of its low-pass width: the edge ``band * D / 2`` (the
#: scale's fraction of Nyquist, in Fourier shells) is ``1.5 sigma``, where the Gaussian is 0.32.
BAND_EDGE_SIGMAS = 1.5


def band_edge(stage: int, n_scales: int, D: int, lambda1: float, lambda2: float) -> float:
    """The highest frequency of ``stage``'s band, Fourier shells: ``band * D / 2``
    (:func:`lowpass_sigma`'s band; ``D / 2``, Nyquist, at the last stage)."""
    return BAND_EDGE_SIGMAS * lowpass_sigma(stage, n_scales, D, lambda1, lambda2)


def gaussian_filter(D: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``exp(-|k|^2 / (2 sigma^2))`` on the centred ``D x D`` frequency grid, ``|k|`` in Fourier pixels."""
    k = torch.arange(D, device=device, dtype=dtype) - D // 2
    return torch.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * sigma**2))


def global_mean_std(local: torch.Tensor, count: int, dist: DistContext) -> tuple[float, float]:
    """Mean and standard deviation (``count - 1`` degrees of freedom) of the pixels of every
    rank's images, ``local`` ``(n, D, D)`` being this rank's and ``count`` the pixels of all:
    two passes in float64. Every rank must call it."""
    chunks = local.split(_CHUNK)
    zero = torch.zeros((), dtype=torch.float64)
    mean = dist.all_reduce_sum(sum((c.sum(dtype=torch.float64) for c in chunks), zero).reshape(1))[0] / count
    ss = dist.all_reduce_sum(sum(((c.to(torch.float64) - mean).square().sum() for c in chunks), zero).reshape(1))[0]
    return float(mean), float((ss / max(count - 1, 1)).sqrt())


def particle_spectra(local: torch.Tensor, std: float, shifts: torch.Tensor | None, device) -> torch.Tensor:
    """Centred spectra ``(n, D, D)`` complex64 on ``device`` of the images ``local / std``, each
    moved by its row of ``shifts`` ``(n, 2)`` (pixels, ``x`` then ``y``; a phase ramp, so
    sub-pixel shifts are exact) when given."""
    spectra = fft2_centered((local / torch.tensor(std, dtype=torch.float32)).to(device))
    if shifts is not None and bool(shifts.any()):
        D = local.shape[-1]
        for i, t in zip(range(0, len(spectra), _CHUNK), shifts.split(_CHUNK)):
            spectra[i:i + len(t)] *= shift_phases(t, D).to(device)
    return spectra


__all__ = ["BAND_EDGE_SIGMAS", "band_edge", "gaussian_filter", "global_mean_std", "lowpass_sigma", "particle_spectra"]
