"""Fourier-space helpers: the trainer's phase ramps that centre particle images, and the
Fourier crop that downsamples images and maps (``--downsample``)."""

import math

import pytest
import torch

import fieldkern.cryoem as cem
from fieldkern.cryoem import fft2_centered, fourier_shift
from fieldkern.cryoem.fourier import shift_phases


def test_shift_phases_move_images_as_fourier_shift_does():
    D = 16
    images = torch.randn(3, D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifts = torch.tensor([[1.5, -2.25], [0.0, 3.0], [-0.5, 0.75]], dtype=torch.float64)  # (x, y) pixels
    moved = torch.stack([fourier_shift(im, t, 2) for im, t in zip(images, shifts)])
    phases = shift_phases(shifts, D)
    assert phases.shape == (3, D, D) and phases.dtype == torch.complex64
    expected = fft2_centered(moved)
    got = phases.to(torch.complex128) * fft2_centered(images)
    tol = 1e-5 * float(expected.abs().max())
    # whole pixels: everywhere; sub-pixel: away from the Nyquist row and column (index 0),
    # where fourier_shift keeps the real part of a non-Hermitian result
    assert torch.allclose(got[1], expected[1], atol=tol)
    assert torch.allclose(got[:, 1:, 1:], expected[:, 1:, 1:], atol=tol)
    assert not torch.allclose(got[0], expected[0], atol=tol)
    single = shift_phases(shifts[1][None], D)[0].to(torch.complex128) * fft2_centered(images[1])
    assert torch.allclose(single, expected[1], atol=tol)


def _waves(n: int, D: int, positions: torch.Tensor, waves) -> torch.Tensor:
    """``c + sum_j a_j cos(2 pi k_j . u / D + phi_j)`` at the points ``u`` (fine pixels about
    the centre, ``(x, y[, z])`` on the last axis of ``positions``), for ``waves`` ``(k, a, phi)``:
    a signal on a box ``D`` fine pixels wide, band-limited to the largest ``|k|`` per axis."""
    out = torch.full(positions.shape[:-1], 0.7, dtype=torch.float64)
    for k, a, phi in waves:
        phase = sum(kk * positions[..., j] for j, kk in enumerate(k[:n]))
        out = out + a * torch.cos(2 * math.pi * phase / D + phi)
    return out


def _grid(n: int, size: int, spacing: float) -> torch.Tensor:
    """Positions ``(size,) * n + (n,)``, ``(x, y[, z])`` about the centre index ``size // 2`` in
    steps of ``spacing`` fine pixels (array axis -1 is x)."""
    c = (torch.arange(size, dtype=torch.float64) - size // 2) * spacing
    grids = torch.meshgrid(*([c] * n), indexing="ij")  # axis 0 is the slowest: z (3D) or y (2D)
    return torch.stack(grids[::-1], dim=-1)


# Frequencies in cycles per box (x, y, z), each axis below 4 = the Nyquist of an 8-pixel box.
_WAVES = [((1, 0, 2), 1.0, 0.3), ((3, -2, 1), 0.5, -1.1), ((-3, 3, -3), 0.25, 2.0), ((0, 1, 0), 0.8, 0.0)]


@pytest.mark.parametrize("n, D, size", [(2, 16, 8), (2, 16, 10), (3, 12, 8), (3, 16, 8)])
def test_fourier_crop_samples_a_band_limited_signal_on_the_coarse_grid(n, D, size):
    """A sum of sinusoids below the new Nyquist, sampled on the fine grid, crops to exactly
    its samples on the coarse grid: the same box (pixels D / size fine pixels wide, centred
    on the centre index), the same values, not scaled. Also for a ratio that is not an
    integer (16 -> 10, 12 -> 8), where the coarse samples fall between fine ones."""
    fine = _waves(n, D, _grid(n, D, 1.0), _WAVES)
    expected = _waves(n, D, _grid(n, size, D / size), _WAVES)
    got = cem.fourier_crop(fine, size, n)
    assert got.shape == (size,) * n and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # batch axes: each image or map cropped on its own
    stack = torch.stack([fine, 2 * fine - 1])
    torch.testing.assert_close(cem.fourier_crop(stack, size, n), torch.stack([expected, 2 * expected - 1]),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, D, size", [(2, 16, 8), (2, 16, 6), (3, 12, 8)])
def test_fourier_crop_keeps_the_mean(n, D, size):
    """Its docstring's promise, for signals with content above the new Nyquist (random):
    the mean of each image (or map) is kept, in float64 and float32."""
    x = 0.5 + torch.randn(3, *(D,) * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    means = x.flatten(1).mean(1)
    torch.testing.assert_close(cem.fourier_crop(x, size, n).flatten(1).mean(1), means, rtol=0, atol=1e-12)
    small = cem.fourier_crop(x.float(), size, n)
    assert small.dtype == torch.float32
    torch.testing.assert_close(small.flatten(1).mean(1).double(), means, rtol=0, atol=1e-5)
