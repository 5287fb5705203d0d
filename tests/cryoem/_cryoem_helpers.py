"""Shared builders for the reconstruction tests (imported as a plain module)."""

import torch


def random_blobs(D: int, generator: torch.Generator) -> torch.Tensor:
    """Four Gaussian blobs (width 2 voxels^2 variance) at random centres within 0.2 D of
    the box centre, ``(D, D, D)`` float32; draws 4 x 3 numbers from ``generator``."""
    c = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D)
    for _ in range(4):
        m = (torch.rand(3, generator=generator) - 0.5) * D * 0.4
        vol += torch.exp(-((x - m[0]) ** 2 + (y - m[1]) ** 2 + (z - m[2]) ** 2) / 4.0)
    return vol
