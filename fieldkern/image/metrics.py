"""Image metrics of the paper's Table 2: PSNR and the spectrum MAD of scale conservation.

All functions take torch tensors or numpy arrays with intensities in [0, 1]: :func:`psnr`
any matching shapes, the spectrum functions an image ``(H, W, C)`` (channels last, as the
models output them, ``C`` at most 4) or a grey ``(H, W)``, read as ``(H, W, 1)``. Empty or
non-finite input raises ValueError rather than scoring NaN.
"""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_finite
from fieldkern.image._checks import check_layout

# Spectra are measured in 8-bit grey levels so MAD values read on the paper's scale.
SPECTRUM_SCALE = 255.0


def _tensor(a) -> torch.Tensor:
    return a.detach().double() if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=torch.float64)


def psnr(prediction, target, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``.

    Unclipped (as in the paper): predictions outside [0, 1] are scored as they are.
    Returns ``inf`` for a perfect match. Raises ValueError for empty or non-finite input.
    """
    if not 0 < data_range < math.inf:
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    p, t = _tensor(prediction), _tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: prediction {tuple(p.shape)} vs target {tuple(t.shape)}")
    if p.numel() == 0:
        raise ValueError(f"prediction and target are empty, shape {tuple(p.shape)}")
    # NaN would come out as a NaN score (and inf as a math domain error) that then
    # averages silently into a results table
    check_finite("prediction", p)
    check_finite("target", t)
    mse = torch.mean((p - t) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def magnitude_spectrum(image, window: str | None = None) -> torch.Tensor:
    """``|FFT2|`` of each channel of ``(H, W, C)``, ``norm="ortho"``, intensities times 255.

    ``image`` is channels last with ``C`` at most 4, or grey ``(H, W)`` (taken as ``C = 1``);
    a longer last axis, e.g. a channels-first ``(C, H, W)`` tensor, raises ValueError.
    Returns ``(C, H, W)`` float64, DC at index ``[:, 0, 0]`` (not shifted). With the
    orthonormal FFT, Parseval holds (``sum |F|^2 = sum |x|^2``), so a change of RMS ``d``
    grey levels spread over the spectrum gives magnitude changes of order ``d``.

    ``window="hann"`` (a diagnostic, not the Table 2 metric) multiplies by a separable
    periodic Hann window first, which suppresses the leakage of a non-periodic image's
    border jump into the axis-aligned lines of its spectrum.
    """
    return _spectrum(image, window, "image")


def _spectrum(image, window: str | None, name: str) -> torch.Tensor:
    x = _tensor(image)
    check_layout(name, x)
    check_finite(name, x)
    if x.ndim == 2:
        x = x[..., None]
    x = x.permute(2, 0, 1) * SPECTRUM_SCALE
    if window == "hann":
        h, w = x.shape[-2:]
        win = torch.hann_window(h, dtype=x.dtype)[:, None] * torch.hann_window(w, dtype=x.dtype)[None, :]
        x = x * win
    elif window is not None:
        raise ValueError(f"window must be None or 'hann', got {window!r}")
    return torch.fft.fft2(x, norm="ortho").abs()


def spectrum_mad(before, after, window: str | None = None) -> float:
    """Mean absolute difference of magnitude spectra, averaged over channels and frequencies.

    ``mean |(|FFT(before)| - |FFT(after)|)|`` with :func:`magnitude_spectrum`'s
    normalisation (orthonormal FFT of intensities in 0..255). Used for a scale's output right
    after its stage (``before``) vs after all training (``after``). Same layouts as
    :func:`magnitude_spectrum`; empty or non-finite input raises ValueError.
    """
    a, b = _spectrum(before, window, "before"), _spectrum(after, window, "after")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.mean((a - b).abs()).item()
