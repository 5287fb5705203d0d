"""Coordinate grids for neural fields."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fieldkern.checks import is_int


def grid_coordinates(
    shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel/voxel-centre coordinates of a regular grid on [-0.5, 0.5) per axis.

    Sample ``j`` of an axis with ``N`` samples sits at ``-0.5 + (j + 0.5) / N``.

    Args:
        shape: samples per axis of a 1D, 2D ``(H, W)`` or 3D ``(D, H, W)`` array.
        device, dtype: of the result (floating dtype).

    Returns:
        ``(*shape, len(shape))``. The last axis holds ``(x, y[, z])`` with ``x`` running
        along the *last* array axis, so an image indexed ``[y, x]`` or a volume indexed
        ``[z, y, x]`` (MRC order) gets coordinates in the order a rotation acting on
        ``(x, y, z)`` expects.
    """
    if isinstance(shape, int) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape must have 1, 2 or 3 axes, got {tuple(shape)}")
    if any(not is_int(n) or n < 1 for n in shape):
        raise ValueError(f"shape must hold positive ints, got {tuple(shape)}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n - 0.5 for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)
