"""Fourier shell correlation (shell convention of the paper's appendix C) and resolution."""

import math

import pytest
import torch

import fieldkern.cryoem as cem

F64 = torch.float64


def test_identical_maps_give_one(blob_volume):
    v = blob_volume(16)
    shells, fsc = cem.fourier_shell_correlation(v, v)
    assert torch.equal(shells, torch.arange(8))
    assert fsc.dtype == F64 and torch.allclose(fsc, torch.ones(8, dtype=F64), atol=1e-12)
    # Scale-invariant.
    assert torch.allclose(cem.fourier_shell_correlation(v, 3 * v)[1], torch.ones(8, dtype=F64), atol=1e-12)


def test_independent_noise_gives_about_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, 32, generator=g)
    b = torch.randn(32, 32, 32, generator=g)
    _, fsc = cem.fourier_shell_correlation(a, b)
    counts = torch.bincount(cem.shell_indices(32).flatten(), minlength=16)[:16].to(F64)
    # Each shell's FSC is ~ N(0, 2/n_voxels) (Hermitian pairs are not independent):
    # allow 4 sigma; and the mean over the well-sampled shells is ~ 0.
    assert (fsc[1:].abs() < 4 * (2 / counts[1:]).sqrt()).all()
    assert abs(float(fsc[4:].mean())) < 0.03


def test_shell_assignment_is_round_of_radius():
    """A single plane wave with |k| = sqrt(2) is in shell 1 (cryoDRGN would bin it in 2)."""
    D = 16
    idx = torch.arange(D, dtype=F64) - D // 2
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    wave = lambda k: torch.cos(2 * math.pi * (k[0] * x + k[1] * y + k[2] * z) / D)  # noqa: E731
    other = wave((0, 0, 6))  # shell 6, anti-correlated between the two maps below
    for k, shell in [((1, 1, 0), 1), ((2, 2, 0), 3), ((3, 4, 0), 5), ((2, 1, 1), 2), ((7, 0, 0), 7)]:
        _, fsc = cem.fourier_shell_correlation(wave(k) + other, wave(k) - other)
        assert abs(float(fsc[shell]) - 1.0) < 1e-9, (k, fsc)
        assert abs(float(fsc[6]) + 1.0) < 1e-9, (k, fsc)
    assert int(cem.shell_indices(D)[1, 1, 0]) == 1 and int(cem.shell_indices(D)[0, 2, 2]) == 3


def test_lowpassed_copy_crosses_at_the_cutoff(blob_volume):
    D, apix, rc = 32, 1.5, 6
    g = torch.Generator().manual_seed(0)
    v = blob_volume(D) + 0.05 * torch.randn(D, D, D, generator=g, dtype=F64)
    f = torch.fft.fftn(v)
    low = torch.fft.ifftn(f * (cem.shell_indices(D) < rc)).real  # keep |k| < rc - 0.5
    _, fsc = cem.fourier_shell_correlation(v, low)
    assert torch.allclose(fsc[:rc], torch.ones(rc, dtype=F64), atol=1e-10)
    # Beyond the cut-off the copy holds only FFT round-off, uncorrelated with the map.
    assert (fsc[rc:].abs() < 0.15).all()
    # The crossing interpolates to about the mask edge |k| = rc - 0.5, i.e. D apix / (rc - 0.5) A
    # (exactly, if the round-off shell gave FSC 0).
    assert cem.resolution(fsc, apix) == pytest.approx(D * apix / (rc - 0.5), rel=0.02)
    assert cem.resolution(fsc, apix, threshold=0.143) == pytest.approx(D * apix / (rc - 1 + 0.857), rel=0.03)


