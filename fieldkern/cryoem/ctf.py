"""Contrast transfer function (weak-phase model) and its application to images.

Formula (cryoDRGN's ``compute_ctf``, the same physics as RELION):

* wavelength ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` A, V in volts
  (0.0196876 A at 300 kV). These are RELION's constants; cryoDRGN rounds them to 12.2639
  and 0.97845e-6, which makes its lambda ~3.6e-5 (relative) smaller at 300 kV: a
  defocus-phase difference of ~7e-3 rad at Nyquist of a 1 A pixel, 20000 A defocus.
* Centred frequency grid: ``kx = (j - D//2) / (D apix)`` along image **columns** (x),
  ``ky = (i - D//2) / (D apix)`` along **rows** (y); ``s = |k|``, ``alpha = atan2(ky, kx)``.
* ``df = 0.5 (dfU + dfV + (dfU - dfV) cos(2 (alpha - dfang)))`` (dfang in degrees,
  measured from the x axis towards y; along ``alpha = dfang`` the defocus is dfU).
* ``gamma = 2 pi (-0.5 df lambda s^2 + 0.25 Cs lambda^3 s^4) - phase_shift`` (Cs in mm ->
  A, phase_shift in degrees -> rad).
* ``CTF = sqrt(1 - w^2) sin(gamma) - w cos(gamma)``, so ``CTF(0) = -w``; times the
  envelope ``exp(-B s^2 / 4)`` for a B-factor ``B`` in A^2.

Sign: RELION's ``CTF::getCTF`` returns ``-sin(gamma - atan(w / sqrt(1 - w^2)))``, which is
exactly ``-1`` times this CTF (``+w`` at the origin). The overall sign fixes the contrast
of the simulated particles (here protein density comes out dark at low frequency, as in a
raw micrograph); RELION-extracted particles are usually contrast-inverted (white), which is
why cryoDRGN inverts such data by default (see ``load_particles(invert=...)``).

All internal arithmetic is float64 (gamma reaches hundreds of radians); the result is
cast to ``dtype``.
"""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_box_size, check_finite, check_positive
from fieldkern.cryoem._checks import (
    check_amplitude_contrast,
    check_defocus_angstrom,
    check_images,
    check_voltage_kv,
)
from fieldkern.cryoem.fourier import fft2_centered, ifft2_centered

#: RELION's wavelength constants (A * sqrt(V) and 1/V).
WAVELENGTH_CONSTANT = 12.2643247
RELATIVISTIC_CONSTANT = 0.978466e-6


def electron_wavelength(volt: float | torch.Tensor) -> float | torch.Tensor:
    """Relativistic electron wavelength in A for an acceleration voltage in **kV**.

    ``12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` with V in volts; 300 kV -> 0.0196876 A.
    """
    if isinstance(volt, torch.Tensor):
        v = volt.to(torch.float64) * 1000.0
        return WAVELENGTH_CONSTANT / torch.sqrt(v * (1 + RELATIVISTIC_CONSTANT * v))
    v = check_positive("volt", volt) * 1000.0
    return WAVELENGTH_CONSTANT / math.sqrt(v * (1 + RELATIVISTIC_CONSTANT * v))


