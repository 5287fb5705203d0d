"""Rotations: sampling, axis-angle (with gradients at 0 and pi), pose steps, RELION Euler angles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fieldkern.cryoem as cem

F64 = torch.float64


def rz(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=F64)


def ry(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=F64)


vec3 = st.lists(st.floats(-1, 1, allow_nan=False), min_size=3, max_size=3).filter(
    lambda v: sum(x * x for x in v) > 1e-2
)


# --------------------------------------------------------------------------- sampling


def test_random_rotations_are_seeded_rotations():
    a = cem.random_rotations(100, torch.Generator().manual_seed(1), dtype=F64)
    b = cem.random_rotations(100, torch.Generator().manual_seed(1), dtype=F64)
    c = cem.random_rotations(100, torch.Generator().manual_seed(2), dtype=F64)
    assert a.shape == (100, 3, 3) and torch.equal(a, b) and not torch.equal(a, c)
    assert cem.is_rotation(a, atol=1e-12).all()
    assert cem.random_rotations(4, torch.Generator().manual_seed(1)).dtype == torch.float32


def test_random_rotations_are_haar_uniform():
    R = cem.random_rotations(20000, torch.Generator().manual_seed(0), dtype=F64)
    # Haar measure: E[R] = 0 and E[tr(R)^2] = 1; the angle has density (1 - cos t) / pi,
    # whose mean is pi/2 + 2/pi.
    assert R.mean(0).abs().max() < 0.02
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(float((tr**2).mean()) - 1.0) < 0.05
    angle = cem.angular_distance(R, torch.eye(3, dtype=F64).expand_as(R))
    assert abs(float(angle.mean()) - (math.pi / 2 + 2 / math.pi)) < 0.02


def test_super_fibonacci_grid_covers_so3():
    grid = cem.super_fibonacci_rotations(1536)
    probes = cem.random_rotations(300, torch.Generator().manual_seed(0), dtype=F64)
    d = cem.angular_distance_deg(probes[:, None], grid[None]).amin(1)
    assert cem.is_rotation(grid, atol=1e-12).all()
    assert d.max() < 25.0  # ~21 degree spacing


# --------------------------------------------------------------------------- quaternions / axis-angle


def test_quaternion_round_trip():
    R = cem.random_rotations(500, torch.Generator().manual_seed(0), dtype=F64)
    q = cem.matrix_to_quaternion(R)
    assert (q[:, 0] >= 0).all()
    assert torch.allclose(cem.quaternion_to_matrix(q), R, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(axis=vec3, theta=st.floats(0.0, math.pi - 1e-6))
def test_axis_angle_round_trip(axis, theta):
    u = torch.tensor(axis, dtype=F64)
    u = u / u.norm()
    R = cem.axis_angle_to_matrix(theta * u)
    assert cem.is_rotation(R, atol=1e-12)
    assert torch.allclose(R, cem.rodrigues(torch.tensor(theta, dtype=F64), u), atol=1e-12)
    assert torch.allclose(cem.matrix_to_axis_angle(R), theta * u, atol=1e-9)


def test_matrix_to_axis_angle_angle_range():
    R = cem.random_rotations(1000, torch.Generator().manual_seed(0), dtype=F64)
    v = cem.matrix_to_axis_angle(R)
    assert (v.norm(dim=-1) <= math.pi + 1e-12).all()
    assert torch.allclose(cem.axis_angle_to_matrix(v), R, atol=1e-12)


@pytest.mark.parametrize(
    "rotvec",
    [
        [0.0, 0.0, 0.0],  # theta = 0 exactly
        [1e-7, -2e-7, 3e-8],  # theta -> 0
        [0.3, -0.4, 0.5],
        [0.0, 0.0, math.pi],  # theta = pi exactly
        [math.pi / math.sqrt(3) - 1e-7] * 3,  # theta -> pi
        [0.0, 2.0, 3.0],  # theta > pi
    ],
)
def test_axis_angle_to_matrix_gradcheck(rotvec):
    v = torch.tensor(rotvec, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cem.axis_angle_to_matrix, (v,))
    # And the value matches Rodrigues' closed form away from 0.
    t = float(torch.tensor(rotvec, dtype=F64).norm())
    if t > 1e-3:
        u = v.detach() / t
        assert torch.allclose(
            cem.axis_angle_to_matrix(v.detach()), cem.rodrigues(torch.tensor(t, dtype=F64), u), atol=1e-12
        )


@pytest.mark.parametrize("theta", [0.0, 1e-6, 0.7, math.pi - 1e-3])
def test_matrix_to_axis_angle_gradcheck(theta):
    u = torch.tensor([0.6, -0.48, 0.64], dtype=F64)
    R = cem.axis_angle_to_matrix(theta * u).requires_grad_()
    assert torch.autograd.gradcheck(cem.matrix_to_axis_angle, (R,))
    g = torch.autograd.grad(cem.matrix_to_axis_angle(R).sum(), R)[0]
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("theta", [0.0, 1e-8, 1.0, math.pi - 1e-6, math.pi])
def test_rodrigues_gradcheck(theta):
    t = torch.tensor([theta], dtype=F64, requires_grad=True)
    u = torch.tensor([[0.0, 0.6, 0.8]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cem.rodrigues, (t, u))


# --------------------------------------------------------------------------- the paper's pose step


def test_perturbation_angle_is_theta():
    R = cem.random_rotations(5, torch.Generator().manual_seed(0), dtype=F64)
    theta = torch.tensor([0.0, 0.1, 1.0, 2.5, math.pi], dtype=F64)
    u = torch.nn.functional.normalize(torch.randn(5, 3, dtype=F64), dim=-1)
    Rp = cem.perturb_rotations(R, theta, u)
    assert cem.is_rotation(Rp, atol=1e-12).all()
    assert torch.allclose(Rp, cem.rodrigues(theta, u) @ R, atol=1e-14)
    assert torch.allclose(cem.angular_distance(Rp, R), theta, atol=1e-7)


def test_perturbation_is_differentiable():
    R = cem.random_rotations(2, torch.Generator().manual_seed(0), dtype=F64)
    theta = torch.tensor([1e-7, 0.5], dtype=F64, requires_grad=True)
    u = torch.tensor([[1e-6, -2e-6, 5e-7], [0.0, 0.0, 1.0]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a: cem.perturb_rotations(R, t, a), (theta, u))


def test_clamp_axis_angle():
    theta = torch.tensor([-0.3, 0.5, 4.0])
    axis = torch.tensor([[0.0, 0.0, 2.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    t, u = cem.clamp_axis_angle(theta, axis)
    assert torch.allclose(t, torch.tensor([0.0, 0.5, math.pi]))
    assert torch.allclose(u, torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    p_theta, p_axis = torch.nn.Parameter(theta.clone()), torch.nn.Parameter(axis.clone())
    cem.clamp_axis_angle_(p_theta, p_axis)
    assert torch.equal(p_theta.data, t) and torch.equal(p_axis.data, u)


@settings(max_examples=60, deadline=None)
@given(theta=st.floats(-3 * math.pi, 3 * math.pi, allow_nan=False), axis=vec3)
def test_canonicalize_keeps_the_rotation(theta, axis):
    t = torch.tensor(theta, dtype=F64)
    u = torch.tensor(axis, dtype=F64)
    u = u / u.norm()
    t2, u2 = cem.canonicalize_axis_angle(t, u)
    assert 0 <= float(t2) <= math.pi + 1e-12
    assert torch.allclose(u2.norm(), torch.tensor(1.0, dtype=F64))
    assert torch.allclose(cem.rodrigues(t2, u2), cem.rodrigues(t, u), atol=1e-9)


def test_canonicalize_examples():
    u = torch.tensor([[0.0, 0.0, 1.0]] * 3, dtype=F64)
    t, a = cem.canonicalize_axis_angle(torch.tensor([-0.5, 4.0, 1.0], dtype=F64), u)
    assert torch.allclose(t, torch.tensor([0.5, 2 * math.pi - 4.0, 1.0], dtype=F64))
    assert torch.equal(a[:, 2], torch.tensor([-1.0, -1.0, 1.0], dtype=F64))


def test_jitter_rotations_angles_in_range():
    R = cem.random_rotations(400, torch.Generator().manual_seed(0), dtype=F64)
    Rj = cem.jitter_rotations(R, 45.0, 90.0, torch.Generator().manual_seed(1))
    d = cem.angular_distance_deg(Rj, R)
    assert cem.is_rotation(Rj, atol=1e-12).all()
    assert d.min() >= 45.0 - 1e-6 and d.max() <= 90.0 + 1e-6
    assert d.min() < 47 and d.max() > 88  # spread over the range
    with pytest.raises(ValueError, match="min_angle_deg"):
        cem.jitter_rotations(R, 90.0, 45.0)


# --------------------------------------------------------------------------- RELION Euler angles


def test_relion_euler_matrix_is_the_transposed_zyz_product():
    """RELION's Euler_angles2matrix: A = (Rz(rot) Ry(tilt) Rz(psi))^T, built here from scratch."""
    for rot, tilt, psi in [(30.0, 40.0, 50.0), (-120.0, 170.0, 10.0), (0.0, 90.0, 0.0)]:
        expected = (rz(math.radians(rot)) @ ry(math.radians(tilt)) @ rz(math.radians(psi))).T
        got = cem.relion_euler_to_matrix(torch.tensor([rot, tilt, psi], dtype=F64))
        assert torch.allclose(got, expected, atol=1e-14)
    # RELION's own numbers for (0, 90, 0): A = [[0, 0, -1], [0, 1, 0], [1, 0, 0]].
    A = cem.relion_euler_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=F64))
    assert torch.allclose(A, torch.tensor([[0.0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=F64), atol=1e-15)


def test_cryodrgn_reads_relion_angles_into_the_same_matrix():
    """Transcript of cryoDRGN's utils.R_from_relion: its sign flips give RELION's A too."""
    rot, tilt, psi = (math.radians(a) for a in (37.0, 71.0, -123.0))
    Rb = torch.tensor(
        [[math.cos(tilt), 0, -math.sin(tilt)], [0, 1, 0], [math.sin(tilt), 0, math.cos(tilt)]], dtype=F64
    )
    R = rz(psi) @ Rb @ rz(rot)
    for i, j in ((0, 1), (1, 0), (1, 2), (2, 1)):
        R[i, j] *= -1
    ours = cem.relion_euler_to_matrix(torch.tensor([37.0, 71.0, -123.0], dtype=F64))
    assert torch.allclose(R, ours, atol=1e-14)


def test_matrix_to_euler_round_trip():
    R = cem.random_rotations(1000, torch.Generator().manual_seed(0), dtype=F64)
    e = cem.matrix_to_relion_euler(R)
    assert (e[:, 1] >= 0).all() and (e[:, 1] <= 180).all()
    assert (e[:, [0, 2]] > -180).all() and (e[:, [0, 2]] <= 180).all()
    assert torch.allclose(cem.relion_euler_to_matrix(e), R, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(rot=st.floats(-179.9, 180), tilt=st.floats(0.5, 179.5), psi=st.floats(-179.9, 180))
def test_euler_to_matrix_to_euler(rot, tilt, psi):
    e = torch.tensor([rot, tilt, psi], dtype=F64)
    back = cem.matrix_to_relion_euler(cem.relion_euler_to_matrix(e))
    diff = torch.remainder(back - e + 180.0, 360.0) - 180.0
    assert diff.abs().max() < 1e-8


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_euler_gimbal_lock(tilt):
    e = torch.tensor([25.0, tilt, 40.0], dtype=F64)
    R = cem.relion_euler_to_matrix(e)
    back = cem.matrix_to_relion_euler(R)
    assert back[0] == 0.0 and back[1] == tilt  # RELION's choice: rot = 0
    assert torch.allclose(cem.relion_euler_to_matrix(back), R, atol=1e-12)


def test_projection_direction_follows_rot_and_tilt(gaussian_blob):
    """A blob on the viewing axis (sin t cos r, sin t sin r, cos t) projects onto the image centre."""
    rot, tilt, psi = 35.0, 60.0, -20.0
    R = cem.relion_euler_to_matrix(torch.tensor([[rot, tilt, psi]], dtype=F64))
    r, t = math.radians(rot), math.radians(tilt)
    d = torch.tensor([math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)], dtype=F64)
    assert torch.allclose(cem.projection_direction(R[0]), d, atol=1e-14)
    D = 24
    img = cem.project(gaussian_blob(D, (6 * d).tolist(), sigma=1.0), R)[0]
    assert divmod(int(img.argmax()), D) == (D // 2, D // 2)


# --------------------------------------------------------------------------- distances


def test_angular_distance():
    R = cem.random_rotations(50, torch.Generator().manual_seed(0), dtype=F64)
    S = cem.random_rotations(50, torch.Generator().manual_seed(1), dtype=F64)
    d = cem.angular_distance(R, S)
    assert torch.allclose(d, cem.angular_distance(S, R), atol=1e-12)
    assert torch.equal(cem.angular_distance(R, R), torch.zeros(50, dtype=F64))
    # Equals 2 arccos |<q1, q2>| (the authors' pose error) and acos((tr - 1) / 2).
    q1, q2 = cem.matrix_to_quaternion(R), cem.matrix_to_quaternion(S)
    assert torch.allclose(d, 2 * torch.arccos((q1 * q2).sum(-1).abs().clamp(max=1)), atol=1e-7)
    tr = (R.transpose(-1, -2) @ S).diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(d, torch.arccos(((tr - 1) / 2).clamp(-1, 1)), atol=1e-7)
    assert torch.allclose(cem.angular_distance_deg(R, S), torch.rad2deg(d))
    # Accurate for tiny angles, where arccos of the trace is not.
    tiny = cem.rodrigues(torch.tensor([1e-7], dtype=F64), torch.tensor([[0.0, 0.0, 1.0]], dtype=F64))
    assert abs(float(cem.angular_distance(tiny, torch.eye(3, dtype=F64)[None])) - 1e-7) < 1e-13


def test_rotation_argument_errors():
    with pytest.raises(ValueError, match="rotvec"):
        cem.axis_angle_to_matrix(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="R"):
        cem.matrix_to_quaternion(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="theta"):
        cem.rodrigues(torch.zeros(2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="rotations"):
        cem.perturb_rotations(torch.eye(3), torch.zeros(1), torch.zeros(1, 3))
