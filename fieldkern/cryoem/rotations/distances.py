"""Distances between rotations: the geodesic angle on SO(3), and the rotation test."""

from __future__ import annotations

import torch

from fieldkern.checks import ROTATION_ATOL, check_matrices
from fieldkern.cryoem.rotations.conversions import matmul3, matrix_to_quaternion


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
