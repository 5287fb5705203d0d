"""Argument checks of the image experiment, in the style of :mod:`fieldkern.checks`.

Images here are ``(H, W)`` (grey) or channels-last ``(H, W, C)`` with ``C`` at most
:data:`MAX_CHANNELS`, intensities in [0, 1].
"""

from __future__ import annotations

import numpy as np

from fieldkern.checks import check_count, check_finite

# Grey, grey + alpha, RGB, RGBA. A larger last axis is almost always a channels-first
# (C, H, W) array, which would otherwise be read as an image C pixels wide with W channels.
MAX_CHANNELS = 4


def check_size(name: str, size: object) -> tuple[int, int]:
    """``size`` or ``(height, width)``, each an int >= 1; returns ``(height, width)``."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {size!r}")
        return check_count(f"{name}[0]", size[0]), check_count(f"{name}[1]", size[1])
    n = check_count(name, size)
    return n, n


def check_layout(name: str, a: np.ndarray) -> None:
    """``(H, W)`` or ``(H, W, C)``, channels last, ``1 <= C <= MAX_CHANNELS``, not empty."""
    shape = tuple(a.shape)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, C), got {shape}")
    if a.ndim == 3 and a.shape[-1] > MAX_CHANNELS:
        raise ValueError(
            f"{name} must be channels last, (H, W, C) with C <= {MAX_CHANNELS} (grey, grey + alpha, RGB, "
            f"RGBA), got shape {shape}; move the channel axis of a (C, H, W) array last first"
        )
    if 0 in shape:  # numpy or torch, whose .size is a method
        raise ValueError(f"{name} is empty, shape {shape}")


def check_pixels(name: str, a: np.ndarray) -> None:
    """Finite values in [0, 1]."""
    check_finite(name, a)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} values must lie in [0, 1] (as load_images and the built-in datasets return them), "
            f"got values in [{lo:.4g}, {hi:.4g}]; divide 8-bit images by 255"
        )
