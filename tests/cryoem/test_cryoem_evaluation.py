"""The ground-truth evaluation (:mod:`fieldkern.cryoem.evaluation`): the FSC resolution it
reports and the pose errors, against maps and poses built so that the numbers are known.

The maps are built in Fourier space shell by shell (shell ``round(|k|)``, the convention of
:mod:`fieldkern.cryoem.fsc`): a shell copied from the truth has FSC 1; a shell holding
``c F + sqrt(1 - c^2) G`` with ``G`` orthogonal to the truth's ``F`` in that shell and of the
same power has FSC exactly ``c``. The expected resolutions follow from those curves by the
linear interpolation of :func:`fieldkern.cryoem.resolution`'s docstring, written out here.
"""

import math

import pytest
import torch

import fieldkern.cryoem as cem
from fieldkern.cryoem import evaluation

F64 = torch.float64
D, APIX = 16, 2.0
# (centre (x, y, z) in voxels about D//2, sigma, amplitude): smooth and asymmetric, so the
# alignment inside evaluate has one clear optimum.
BLOBS = [((2.5, -1.5, 1.0), 1.6, 1.0), ((-2.5, 2.0, -1.5), 1.3, 0.7), ((0.5, 3.0, 2.5), 1.9, 0.5)]


def _blobs(matrix=None) -> torch.Tensor:
    """The blob map ``(D, D, D)`` float64, or, with ``matrix`` ``M``, ``V(M^T r)`` sampled
    exactly (each centre moved to ``M c``) instead of resampled."""
    g = torch.arange(D, dtype=F64) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    v = torch.zeros(D, D, D, dtype=F64)
    for centre, sigma, amplitude in BLOBS:
        c = torch.tensor(centre, dtype=F64)
        if matrix is not None:
            c = matrix @ c
        v += amplitude * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2))
    return v


def _shells() -> torch.Tensor:
    """``round(|k|)`` of every frequency of an unshifted ``fftn`` of size ``D^3``."""
    k = torch.fft.fftfreq(D, 1.0 / D, dtype=F64)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.round(torch.sqrt(kx**2 + ky**2 + kz**2)).long()