def ctf_frequencies(D: int, apix: float, device=None, dtype: torch.dtype = torch.float64):
    """Centred spatial-frequency grids ``(kx, ky)`` in 1/A, each ``(D, D)`` indexed ``[y, x]``.

    ``kx[i, j] = (j - D//2) / (D apix)`` (columns), ``ky[i, j] = (i - D//2) / (D apix)`` (rows).
    """
    D = check_box_size("D", D)
    apix = check_positive("apix", apix)
    k = (torch.arange(D, device=device, dtype=dtype) - D // 2) / (D * apix)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return kx, ky


def _param(name: str, x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got {x.dtype}")
        t = x
    else:
        if isinstance(x, bool):
            raise TypeError(f"{name} must be a number or tensor, got bool")
        try:
            # built on the host first, so numbers and sequences are checked without a device sync
            t = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a number, sequence or tensor, got {type(x).__name__}") from e
    if t.device.type == "cpu":
        # Values on a GPU are not checked: that would stall every training batch on a sync.
        _check_values(name, t)
    return t.to(device=device, dtype=torch.float64)


def _check_values(name: str, t: torch.Tensor) -> None:
    """NaN/inf and the unit mistakes that still give a plausible-looking CTF (V for kV,
    um for A), which would otherwise pass silently into the images or the loss."""
    check_finite(name, t)
    if name == "volt":
        check_voltage_kv(name, t)
    elif name in ("dfu", "dfv"):
        check_defocus_angstrom(name, t)
    elif name == "w":
        check_amplitude_contrast(name, t)


def evaluate_ctf(
    kx: torch.Tensor,
    ky: torch.Tensor,
    dfu,
    dfv,
    dfang,
    volt=300.0,
    cs=2.7,
    w=0.1,
    phase_shift=0.0,
    bfactor=0.0,
) -> torch.Tensor:
    """CTF at arbitrary spatial frequencies ``(kx, ky)`` in 1/A (float64).

    The parameters (same units as :func:`ctf`) broadcast against each other to a batch
    shape ``S``; ``kx``/``ky`` (shape ``F``) broadcast against ``S + (1,) * len(F)``.
    Returns ``S + F``. The parameters are checked as in :func:`ctf`.
    """
    device = kx.device
    p = [
        _param(n, x, device)
        for n, x in (
            ("dfu", dfu),
            ("dfv", dfv),
            ("dfang", dfang),
            ("volt", volt),
            ("cs", cs),
            ("w", w),
            ("phase_shift", phase_shift),
            ("bfactor", bfactor),
        )
    ]
    try:
        p = torch.broadcast_tensors(*p)
    except RuntimeError as e:
        shapes = [tuple(t.shape) for t in p]
        raise ValueError(f"CTF parameters must broadcast to one batch shape, got shapes {shapes}") from e
    dfu, dfv, dfang, volt, cs, w, phase_shift, bfactor = p
    extra = (1,) * kx.dim()
    expand = lambda t: t.reshape(t.shape + extra)  # noqa: E731
    kx = kx.to(torch.float64)
    ky = ky.to(torch.float64)
    lam = expand(electron_wavelength(volt))
    cs_a = expand(cs * 1e7)
    s2 = kx * kx + ky * ky
    alpha = torch.atan2(ky, kx)
    df = 0.5 * (expand(dfu + dfv) + expand(dfu - dfv) * torch.cos(2 * (alpha - expand(torch.deg2rad(dfang)))))
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs_a * lam**3 * s2 * s2) - expand(
        torch.deg2rad(phase_shift)
    )
    w = expand(w)
    out = torch.sqrt(1 - w * w) * torch.sin(gamma) - w * torch.cos(gamma)
    return out * torch.exp(-expand(bfactor) / 4 * s2)


def ctf(
    D: int,
    apix: float,
    dfu,
    dfv,
    dfang,
    volt=300.0,
    cs=2.7,
    w=0.1,
    phase_shift=0.0,
    bfactor=0.0,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Centred 2D CTF on a ``D x D`` grid, batched over the parameters: ``(..., D, D)``.

    Args:
        D: image size (even); ``apix``: pixel size in A.
        dfu, dfv: defocus U/V in A (positive = underfocus); dfang: astigmatism angle in
            degrees; volt: kV; cs: spherical aberration in mm; w: amplitude contrast;
            phase_shift: degrees; bfactor: A^2. Each a number or tensor; they broadcast to
            a batch shape ``S`` and the result is ``S + (D, D)``.
        device, dtype: of the result (computed in float64).

    Index ``[..., i, j]`` is frequency ``((j - D//2), (i - D//2)) / (D apix)`` (x, y); the
    formula is in the module docstring. ``CTF[..., D//2, D//2] = -w``.

    Raises ValueError for NaN/inf parameters, ``volt`` above 1000 (volts, not kV) and
    ``0 < |dfu|, |dfv| < 100`` (micrometres, not A); parameters held in GPU tensors skip
    these value checks (they would need a device sync).
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if device is None:
        device = next((x.device for x in (dfu, dfv, dfang) if isinstance(x, torch.Tensor)), None)
    kx, ky = ctf_frequencies(D, apix, device=device)
    return evaluate_ctf(kx, ky, dfu, dfv, dfang, volt, cs, w, phase_shift, bfactor).to(dtype)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Convolve images with the CTF's point-spread function: multiply their centred 2D FFT.

    Args:
        images: ``(..., D, D)`` real.
        ctf: centred CTF ``(..., P, P)`` with ``P >= D`` even, broadcastable against the
            images' batch shape, computed with the images' pixel size (``ctf(P, apix, ...)``).

    If ``P > D`` the images are zero-padded to ``P`` (the centre pixel D//2 going to P//2),
    filtered and cropped back. Padding (``P = 2 D`` is the usual choice, and what
    :func:`fieldkern.cryoem.simulate` uses by default) avoids the wrap-around of a circular
    convolution: at 15000-20000 A defocus the PSF spreads ~100 A, more than a typical box.
    ``P = D`` is the plain, circular, cryoDRGN-style application. Differentiable; returns
    ``(..., D, D)`` in the images' dtype.
    """
    D = check_images("images", images)
    P = check_images("ctf", ctf)
    if P < D:
        raise ValueError(f"ctf must be at least the image size {D}, got {P}")
    if ctf.device != images.device:
        raise ValueError(f"ctf must be on the images' device {images.device}, got {ctf.device}")
    try:
        batch = torch.broadcast_shapes(images.shape[:-2], ctf.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"ctf's batch shape {tuple(ctf.shape[:-2])} must broadcast against the images' "
            f"{tuple(images.shape[:-2])} (one CTF per image, or one for all)"
        ) from None
    if math.prod(batch) == 0:
        # FFT backends reject empty batches (MKL: "inconsistent configuration")
        return images.new_zeros((*batch, D, D))
    x = images
    if P > D:
        lo = P // 2 - D // 2
        x = torch.nn.functional.pad(x, (lo, P - D - lo, lo, P - D - lo))
    out = ifft2_centered(fft2_centered(x) * ctf.to(x.dtype)).real
    if P > D:
        out = out[..., lo : lo + D, lo : lo + D]
    return out.contiguous()
