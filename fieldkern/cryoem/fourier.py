"""Centred Fourier transforms and Fourier-space helpers.

Centred means: array index ``i`` of an axis of length ``D`` holds frequency index
``k = i - D//2`` (Fourier pixels; ``k / (D * apix)`` in 1/A), and the real-space origin
is the centre index ``D//2`` too. So ``fftn_centered(x)`` is
``fftshift(fftn(ifftshift(x)))`` over the last ``ndim`` axes. Only even sizes are used in
fieldkern, where ``fftshift`` and ``ifftshift`` coincide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fieldkern.checks import check_box_size, check_floating, check_tensor
from fieldkern.cryoem._checks import check_ndim


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def fftn_centered(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred DFT over the last ``ndim`` axes (complex result, same shape)."""
    check_tensor("x", x)
    dims = _dims(check_ndim("ndim", ndim, x))
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifftn_centered(f: torch.Tensor, ndim: int) -> torch.Tensor:
    """Inverse of :func:`fftn_centered` (complex result; take ``.real`` for real signals)."""
    check_tensor("f", f)
    dims = _dims(check_ndim("ndim", ndim, f))
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f, dim=dims), dim=dims), dim=dims)


def fft2_centered(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D DFT of images ``(..., D, D)``."""
    return fftn_centered(x, 2)


def ifft2_centered(f: torch.Tensor) -> torch.Tensor:
    """Inverse centred 2D DFT ``(..., D, D)`` (complex)."""
    return ifftn_centered(f, 2)


def fft3_centered(x: torch.Tensor) -> torch.Tensor:
    """Centred 3D DFT of volumes ``(..., D, D, D)``."""
    return fftn_centered(x, 3)


def ifft3_centered(f: torch.Tensor) -> torch.Tensor:
    """Inverse centred 3D DFT ``(..., D, D, D)`` (complex)."""
    return ifftn_centered(f, 3)


def frequency_indices(D: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centred frequency (or position) indices ``i - D//2`` for ``i = 0..D-1``, shape ``(D,)``."""
    D = check_box_size("D", D)
    return torch.arange(D, device=device, dtype=dtype) - D // 2


def fourier_shift(x: torch.Tensor, shift: Sequence[float] | torch.Tensor, ndim: int) -> torch.Tensor:
    """Translate the last ``ndim`` axes by ``shift`` pixels with a Fourier phase ramp.

    ``out(r) = x(r - shift)`` (circular, exact for band-limited signals). ``shift`` is given
    in ``(x, y[, z])`` order, i.e. the first entry moves along the *last* array axis.
    Returns a real tensor of ``x``'s shape and dtype.
    """
    check_floating("x", x)
    if ndim not in (2, 3) or x.dim() < ndim:
        raise ValueError(f"x must have at least ndim = {ndim} axes, got {tuple(x.shape)}")
    t = torch.as_tensor(shift, dtype=torch.float64, device=x.device).reshape(-1)
    if t.numel() != ndim:
        raise ValueError(f"shift must have {ndim} entries (x, y[, z]), got {t.numel()}")
    dims = _dims(ndim)
    phase = torch.zeros((1,) * ndim, dtype=torch.float64, device=x.device)
    # axis -1 is x, axis -2 is y, axis -3 is z.
    for j in range(ndim):
        n = x.shape[-1 - j]
        k = torch.fft.fftfreq(n, device=x.device, dtype=torch.float64)
        shape = [1] * ndim
        shape[ndim - 1 - j] = n
        phase = phase + k.reshape(shape) * t[j]
    ramp = torch.exp(-2j * torch.pi * phase)
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    out = torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * ramp.to(cdtype), dim=dims)
    return out.real.to(x.dtype)


def shift_phases(shifts: torch.Tensor, D: int) -> torch.Tensor:
    """``(n, D, D)`` complex64 factors that move images by ``shifts`` ``(n, 2)`` pixels ``(x, y)``
    when multiplied into their centred spectra: ``shift_phases(t[None], D)[0] * fft2_centered(img)``
    equals ``fft2_centered(fourier_shift(img, t, 2))`` (for a sub-pixel shift, except on the
    Nyquist row and column, index 0, where :func:`fourier_shift`'s real part differs)."""
    k = frequency_indices(D, dtype=torch.float64)
    t = torch.as_tensor(shifts, dtype=torch.float64).reshape(-1, 2, 1, 1)
    phase = (k[None, None, :] * t[:, 0] + k[None, :, None] * t[:, 1]) / D
    return torch.polar(torch.ones_like(phase), -2 * math.pi * phase).to(torch.complex64)


def fourier_crop(x: torch.Tensor, size: int, ndim: int) -> torch.Tensor:
    """Downsample the last ``ndim`` (equal, even) axes to ``size`` by cropping the centred spectrum.

    Keeps the physical extent of the box (the pixel size grows by ``D / size``) and the
    mean value. ``size == D`` returns ``x`` unchanged.
    """
    check_floating("x", x)
    ndim = check_ndim("ndim", ndim, x)
    axes = tuple(x.shape[-ndim:])
    # D is read from the last axis: unequal or odd axes would be cropped wrongly, silently
    if len(set(axes)) != 1 or axes[0] % 2 or axes[0] < 2:
        raise ValueError(f"x must have {ndim} equal, even trailing axes (..., D{', D' * (ndim - 1)}), "
                         f"got {tuple(x.shape)}")
    D = axes[0]
    size = check_box_size("size", size)
    if size > D:
        raise ValueError(f"size must be <= the current size {D}, got {size}")
    if size == D:
        return x
    f = fftn_centered(x, ndim)
    lo = D // 2 - size // 2
    idx = [slice(None)] * (x.dim() - ndim) + [slice(lo, lo + size)] * ndim
    out = ifftn_centered(f[tuple(idx)], ndim).real
    return (out * (size / D) ** ndim).to(x.dtype)