def _with_fsc(v: torch.Tensor, curve: list[float], seed: int) -> torch.Tensor:
    """A map whose FSC with ``v`` is ``curve[r]`` in shell ``r`` (0 past the list), exactly:
    shells with 1 copied, the others ``c F + sqrt(1 - c^2) G`` with ``G`` random, made
    orthogonal to ``F`` in the shell and of its power. The corners (``r >= D/2``, outside
    the FSC) are zeroed. Real: each shell is closed under ``k -> -k`` and the
    coefficients are real, so the spectrum stays Hermitian."""
    shells = _shells()
    F = torch.fft.fftn(v)
    G = torch.fft.fftn(torch.randn(v.shape, generator=torch.Generator().manual_seed(seed), dtype=F64))
    out = F.clone()
    out[shells >= D // 2] = 0
    for r in range(D // 2):
        c = curve[r] if r < len(curve) else 0.0
        if c == 1.0:
            continue
        m = shells == r
        f, g = F[m], G[m]
        g = g - (g * f.conj()).real.sum() / (f.abs() ** 2).sum() * f
        out[m] = c * f + math.sqrt(1 - c * c) * g * (f.norm() / g.norm())
    return torch.fft.ifftn(out).real


def _crossing(r: int, f_before: float, f_after: float, threshold: float) -> float:
    """Resolution (A) where a curve falls from ``f_before`` (shell ``r - 1``) to ``f_after``
    (shell ``r``) through ``threshold``: ``D apix / r_cross``, linearly interpolated."""
    return D * APIX / (r - 1 + (f_before - threshold) / (f_before - f_after))


# coarse: shells 0-2 copied, FSC 0.3 in shells 3-4, 0 beyond; fine: copied to shell 5, 0.3 in 6-7.
COARSE = [1.0, 1.0, 1.0, 0.3, 0.3]
FINE = [1.0] * 6 + [0.3, 0.3]


def test_evaluate_reports_the_fsc_0_5_resolution_against_the_truth():
    """evaluate measures each scale against the ground truth at FSC 0.5 (not the half maps'
    0.143).

    The coarse map crosses 0.5 between shells 2 and 3 (2 + 0.5 / 0.7 = 2.71 shells, 11.8 A)
    but 0.143 only between shells 4 and 5 (7.1 A); the fine one crosses 0.5 between shells 5
    and 6 (5.6 A) and never falls below 0.143 (that would read Nyquist, 4 A). Both maps are in
    the truth's frame, so the alignment finds (nearly) the identity; its resampling moves
    the 0.3 shells by about 0.02 (measured), hence the tolerances."""
    V = _blobs()
    coarse, fine = _with_fsc(V, COARSE, seed=1), _with_fsc(V, FINE, seed=0)
    eye = torch.eye(3, dtype=F64)[None]
    ev = evaluation.evaluate([coarse, fine], V, APIX, eye, eye, None)
    assert ev.fsc_against == "ground truth" and ev.fsc_threshold == 0.5
    assert ev.alignment["rotation_deg"] < 1.0 and not ev.alignment["flipped"]
    assert max(abs(s) for s in ev.alignment["shift_voxels"]) < 0.05
    for curve, measured in zip((COARSE, FINE), ev.fsc):
        expected = torch.tensor(curve + [0.0] * (D // 2 - len(curve)), dtype=F64)
        assert torch.allclose(torch.tensor(measured, dtype=F64), expected, atol=0.03), measured
    res_coarse, res_fine = ev.resolution_angstrom
    # within the shell of the 0.5 crossing, and at the interpolated value
    assert D * APIX / 3 < res_coarse < D * APIX / 2 and D * APIX / 6 < res_fine < D * APIX / 5
    assert res_coarse == pytest.approx(_crossing(3, 1.0, 0.3, 0.5), rel=0.01)  # 11.79 A
    assert res_fine == pytest.approx(_crossing(6, 1.0, 0.3, 0.5), rel=0.02)    # 5.60 A
    # the 0.143 criterion would read outside that shell (7.07 A; the fine one Nyquist, 4 A)
    assert not D * APIX / 3 < _crossing(5, 0.3, 0.0, 0.143) < D * APIX / 2
    assert ev.pose_error_deg is None  # no true poses


def test_evaluate_half_maps_reports_the_fsc_0_143_resolution():
    """The gold-standard FSC uses 0.143 (the counterpart of the test above): the coarse
    half map pair reads 7.1 A where 0.5 would give 11.8 A; the fine pair never falls
    below 0.143, so Nyquist (2 apix)."""
    V = _blobs()
    ev = evaluation.evaluate_half_maps([V, V], [_with_fsc(V, COARSE, seed=1), _with_fsc(V, FINE, seed=0)], APIX)
    assert ev.fsc_against == "half maps" and ev.fsc_threshold == 0.143
    assert ev.resolution_angstrom[0] == pytest.approx(_crossing(5, 0.3, 0.0, 0.143), rel=0.02)
    assert ev.resolution_angstrom[1] == 2 * APIX


def _poses():
    """True poses (5 random), initial ones each exactly 30 degrees off (jitter_rotations), and
    refined ones ``R_i E_i`` with ``E_i`` about one axis ``u`` by 1, 2, 3, 4, 10 degrees
    (geodesic error exactly that: mean 4, median 3)."""
    truth = cem.random_rotations(5, generator=torch.Generator().manual_seed(0)).double()
    initial = cem.jitter_rotations(truth, 30.0, 30.0, generator=torch.Generator().manual_seed(1))
    u = torch.tensor([0.4, -0.6, 0.3], dtype=F64)
    u = u / u.norm()
    E = cem.rodrigues(torch.deg2rad(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=F64)), u.expand(5, 3))
    return truth, initial, truth @ E, u


def test_pose_errors_are_those_of_the_initial_and_the_refined_poses():
    """Without a ground-truth map (no alignment): ``initial`` is the initial poses' error
    (30 degrees each), ``final`` the refined ones' (mean 4, median 3); the true poses as
    the refined ones give 0; no true poses give None."""
    truth, initial, final, _ = _poses()
    V = _blobs()
    ev = evaluation.evaluate([V], None, APIX, initial, final, truth)
    assert ev.resolution_angstrom == [] and set(ev.pose_error_deg) == {"initial", "final"}
    assert ev.pose_error_deg["initial"] == pytest.approx({"mean": 30.0, "median": 30.0}, abs=1e-6)
    assert ev.pose_error_deg["final"] == pytest.approx({"mean": 4.0, "median": 3.0}, abs=1e-6)
    exact = evaluation.evaluate([V], None, APIX, initial, truth, truth).pose_error_deg
    assert exact["final"] == pytest.approx({"mean": 0.0, "median": 0.0}, abs=1e-6)
    assert evaluation.evaluate([V], None, APIX, initial, final, None).pose_error_deg is None


def test_evaluate_reports_the_refined_poses_errors_in_the_truths_frame():
    """A reconstruction in a frame rotated by ``G`` (40 degrees about ``u``): the map is
    ``V(G r)`` (sampled exactly, see :func:`_blobs`) and the poses that explain the truth's
    images with it are ``R G``; here refined ones ``R_i E_i G``. The alignment finds ``G``;
    ``final`` is the raw error, ``E_i G`` being about ``u`` by 40 + theta_i degrees (mean 44,
    median 43); ``final_aligned`` moves the poses into the truth's frame and is theta_i
    again (mean 4, median 3) up to the alignment's error; ``initial`` stays 30."""
    truth, initial, final, u = _poses()
    G = cem.rodrigues(torch.tensor(math.radians(40.0), dtype=F64), u)
    ev = evaluation.evaluate([_blobs(G.T)], _blobs(), APIX, initial, final @ G, truth)
    assert ev.alignment["rotation_deg"] == pytest.approx(40.0, abs=0.5) and not ev.alignment["flipped"]
    errors = ev.pose_error_deg
    assert errors["initial"] == pytest.approx({"mean": 30.0, "median": 30.0}, abs=1e-6)
    assert errors["final"] == pytest.approx({"mean": 44.0, "median": 43.0}, abs=1e-5)
    assert errors["final_aligned"] == pytest.approx({"mean": 4.0, "median": 3.0}, abs=0.25)  # measured 0.04 off
