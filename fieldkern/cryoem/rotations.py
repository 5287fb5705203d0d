"""Rotations: random sampling, axis-angle (Rodrigues), quaternions, RELION Euler angles.

Conventions
-----------
* A rotation matrix ``R`` acts on column vectors ``(x, y, z)``; batches are ``(..., 3, 3)``.
* Projection convention of fieldkern (see :mod:`fieldkern.cryoem.projection`):
  ``I[y, x] = sum_k V(R^T (x, y, z_k))``, so ``R`` maps volume coordinates to image
  coordinates and the viewing direction in the volume frame is ``R^T e_z`` (third row of R).
* Quaternions are ``(w, x, y, z)`` with ``w >= 0``.
* Axis-angle: angle ``theta`` in radians about unit axis ``u``; a rotation vector is
  ``theta * u``.
* RELION Euler angles ``(rot, tilt, psi)`` in degrees (ZYZ): ``R`` equals RELION's
  ``Euler_angles2matrix(rot, tilt, psi)`` (the matrix ``A`` its projector uses: RELION's
  ``Projector::project`` samples the 3D transform at ``A^-1 (x, y, 0) = A^T (x, y, 0)``, which
  by the Fourier-slice theorem is our real-space ``I = sum_z V(A^T (x, y, z))``). So STAR
  angles map to our ``R`` directly, no transpose.
"""

from __future__ import annotations

import math

import torch

from fieldkern.cryoem._checks import (
    ROTATION_ATOL,
    check_count,
    check_floating,
    check_matrices,
    check_proper_rotations,
    check_rotations,
    check_vectors,
)


# Below this |theta|^2 the exp/log maps use Taylor series, so values and gradients stay
# finite at theta = 0 (the closed forms are 0/0 there).
_SMALL_ANGLE_SQ = 1e-4


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``[v]_x`` with ``[v]_x w = v x w``; ``(..., 3) -> (..., 3, 3)``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)],
        -2,
    )


def _eye_like(v: torch.Tensor, batch_shape) -> torch.Tensor:
    return torch.eye(3, dtype=v.dtype, device=v.device).expand(*batch_shape, 3, 3)


def _skew_sq(v: torch.Tensor) -> torch.Tensor:
    """``[v]_x^2 = v v^T - |v|^2 I`` (any v, not only unit)."""
    outer = v[..., :, None] * v[..., None, :]
    return outer - (v * v).sum(-1)[..., None, None] * _eye_like(v, v.shape[:-1])


