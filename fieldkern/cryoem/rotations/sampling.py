"""Sets of rotations: uniform random draws and a deterministic near-uniform grid."""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_count
from fieldkern.cryoem.rotations.conversions import quaternion_to_matrix


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
