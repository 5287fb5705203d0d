"""Perturbations ``R <- dR R`` of rotations: the paper's axis-angle pose update with its
projection step, and random jitter by a chosen angle."""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_floating, check_rotations, check_vectors
from fieldkern.cryoem.rotations.conversions import matmul3, rodrigues


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