def matmul3(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for broadcastable ``(..., 3, 3)`` batches, elementwise (no BLAS call).

    BLAS is pointless for 3 x 3 products, and on a busy multi-core CPU a threaded BLAS call
    can cost milliseconds of synchronisation each; this stays in cheap elementwise kernels.
    """
    return (A[..., :, :, None] * B[..., None, :, :]).sum(-2)


# ---------------------------------------------------------------------------------------
# Quaternions
# ---------------------------------------------------------------------------------------


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` (w, x, y, z; normalised here) to matrices ``(..., 3, 3)``."""
    check_vectors("q", q, 4)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` to unit quaternions ``(..., 4)`` (w, x, y, z), ``w >= 0``.

    Shepperd's method: of the four algebraically equivalent formulas, the one dividing by
    the largest component is used, so values and gradients stay well conditioned.
    """
    check_proper_rotations("R", R)
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    four_sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
    )
    # Clamp keeps sqrt and the divisions finite in the branches that are not selected
    # (torch.where still differentiates them).
    two = 2 * torch.sqrt(four_sq.clamp_min(0.01))  # 4 * |component| where selected
    candidates = torch.stack(
        [
            torch.stack(
                [
                    two[..., 0] / 4,
                    (m21 - m12) / two[..., 0],
                    (m02 - m20) / two[..., 0],
                    (m10 - m01) / two[..., 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    (m21 - m12) / two[..., 1],
                    two[..., 1] / 4,
                    (m01 + m10) / two[..., 1],
                    (m02 + m20) / two[..., 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    (m02 - m20) / two[..., 2],
                    (m01 + m10) / two[..., 2],
                    two[..., 2] / 4,
                    (m12 + m21) / two[..., 2],
                ],
                -1,
            ),
            torch.stack(
                [
                    (m10 - m01) / two[..., 3],
                    (m02 + m20) / two[..., 3],
                    (m12 + m21) / two[..., 3],
                    two[..., 3] / 4,
                ],
                -1,
            ),
        ],
        -2,
    )
    best = four_sq.argmax(-1)
    q = torch.take_along_dim(candidates, best[..., None, None].expand(*best.shape, 1, 4), -2)[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


# ---------------------------------------------------------------------------------------
# Random rotations
# ---------------------------------------------------------------------------------------


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """``n`` rotations drawn uniformly (Haar measure on SO(3)), ``(n, 3, 3)``.

    Normalised 4D Gaussian vectors are uniform unit quaternions. Drawn in float64 on the
    generator's device, then cast, so a seed gives the same rotations for any ``dtype``.
    """
    n = check_count("n", n, 0)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    gen_device = generator.device if generator is not None else "cpu"
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=gen_device)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


def super_fibonacci_rotations(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``n`` deterministic, near-uniformly spread rotations ``(n, 3, 3)``.

    The super-Fibonacci spiral on the unit quaternions (Alexa, CVPR 2022); used as the
    coarse grid of the rotation search in :func:`fieldkern.cryoem.align_volume`.
    """
    n = check_count("n", n)
    phi = math.sqrt(2.0)
    psi = 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r = torch.sqrt(s / n)
    big_r = torch.sqrt(1.0 - s / n)
    alpha = 2 * math.pi * s / phi
    beta = 2 * math.pi * s / psi
    q = torch.stack(
        [r * torch.sin(alpha), r * torch.cos(alpha), big_r * torch.sin(beta), big_r * torch.cos(beta)], -1
    )
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# Axis-angle
# ---------------------------------------------------------------------------------------


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Exponential map: rotation vectors ``theta * u`` ``(..., 3)`` to matrices ``(..., 3, 3)``.

    ``R = I + A(theta) [v]_x + B(theta) [v]_x^2`` with ``A = sin(theta)/theta`` and
    ``B = (1 - cos theta)/theta^2``; both are even functions of theta, evaluated by Taylor
    series for small theta, so the map and its gradient are smooth everywhere, including
    theta = 0 and theta = pi (and beyond; the map is 2*pi-periodic along each axis).
    """
    check_vectors("rotvec", rotvec)
    t2 = (rotvec * rotvec).sum(-1)
    small = t2 < _SMALL_ANGLE_SQ
    # Double-where: the closed form is evaluated on a safe theta where it is not used, so
    # its (unused) gradient cannot be NaN.
    t2_safe = torch.where(small, torch.ones_like(t2), t2)
    t = torch.sqrt(t2_safe)
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(t)) / t2_safe)
    eye = _eye_like(rotvec, rotvec.shape[:-1])
    return eye + a[..., None, None] * _skew(rotvec) + b[..., None, None] * _skew_sq(rotvec)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Logarithm map: matrices ``(..., 3, 3)`` to rotation vectors ``theta * u`` ``(..., 3)``.

    theta is in [0, pi].

    Via the quaternion ``(w, v)`` (``w >= 0``): ``theta = 2 atan2(|v|, w)`` and
    ``theta * u = v * theta / |v|``, with a Taylor series for ``theta / |v|`` at small |v|, so
    gradients are finite at theta -> 0. At theta -> pi the gradient is finite for
    theta < pi; at exactly pi the axis sign is arbitrary (``u`` and ``-u`` are the same
    rotation), which is an inherent discontinuity of any log map.
    """
    q = matrix_to_quaternion(R)
    w, v = q[..., 0], q[..., 1:]
    n2 = (v * v).sum(-1)
    small = n2 < _SMALL_ANGLE_SQ
    n2_safe = torch.where(small, torch.ones_like(n2), n2)
    n = torch.sqrt(n2_safe)
    # For small |v|, w ~ 1 and 2 atan(n / w) / n = (2 / w) (1 - r/3 + r^2/5 - r^3/7), r = n^2 / w^2.
    w_safe = torch.where(small, w, torch.ones_like(w))
    r = n2 / (w_safe * w_safe)
    series = (2 / w_safe) * (1 - r / 3 + r * r / 5 - r * r * r / 7)
    factor = torch.where(small, series, 2 * torch.atan2(n, w) / n)
    return v * factor[..., None]


def rodrigues(theta: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """The paper's pose perturbation ``dR = I + sin(theta) [u]_x + (1 - cos(theta)) [u]_x^2``.

    Args:
        theta: angles in radians, shape ``(...)``.
        axis: axes ``u``, shape ``(..., 3)``, used exactly as given (the paper renormalises
            ``u`` after each optimiser step, see :func:`clamp_axis_angle`); a non-unit ``u``
            gives a non-orthogonal ``dR``. The formula is smooth in theta and u, so gradients
            are defined everywhere, also at theta = 0 and theta = pi.

    Returns:
        ``(..., 3, 3)``.
    """
    check_floating("theta", theta)
    check_vectors("axis", axis)
    if theta.shape != axis.shape[:-1]:
        raise ValueError(
            f"theta must have shape axis.shape[:-1] = {tuple(axis.shape[:-1])}, got {tuple(theta.shape)}"
        )
    eye = _eye_like(axis, axis.shape[:-1])
    s, c = torch.sin(theta)[..., None, None], torch.cos(theta)[..., None, None]
    return eye + s * _skew(axis) + (1 - c) * _skew_sq(axis)


def perturb_rotations(rotations: torch.Tensor, theta: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """The paper's pose update ``R_hat <- dR R_hat`` with ``dR = rodrigues(theta, axis)``.

    ``rotations`` ``(B, 3, 3)``, ``theta`` ``(B,)`` radians, ``axis`` ``(B, 3)``; returns ``(B, 3, 3)``.
    Differentiable with respect to theta and axis (the trainer optimises those).
    """
    check_rotations("rotations", rotations)
    return matmul3(rodrigues(theta, axis), rotations)


def _normalize_axis(axis: torch.Tensor) -> torch.Tensor:
    n = axis.norm(dim=-1, keepdim=True)
    ez = torch.zeros_like(axis)
    ez[..., 2] = 1
    # A zero axis has no direction; e_z keeps the constraint |u| = 1 (any axis is right
    # for theta = 0, and for theta > 0 there is nothing better to pick).
    return torch.where(n > 0, axis / n.clamp_min(torch.finfo(axis.dtype).tiny), ez)


def clamp_axis_angle(theta: torch.Tensor, axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's projection step after an optimiser update: theta clamped to [0, pi], u normalised.

    Note: clamping changes the rotation when theta left [0, pi] (e.g. theta = -0.1 becomes
    the identity). :func:`canonicalize_axis_angle` is the alternative that keeps the rotation.
    A zero axis becomes e_z. Returns new tensors ``(theta, axis)``; see
    :func:`clamp_axis_angle_` for the in-place version used on parameters.
    """
    check_floating("theta", theta)
    check_vectors("axis", axis)
    return theta.clamp(0.0, math.pi), _normalize_axis(axis)


@torch.no_grad()
def clamp_axis_angle_(theta: torch.Tensor, axis: torch.Tensor) -> None:
    """In-place :func:`clamp_axis_angle` (no autograd), for ``nn.Parameter`` tensors."""
    t, u = clamp_axis_angle(theta, axis)
    theta.copy_(t)
    axis.copy_(u)


def canonicalize_axis_angle(theta: torch.Tensor, axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map ``(theta, u)`` to theta in [0, pi] *without changing the rotation*.

    theta is first wrapped to [-pi, pi) (rotations are 2*pi-periodic), then
    theta < 0 becomes ``(-theta, -u)``; so theta in (pi, 2*pi) becomes ``(2*pi - theta, -u)``.
    ``u`` is normalised (zero axis -> e_z).
    """
    check_floating("theta", theta)
    check_vectors("axis", axis)
    u = _normalize_axis(axis)
    t = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
    neg = t < 0
    return torch.where(neg, -t, t), torch.where(neg[..., None], -u, u)


def jitter_rotations(
    rotations: torch.Tensor,
    min_angle_deg: float,
    max_angle_deg: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``dR @ R`` with ``dR`` about a uniformly random axis by an angle uniform in [min, max] degrees.

    The paper's coarse pose initialisation (main text: [45, 90] degrees; appendix E: [0, 180]).
    The geodesic distance to ``R`` is exactly the drawn angle. ``(B, 3, 3) -> (B, 3, 3)``.
    """
    B = check_rotations("rotations", rotations)
    if not 0 <= min_angle_deg <= max_angle_deg <= 180:
        raise ValueError(
            f"need 0 <= min_angle_deg <= max_angle_deg <= 180, got {min_angle_deg}, {max_angle_deg}"
        )
    dev = generator.device if generator is not None else "cpu"
    axis = torch.randn(B, 3, generator=generator, dtype=torch.float64, device=dev)
    angle = torch.rand(B, generator=generator, dtype=torch.float64, device=dev)
    angle = math.radians(min_angle_deg) + angle * math.radians(max_angle_deg - min_angle_deg)
    dR = rodrigues(angle, _normalize_axis(axis)).to(rotations)
    return matmul3(dR, rotations)


# ---------------------------------------------------------------------------------------
# RELION Euler angles
# ---------------------------------------------------------------------------------------


def relion_euler_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """RELION ``(rot, tilt, psi)`` in degrees ``(..., 3)`` to rotation matrices ``(..., 3, 3)``.

    Identical to RELION's ``Euler_angles2matrix``: ``R = (Rz(rot) Ry(tilt) Rz(psi))^T``
    with ``Rz``/``Ry`` the usual active rotations. In fieldkern's projection convention the
    particle image is ``I = project_volume(V, R)``, and the viewing direction in the map's
    frame is ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``.
    """
    check_vectors("angles_deg", angles_deg)
    a, b, g = torch.deg2rad(angles_deg).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_relion_euler(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` to RELION ``(rot, tilt, psi)`` in degrees ``(..., 3)``.

    RELION's ``Euler_matrix2angles``: tilt in [0, 180], rot and psi in (-180, 180], float64. At
    gimbal lock (sin tilt ~ 0) rot is set to 0 and the in-plane angle goes into psi, as in
    RELION. ``relion_euler_to_matrix(matrix_to_relion_euler(R)) == R`` to rounding.
    """
    check_proper_rotations("R", R)
    R = R.to(torch.float64)
    sb = torch.sqrt(R[..., 0, 2] ** 2 + R[..., 1, 2] ** 2)
    # RELION's threshold (16 * FLT_EPSILON).
    regular = sb > 16 * 1.1920929e-07
    psi = torch.atan2(R[..., 1, 2], -R[..., 0, 2])
    rot = torch.atan2(R[..., 2, 1], R[..., 2, 0])
    tilt = torch.atan2(sb, R[..., 2, 2])
    up = R[..., 2, 2] > 0
    lock_psi = torch.where(
        up, torch.atan2(-R[..., 1, 0], R[..., 0, 0]), torch.atan2(R[..., 1, 0], -R[..., 0, 0])
    )
    lock_tilt = torch.where(up, torch.zeros_like(tilt), torch.full_like(tilt, math.pi))
    rot = torch.where(regular, rot, torch.zeros_like(rot))
    tilt = torch.where(regular, tilt, lock_tilt)
    psi = torch.where(regular, psi, lock_psi)
    out = torch.rad2deg(torch.stack([rot, tilt, psi], -1))
    # atan2 gives [-180, 180]; map -180 to 180 so the range is (-180, 180].
    return torch.where(out <= -180.0, out + 360.0, out)


def projection_direction(R: torch.Tensor) -> torch.Tensor:
    """Viewing (projection) direction in the map's frame, ``R^T e_z``: ``(..., 3, 3) -> (..., 3)``."""
    check_matrices("R", R)
    return R[..., 2, :]


# ---------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------


def angular_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations, in **radians** in [0, pi]; ``(..., 3, 3) -> (...)``.

    The angle of ``R1^T R2``, computed as ``2 atan2(|v|, |w|)`` from its quaternion, which
    equals ``2 arccos(|<q1, q2>|)`` but stays accurate for tiny angles.

    Raises ValueError unless both hold rotations (orthonormal, det +1, to 1e-3): for other
    matrices the quaternion, and so the angle, is meaningless (``2 I`` against ``I`` gave 0).
    That check reads the values back to the host; it is meant for evaluation, not per-step
    losses (fieldkern calls it only in reports, through ``pose_errors_deg``).
    """
    check_matrices("R1", R1)
    check_matrices("R2", R2)
    for name, R in (("R1", R1), ("R2", R2)):
        ok = is_rotation(R.detach(), ROTATION_ATOL)
        if not bool(ok.all()):
            bad = torch.nonzero(~ok.reshape(-1))[:5, 0].tolist()
            raise ValueError(
                f"{name} must hold rotation matrices (orthonormal with det +1, to {ROTATION_ATOL:g}); "
                f"the matrices at flat batch index {bad} are not (NaN, scaled or reflected?)"
            )
    q = matrix_to_quaternion(matmul3(R1.transpose(-1, -2), R2))
    return 2 * torch.atan2(q[..., 1:].norm(dim=-1), q[..., 0].abs())


def angular_distance_deg(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """:func:`angular_distance` in **degrees**."""
    return torch.rad2deg(angular_distance(R1, R2))


def is_rotation(R: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
    """Whether each ``(..., 3, 3)`` matrix is orthogonal with determinant +1 (bool ``(...)``)."""
    check_matrices("R", R)
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    orth = (matmul3(R.transpose(-1, -2), R) - eye).abs().amax((-1, -2)) <= atol
    return orth & ((torch.linalg.det(R) - 1).abs() <= atol)