def test_resolution_interpolation_and_edge_cases():
    fsc = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1, 0.0, 0.0, 0.0], dtype=F64)  # D = 16
    # Crossing at r = 2 + (0.7 - 0.5) / (0.7 - 0.3) = 2.5 shells.
    assert cem.resolution(fsc, 2.0) == pytest.approx(16 * 2.0 / 2.5)
    assert cem.resolution(fsc, 2.0, threshold=0.143) == pytest.approx(16 * 2.0 / (3 + 0.157 / 0.2))
    assert cem.resolution(torch.ones(8, dtype=F64), 2.0) == 4.0  # never crosses: Nyquist
    assert cem.resolution(torch.tensor([0.2, 0.1], dtype=F64), 1.0) == math.inf
    # A later recovery above the threshold does not matter: the first crossing counts.
    bumpy = torch.tensor([1.0, 0.8, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9], dtype=F64)
    assert cem.resolution(bumpy, 1.0) == pytest.approx(16 / (1 + 0.3 / 0.4))


def test_fsc_of_a_realistic_map_degrades_with_noise(map_1ol5):
    g = torch.Generator().manual_seed(0)
    D = map_1ol5.shape[0]
    sigma = 0.5 * float(map_1ol5.std())
    noisy = map_1ol5 + sigma * torch.randn(map_1ol5.shape, generator=g)
    _, fsc = cem.fourier_shell_correlation(map_1ol5, noisy)
    assert fsc[1] > 0.99 and fsc[-1] < fsc[1]
    # Expected curve of a map against itself plus white noise: sqrt(S / (S + N)) per shell,
    # S the map's shell power, N = n_voxels * sigma^2 * D^3 (unnormalised DFT of the noise).
    # Measured within 0.026 of it (shells 11-15, where FSC ~0.5-0.75).
    shells = cem.shell_indices(D).flatten()
    power = torch.fft.fftn(map_1ol5.double()).abs().square().flatten()
    S = torch.bincount(shells, weights=power, minlength=D)[: D // 2]
    N = torch.bincount(shells, minlength=D)[: D // 2].double() * sigma**2 * D**3
    expected = (S / (S + N)).sqrt()
    assert (fsc - expected).abs().max() < 0.05, (fsc, expected)
    # Crossing 0.5 near Nyquist: measured 6.9 A, 6.75 A from the expected curve.
    assert cem.resolution(fsc, 3.0) == pytest.approx(cem.resolution(expected, 3.0), rel=0.05)


def test_fourier_ring_correlation_2d():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(32, 32, generator=g)
    shells, frc = cem.fourier_shell_correlation(img, img)
    assert shells.shape == (16,) and torch.allclose(frc, torch.ones(16, dtype=F64))
    # a correlation, not a similarity: scale-free, signed, ~0 between independent images
    _, scaled = cem.fourier_shell_correlation(img, 3 * img)
    _, flipped = cem.fourier_shell_correlation(img, -img)
    _, unrelated = cem.fourier_shell_correlation(img, torch.randn(32, 32, generator=g))
    assert torch.allclose(scaled, torch.ones(16, dtype=F64)) and torch.allclose(flipped, -torch.ones(16, dtype=F64))
    assert unrelated[1:].abs().mean() < 0.2  # shells of 6-100 coefficients


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.zeros(8, 8, 8), torch.zeros(8, 8, 6), "same shape"),
        (torch.zeros(8, 8, 6), torch.zeros(8, 8, 6), "cubic"),
        (torch.zeros(7, 7, 7), torch.zeros(7, 7, 7), "even"),
        (torch.zeros(4, 4, 4, 4), torch.zeros(4, 4, 4, 4), "cubic"),
    ],
)
def test_fsc_errors(a, b, match):
    with pytest.raises(ValueError, match=match):
        cem.fourier_shell_correlation(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fsc_refuses_non_finite_voxels(bad):
    """One NaN voxel gave an all-zero curve (so resolution() said inf)."""
    good = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0))
    broken = good.clone()
    broken[1, 2, 3] = bad
    with pytest.raises(ValueError, match="v1 holds NaN or inf"):
        cem.fourier_shell_correlation(broken, good)
    with pytest.raises(ValueError, match="v2 holds NaN or inf"):
        cem.fourier_shell_correlation(good, broken)


def test_resolution_errors():
    with pytest.raises(ValueError, match="apix"):
        cem.resolution(torch.ones(8, dtype=F64), 0.0)
    with pytest.raises(ValueError, match="fsc"):
        cem.resolution(torch.ones(2, 4, dtype=F64), 1.0)
