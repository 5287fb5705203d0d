"""Conversions between rotation representations: matrices, quaternions, axis-angle
(exponential and logarithm maps, Rodrigues' formula) and RELION Euler angles.

Conventions are those of :mod:`fieldkern.cryoem.rotations`.
"""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_floating, check_matrices, check_proper_rotations, check_vectors

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
    t0, t1, t2, t3 = two[..., 0], two[..., 1], two[..., 2], two[..., 3]
    # Row k: the quaternion computed from component k (w, x, y, z).
    candidates = torch.stack(
        [
            torch.stack([t0 / 4, (m21 - m12) / t0, (m02 - m20) / t0, (m10 - m01) / t0], -1),
            torch.stack([(m21 - m12) / t1, t1 / 4, (m01 + m10) / t1, (m02 + m20) / t1], -1),
            torch.stack([(m02 - m20) / t2, (m01 + m10) / t2, t2 / 4, (m12 + m21) / t2], -1),
            torch.stack([(m10 - m01) / t3, (m02 + m20) / t3, (m12 + m21) / t3, t3 / 4], -1),
        ],
        -2,
    )
    best = four_sq.argmax(-1)
    q = torch.take_along_dim(candidates, best[..., None, None].expand(*best.shape, 1, 4), -2)[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


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
            ``u`` after each optimiser step, see :func:`fieldkern.cryoem.clamp_axis_angle`); a
            non-unit ``u`` gives a non-orthogonal ``dR``. The formula is smooth in theta and
            u, so gradients are defined everywhere, also at theta = 0 and theta = pi.

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


# ---------------------------------------------------------------------------------------
# RELION Euler angles
# ---------------------------------------------------------------------------------------


def relion_euler_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """RELION ``(rot, tilt, psi)`` in degrees ``(..., 3)`` to rotation matrices ``(..., 3, 3)``.

    Identical to RELION's ``Euler_angles2matrix``: ``R = (Rz(rot) Ry(tilt) Rz(psi))^T``
    with ``Rz``/``Ry`` the usual active rotations. In fieldkern's projection convention the
    particle image is ``I = project(V, R)``, and the viewing direction in the map's
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
