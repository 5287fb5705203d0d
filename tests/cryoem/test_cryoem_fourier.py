"""Fourier-space helpers of the trainer: the phase ramps that centre particle images."""

import torch

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
