"""Argument checks for the cryo-EM layer: cheap, Python-level, naming the argument."""

from __future__ import annotations

import numbers


# The tensor checks the ops need live with the ops (the layer below); re-exported here.
from fieldkern.ops._checks import (  # noqa: F401
    check_chunk,
    check_floating,
    check_rotations,
    check_tensor,
    check_volume,
)


def check_box_size(name: str, D: object) -> int:
    """D must be a positive even int (the centre index D//2 is then unambiguous)."""
    if isinstance(D, bool) or not isinstance(D, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(D).__name__}")
    D = int(D)
    if D < 2 or D % 2:
        raise ValueError(f"{name} must be a positive even number, got {D}")
    return D


def check_positive(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not x > 0 or x != x or x == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {x}")
    return x


def check_images(name: str, x: object) -> int:
    """A floating (..., D, D) tensor with even D; returns D."""
    check_floating(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., D, D), got {tuple(x.shape)}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must hold square images (..., D, D), got {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-1] < 2:
        raise ValueError(f"{name} must have an even image size D, got D = {x.shape[-1]}")
    return x.shape[-1]


def check_matrices(name: str, r: object) -> None:
    """A floating (..., 3, 3) tensor."""
    check_floating(name, r)
    if r.dim() < 2 or r.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (..., 3, 3), got {tuple(r.shape)}")


def check_vectors(name: str, v: object, n: int = 3) -> None:
    check_floating(name, v)
    if v.dim() < 1 or v.shape[-1] != n:
        raise ValueError(f"{name} must have shape (..., {n}), got {tuple(v.shape)}")
