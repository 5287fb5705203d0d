"""Central slices from precomputed taps (fieldkern.cryoem.slice_taps) against the grid_sample
reference (fieldkern.cryoem.fourier_slice.central_slices), their adjoint and their gradients."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldkern.cryoem import fft2_centered, random_rotations
from fieldkern.cryoem.fourier_slice import central_slices, volume_spectrum
from fieldkern.cryoem.slice_taps import (
    gradient_spectra,
    half_plane,
    sample_positions,
    sample_slices,
    scatter_taps,
    slice_taps,
    spectrum_table,
    take_slices,
    tap_index_dtype,
)


def blobs(D, seed=0, dtype=torch.float32):
    """A smooth volume (Gaussian blobs of 1.5-3.5 voxels) whose spectrum is small at Nyquist."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for _ in range(6):
        m = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * D * 0.4
        s = 1.5 + 2 * torch.rand((), generator=g, dtype=torch.float64)
        vol += torch.exp(-((x - m[0]) ** 2 + (y - m[1]) ** 2 + (z - m[2]) ** 2) / (2 * s**2))
    return vol.to(dtype)


def rotations(n, seed=1, dtype=torch.float32):
    return random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("D", [6, 10, 16])
def test_half_plane_covers_the_grid_once_with_its_mirrors(D):
    plane = half_plane(D)
    assert len(plane) == D * D // 2 + D
    assert float(plane.weight.sum()) == D * D
    k = plane.k.to(torch.int64)
    kept = {tuple(v) for v in k.tolist()}
    # Every grid frequency is kept or is the mirror of a kept one with weight 2.
    weight = dict(zip(map(tuple, k.tolist()), plane.weight.tolist()))
    for ky in range(-(D // 2), D // 2):
        for kx in range(-(D // 2), D // 2):
            if (kx, ky) in kept:
                continue
            assert weight[(-kx, -ky)] == 2.0
    # index is the flat position of (kx, ky) in a centred (D, D) array [y, x]
    assert torch.equal(plane.index, (k[:, 1] + D // 2) * D + (k[:, 0] + D // 2))


def nyquist_free(positions):
    """Samples none of whose taps reach the spectrum's index-0 planes (left out of the table)."""
    return (positions >= 1).all(-1)


@pytest.mark.parametrize("D", [8, 14])
def test_taps_match_grid_sample_off_the_padded_nyquist_planes(D):
    vol = blobs(D, dtype=torch.float64)
    spectrum = volume_spectrum(vol)
    P = spectrum.shape[0]
    R = rotations(5, dtype=torch.float64)
    plane = half_plane(D)
    positions = sample_positions(R, plane, P)
    ours = take_slices(spectrum_table(spectrum), slice_taps(positions, P))
    reference = plane.select(central_slices(spectrum, R, D))
    assert ours.shape == (5, len(plane))
    # The same taps (to float64 rounding) wherever no tap reaches the padded Nyquist planes
    # (index 0), which the table leaves out: samples beyond |k| = D/2 - 1 along an axis.
    free = nyquist_free(positions)
    assert free[:, plane.k.norm(dim=-1) < D / 2 - 1].all()
    torch.testing.assert_close(ours[free], reference[free], rtol=0, atol=1e-9 * reference.abs().max())
    assert not torch.allclose(ours[~free], reference[~free])  # where they differ, they do


def test_half_plane_loss_equals_the_full_plane_loss():
    """For real images and an even CTF, the weighted half-plane loss is the full-plane one."""
    D = 12
    vol = blobs(D, dtype=torch.float64)
    spectrum = volume_spectrum(vol)
    P = spectrum.shape[0]
    R = rotations(4, dtype=torch.float64)
    images = torch.randn(4, D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = fft2_centered(images)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    ctf = torch.cos(0.05 * (k[:, None] ** 2 + 2 * k[None, :] ** 2))  # even: CTF(k) = CTF(-k)
    full_plane = half_plane(D)
    # The full grid's predictions from the taps: sample every frequency directly.
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    every = type(full_plane)(D, torch.stack([kx.flatten(), ky.flatten()], -1), torch.arange(D * D),
                             torch.ones(D * D, dtype=torch.float64))
    table = spectrum_table(spectrum)
    pred_full = take_slices(table, slice_taps(sample_positions(R, every, P), P))
    full = (ctf.flatten() * pred_full - targets.flatten(-2)).abs().square().sum(-1)
    pred_half = take_slices(table, slice_taps(sample_positions(R, full_plane, P), P))
    half = (full_plane.weight * (full_plane.select(ctf) * pred_half - full_plane.select(targets)).abs().square()).sum(-1)
    torch.testing.assert_close(half, full, rtol=1e-10, atol=0)


def test_adjoint_is_the_transpose():
    D, P = 6, 12
    plane = half_plane(D)
    taps = slice_taps(sample_positions(rotations(3, dtype=torch.float64), plane, P), P)
    table = torch.randn(taps.matrix.shape[1], 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(take_slices(t, taps)), (table,))


def test_taps_index_in_int32_where_it_fits_and_int64_gives_the_same_taps(monkeypatch):
    """int32 columns up to 2^31 table rows or 8 n + 1 row offsets, int64 beyond; the int64
    path (forced here: its sizes would not fit in a test) makes the same taps and products."""
    from fieldkern.cryoem import slice_taps as module

    assert tap_index_dtype(1290, 10**6) == torch.int32  # 1290^3 < 2^31 <= 1291^3
    assert tap_index_dtype(1291, 10) == torch.int64
    assert tap_index_dtype(10, 2**28 - 1) == torch.int32 and tap_index_dtype(10, 2**28) == torch.int64
    D, P = 10, 20
    positions = sample_positions(rotations(4), half_plane(D), P)
    small = slice_taps(positions, P)
    monkeypatch.setattr(module, "tap_index_dtype", lambda Q, n: torch.int64)
    large = slice_taps(positions, P)
    assert (small.columns.dtype, large.columns.dtype) == (torch.int32, torch.int64)
    assert torch.equal(small.columns.long(), large.columns) and torch.equal(small.weights, large.weights)
    table = torch.randn(small.matrix.shape[1], 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(small.matrix @ table, large.matrix @ table)


@pytest.mark.parametrize("method", ["bincount", "index_add"])
def test_both_adjoints_are_the_transpose(method):
    """The CPU's bincount and the GPUs' index_add_ give the transpose's product, in float32."""
    D, P = 10, 20
    taps = slice_taps(sample_positions(rotations(5), half_plane(D), P), P)
    grad = torch.randn(taps.matrix.shape[0], 2, generator=torch.Generator().manual_seed(2))
    rows = taps.matrix.shape[1]
    expected = taps.matrix.to_dense().double().t() @ grad.double()
    out = scatter_taps(taps, grad, rows, method)
    assert out.dtype == torch.float32 and out.shape == (rows, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_adjoint_method_by_device():
    """bincount on the CPU, index_add_ on any other device: on "meta" (a device that is not
    the host) bincount cannot run at all, since its output's size depends on the data."""
    taps = slice_taps(sample_positions(rotations(2), half_plane(6), 12), 12)
    rows = taps.matrix.shape[1]
    grad = torch.randn(taps.matrix.shape[0], 2)
    torch.testing.assert_close(scatter_taps(taps, grad, rows), scatter_taps(taps, grad, rows, "bincount"),
                               rtol=0, atol=0)
    meta = dataclasses.replace(taps, columns=taps.columns.to("meta"), weights=taps.weights.to("meta"))
    assert scatter_taps(meta, grad.to("meta"), rows).shape == (rows, 2)
    with pytest.raises((NotImplementedError, RuntimeError)):
        scatter_taps(meta, grad.to("meta"), rows, "bincount")
    with pytest.raises(ValueError, match="method must be 'bincount' or 'index_add'"):
        scatter_taps(taps, grad, rows, "atomic")


def test_gradient_flows_to_the_volume_as_with_grid_sample():
    D = 10
    vol = blobs(D, dtype=torch.float64).requires_grad_()
    R = rotations(3, dtype=torch.float64)
    plane = half_plane(D)
    P = 2 * D
    weights = torch.randn(3, len(plane), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inside = plane.k.norm(dim=-1) < D / 2 - 1  # where both sample the same taps

    def grad(slices):
        (g,) = torch.autograd.grad((weights[:, inside] * slices[:, inside].abs().square()).sum(), vol)
        return g

    taps = slice_taps(sample_positions(R, plane, P), P)
    ours = grad(take_slices(spectrum_table(volume_spectrum(vol)), taps))
    reference = grad(plane.select(central_slices(volume_spectrum(vol), R, D)))
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9 * reference.abs().max())


def test_gradient_spectra_are_the_spectrum_derivatives():
    """Interpolated gradient spectra against the exact derivative of the volume's transform."""
    D = 12
    vol = blobs(D, dtype=torch.float64)
    P = 2 * D
    table = spectrum_table(volume_spectrum(vol), gradient_spectra(vol))
    plane = half_plane(D)
    positions = sample_positions(rotations(2, dtype=torch.float64), plane, P).requires_grad_()
    values = sample_slices(table, positions, P)
    c = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    inside = plane.k.norm(dim=-1) < D / 2 - 1
    for b, j in [(0, 3), (0, 20), (1, 11), (1, 33)]:
        j = int(torch.nonzero(inside)[j])
        q = positions[b, j].detach() - P // 2
        phase = torch.exp(-2j * math.pi * (q[0] * x + q[1] * y + q[2] * z) / P)
        exact_value = (vol * phase).sum()
        exact_grad = torch.stack([(vol * phase * (-2j * math.pi * a / P)).sum() for a in (x, y, z)])
        # 2x oversampled, gridding-corrected trilinear interpolation: within 2% of the transform
        scale = vol.sum()
        assert abs(values[b, j] - exact_value) < 0.02 * scale
        (g_re,) = torch.autograd.grad(values[b, j].real, positions, retain_graph=True)
        (g_im,) = torch.autograd.grad(values[b, j].imag, positions, retain_graph=True)
        grad = torch.complex(g_re[b, j], g_im[b, j])
        assert (grad - exact_grad).abs().max() < 0.05 * exact_grad.abs().max() + 0.002 * scale


def test_smooth_gradient_brings_a_pose_back():
    """The pose gradient through sample_slices points back to the true pose (it is the
    transform's own gradient, not the piecewise-constant one of trilinear interpolation, so it
    is checked by where it leads: Adam steps on it undo most of a 1.7 degree perturbation)."""
    from fieldkern.cryoem import axis_angle_to_matrix

    D = 16
    vol = blobs(D)
    P = 2 * D
    table = spectrum_table(volume_spectrum(vol), gradient_spectra(vol))
    plane = half_plane(D)
    truth = rotations(1)
    target = sample_slices(table, sample_positions(truth, plane, P), P)

    def loss(omega):
        R = axis_angle_to_matrix(omega) @ truth
        return (plane.weight * (sample_slices(table, sample_positions(R, plane, P), P) - target).abs().square()).sum()

    omega = 0.03 * torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8]]), dim=-1)
    w = omega.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(w), w)
    assert float((g * omega).sum() / (g.norm() * omega.norm())) > 0.7  # measured 0.82
    opt = torch.optim.Adam([w], lr=2e-3)
    for _ in range(40):
        opt.zero_grad()
        loss(w).backward()
        opt.step()
    assert float(w.detach().norm()) < 0.2 * float(omega.norm())  # measured 0.14 (within Adam's steps of 2e-3)


def test_sample_slices_refuses_a_table_that_needs_gradients():
    D, P = 4, 8
    plane = half_plane(D)
    table = torch.zeros((P + 4) ** 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="fixed"):
        sample_slices(table, sample_positions(rotations(1), plane, P), P)
    with pytest.raises(ValueError, match="gradient columns"):
        sample_slices(torch.zeros((P + 4) ** 3, 2), sample_positions(rotations(1), plane, P), P)
    with pytest.raises(ValueError, match="value table"):
        take_slices(torch.zeros((P + 4) ** 3, 8), slice_taps(sample_positions(rotations(1), plane, P), P))


def test_samples_outside_the_spectrum_are_zero():
    D, P = 6, 12
    table = spectrum_table(volume_spectrum(torch.rand(D, D, D)))
    far = torch.tensor([[-50.0, 6.0, 6.0], [6.0, 90.0, 6.0], [6.0, 6.0, -1.5], [6.0, 6.0, P + 1.0]])
    assert torch.equal(take_slices(table, slice_taps(far, P)), torch.zeros(4, dtype=torch.complex64))


@settings(max_examples=15, deadline=None)
@given(half_D=st.integers(2, 9), B=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_taps_match_grid_sample_for_any_even_box(half_D, B, seed):
    D = 2 * half_D
    vol = torch.rand(D, D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spectrum = volume_spectrum(vol)
    P = spectrum.shape[0]
    R = rotations(B, seed=seed, dtype=torch.float64)
    plane = half_plane(D)
    positions = sample_positions(R, plane, P)
    ours = take_slices(spectrum_table(spectrum), slice_taps(positions, P))
    reference = plane.select(central_slices(spectrum, R, D))
    free = nyquist_free(positions)
    torch.testing.assert_close(ours[free], reference[free], rtol=0, atol=1e-9 * reference.abs().max())
