import math

import numpy as np
import pytest
import torch

from fieldkern.image.metrics import magnitude_spectrum, psnr, spectrum_mad


def test_psnr_hand_values():
    target = np.zeros((4, 4, 3))
    assert psnr(np.full((4, 4, 3), 0.1), target) == pytest.approx(20.0)  # MSE 0.01
    assert psnr(np.full((4, 4, 3), 0.01), target) == pytest.approx(40.0)  # MSE 1e-4
    assert psnr(target, target) == math.inf


def test_psnr_is_unclipped_and_accepts_tensors():
    target = torch.ones(2, 2, 1)
    # 1.5 vs 1: MSE 0.25 -> 10 log10(4) dB; clipping would give inf.
    assert psnr(torch.full((2, 2, 1), 1.5), target) == pytest.approx(10 * math.log10(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(np.zeros((2, 2, 1)), np.zeros((2, 3, 1)))


def test_magnitude_spectrum_of_constant_and_cosine():
    n = 8
    c = 0.5
    spec = magnitude_spectrum(np.full((n, n, 1), c))
    # Orthonormal FFT: DC = sum / n = c * 255 * n^2 / n.
    assert spec[0, 0, 0].item() == pytest.approx(c * 255 * n)
    assert spec.sum().item() == pytest.approx(c * 255 * n)

    # a cos(2 pi k x / n) along x: two bins of a * 255 * n^2 / 2 / n each.
    a, k = 0.2, 2
    x = np.arange(n)
    img = np.tile(a * np.cos(2 * np.pi * k * x / n), (n, 1))[..., None]
    spec = magnitude_spectrum(img)
    assert spec[0, 0, k].item() == pytest.approx(a * 255 * n / 2)
    assert spec[0, 0, n - k].item() == pytest.approx(a * 255 * n / 2)
    assert spec.sum().item() == pytest.approx(a * 255 * n)


def test_spectrum_mad_hand_value_and_channel_mean():
    n = 8
    zero = np.zeros((n, n, 2))
    shifted = np.zeros((n, n, 2))
    shifted[..., 0] = 0.5  # channel 0 changes its DC by 0.5 * 255 * n; channel 1 unchanged
    expected = 0.5 * 255 * n / (2 * n * n)
    assert spectrum_mad(zero, shifted) == pytest.approx(expected)
    assert spectrum_mad(shifted, shifted) == 0.0


def test_spectrum_mad_ignores_translation():
    # A circular shift changes phases only: magnitude spectra, hence MAD, are unchanged.
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 3))
    assert spectrum_mad(img, np.roll(img, 3, axis=1)) == pytest.approx(0.0, abs=1e-9)


def test_hann_window_diagnostic():
    n, c = 8, 0.5
    spec = magnitude_spectrum(np.full((n, n, 1), c), window="hann")
    # A periodic Hann window sums to n / 2 per axis: DC = c * 255 * (n / 2)^2 / n.
    assert spec[0, 0, 0].item() == pytest.approx(c * 255 * n / 4)
    with pytest.raises(ValueError, match="window"):
        magnitude_spectrum(np.zeros((n, n, 1)), window="kaiser")


def test_metrics_reject_empty_and_non_finite_input():
    ok = np.zeros((4, 4, 1))
    nan = np.full((4, 4, 1), np.nan)
    with pytest.raises(ValueError, match="empty"):
        psnr(np.zeros((0, 4, 3)), np.zeros((0, 4, 3)))
    with pytest.raises(ValueError, match="prediction holds NaN"):
        psnr(nan, ok)
    with pytest.raises(ValueError, match="target holds NaN or inf"):
        psnr(ok, np.full((4, 4, 1), np.inf))
    with pytest.raises(ValueError, match="before holds NaN"):
        spectrum_mad(nan, ok)
    with pytest.raises(ValueError, match="after is empty"):
        spectrum_mad(ok, np.zeros((4, 0, 1)))
    with pytest.raises(ValueError, match="data_range must be a positive finite number, got 0"):
        psnr(ok, ok + 0.1, data_range=0)  # was math's "math domain error"


def test_spectrum_layouts_grey_and_channels_first():
    rng = np.random.default_rng(0)
    grey = rng.random((6, 8))
    # (H, W) is one grey channel, not W channels of H x 1 images.
    torch.testing.assert_close(magnitude_spectrum(grey), magnitude_spectrum(grey[..., None]))
    assert spectrum_mad(grey, grey[..., None]) == 0.0
    with pytest.raises(ValueError, match=r"channels last.*\(3, 8, 8\)"):
        magnitude_spectrum(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"image must have shape \(H, W\) or \(H, W, C\)"):
        magnitude_spectrum(np.zeros(8))
