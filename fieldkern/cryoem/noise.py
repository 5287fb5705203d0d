"""Additive white Gaussian noise at a target signal-to-noise ratio.

SNR is defined as ``var(signal) / var(noise)``, where ``var(signal)`` is the variance of
the clean (projected, CTF-filtered) pixel values over the **whole box** -- background
included, so the same molecule in a larger box has a lower signal variance and gets
less noise for the same SNR. By default the variance is taken over the **whole data set**
(all pixels of all images, one noise level for every image, as a microscope would give;
this is also cryoDRGN's ``add_noise``); ``per_image=True`` uses each image's own
variance instead.
"""

from __future__ import annotations

import torch

from fieldkern.checks import check_positive
from fieldkern.cryoem._checks import check_images


def noise_sigma(images: torch.Tensor, snr: float, per_image: bool = False) -> torch.Tensor:
    """Noise standard deviation ``sqrt(var(signal) / snr)`` for clean ``images`` ``(..., D, D)``.

    Returns a 0-dim tensor (data-set level) or ``(..., 1, 1)`` with ``per_image=True``.
    The variance is the population variance (divide by the number of pixels).
    """
    check_images("images", images)
    snr = check_positive("snr", snr)
    x = images.to(torch.float64)
    if per_image:
        var = x.var(dim=(-2, -1), unbiased=False, keepdim=True)
    else:
        var = x.var(unbiased=False)
    return torch.sqrt(var / snr).to(images.dtype)


def add_noise(
    images: torch.Tensor,
    snr: float,
    generator: torch.Generator | None = None,
    per_image: bool = False,
) -> torch.Tensor:
    """``images + sigma * N(0, 1)`` with ``sigma = noise_sigma(images, snr, per_image)``.

    Args:
        images: clean images ``(..., D, D)``.
        snr: target ``var(signal) / var(noise)`` (the paper uses 0.1).
        generator: seeded ``torch.Generator`` on the images' device (None: global RNG).
        per_image: per-image instead of data-set signal variance (see module docstring).

    Returns a new tensor of the images' shape and dtype.
    """
    sigma = noise_sigma(images, snr, per_image)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return images + sigma * noise
