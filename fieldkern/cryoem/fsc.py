"""Fourier shell correlation and resolution.

Shells (the paper's appendix C): a voxel whose centred frequency index (Fourier pixels)
is ``k`` belongs to shell ``round(|k|)``; shells ``r = 0 .. D/2 - 1`` are reported and
frequencies with ``round(|k|) >= D/2`` (the corners) are ignored. (``|k|^2`` is an integer,
so ``|k|`` is never exactly half-integer and the rounding is unambiguous.) Shell ``r`` is
the spatial frequency ``r / (D apix)`` 1/A, i.e. a resolution of ``D apix / r`` A.
This differs from cryoDRGN, whose shell ``i`` holds ``i - 1 <= |k| < i``.
"""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_count, check_finite, check_floating, check_positive


def shell_indices(D: int, ndim: int = 3, device=None) -> torch.Tensor:
    """Shell index ``round(|k|)`` of every frequency of an **unshifted** ``fftn`` of size ``D^ndim``."""
    D = check_count("D", D)
    ndim = check_count("ndim", ndim)
    k = torch.fft.fftfreq(D, 1.0 / D, device=device, dtype=torch.float64)
    grids = torch.meshgrid(*([k] * ndim), indexing="ij")
    r2 = sum(g * g for g in grids)
    return torch.round(torch.sqrt(r2)).to(torch.long)


def fourier_shell_correlation(v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FSC between two maps ``(D, D, D)`` (or FRC between two images ``(D, D)``).

    ``FSC(r) = Re sum_{S_r} F1 F2* / sqrt(sum_{S_r} |F1|^2 sum_{S_r} |F2|^2)`` over the shells
    of the module docstring. Returns ``(shells, fsc)``: ``shells = arange(D//2)`` (long) and
    ``fsc`` float64 ``(D//2,)``. A shell where either map has no power gets FSC 0; maps holding
    NaN or inf raise ValueError.
    Computed in float64; not differentiable by design (an evaluation metric).
    """
    check_floating("v1", v1)
    check_floating("v2", v2)
    if v1.shape != v2.shape:
        raise ValueError(f"v1 and v2 must have the same shape, got {tuple(v1.shape)} and {tuple(v2.shape)}")
    if v1.dim() not in (2, 3) or len(set(v1.shape)) != 1:
        raise ValueError(f"v1 must be a cubic volume (D, D, D) or square image (D, D), got {tuple(v1.shape)}")
    D = v1.shape[0]
    if D % 2 or D < 2:
        raise ValueError(f"v1 must have an even size D, got D = {D}")
    ndim = v1.dim()
    # A non-finite voxel makes every Fourier coefficient NaN, and every shell would read 0.
    check_finite("v1", v1)
    check_finite("v2", v2)
    with torch.no_grad():
        # The real part of F1 F2* and the powers do not depend on where the origin is, so
        # the unshifted transform is enough.
        f1 = torch.fft.fftn(v1.detach().to(torch.float64))
        f2 = torch.fft.fftn(v2.detach().to(torch.float64).to(v1.device))
        shells = shell_indices(D, ndim, device=f1.device).reshape(-1)
        keep = shells < D // 2
        idx = shells[keep]
        n = D // 2
        cross = torch.bincount(idx, weights=(f1 * f2.conj()).real.reshape(-1)[keep], minlength=n)
        p1 = torch.bincount(idx, weights=(f1.abs() ** 2).reshape(-1)[keep], minlength=n)
        p2 = torch.bincount(idx, weights=(f2.abs() ** 2).reshape(-1)[keep], minlength=n)
        den = torch.sqrt(p1 * p2)
        fsc = torch.where(
            den > 0, cross / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den)
        )
    return torch.arange(n, device=fsc.device), fsc


def resolution(fsc: torch.Tensor, apix: float, threshold: float = 0.5, D: int | None = None) -> float:
    """Resolution in A where the FSC first drops below ``threshold``.

    The first shell ``r >= 1`` with ``fsc[r] < threshold`` is found and the crossing is
    linearly interpolated between shells ``r - 1`` and ``r``; the result is
    ``D * apix / r_cross``. Conventions for the edge cases: if the curve never drops below
    the threshold the Nyquist limit ``2 * apix`` is returned (the map is at least that
    good); if ``fsc[0] < threshold``, ``inf``. Use 0.5 against a ground truth, 0.143
    between half maps.

    Args:
        fsc: ``(D//2,)`` curve from :func:`fourier_shell_correlation`.
        apix: pixel size in A.
        threshold: FSC criterion.
        D: box size (default ``2 * len(fsc)``).
    """
    check_floating("fsc", fsc)
    if fsc.dim() != 1 or fsc.numel() < 2:
        raise ValueError(f"fsc must be a 1D curve with at least 2 shells, got shape {tuple(fsc.shape)}")
    apix = check_positive("apix", apix)
    D = 2 * fsc.numel() if D is None else int(D)
    f = fsc.detach().to(torch.float64).cpu()
    # every comparison with NaN is False: the curve would "never drop" and give Nyquist
    check_finite("fsc", f, hint=" (was one of the maps NaN?)")
    if f[0] < threshold:
        return math.inf
    below = torch.nonzero(f[1:] < threshold)
    if below.numel() == 0:
        return 2.0 * apix
    r = int(below[0, 0]) + 1
    f0, f1 = float(f[r - 1]), float(f[r])
    r_cross = (r - 1) + (f0 - threshold) / (f0 - f1)
    return math.inf if r_cross <= 0 else D * apix / r_cross
