"""Argument checks shared by the ops: cheap, Python-level, with the argument's name."""

from __future__ import annotations

import torch


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


def check_coordinates(x: torch.Tensor, in_features: int, name: str = "x") -> None:
    check_floating(name, x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{name} must have shape (..., {in_features}) (one coordinate per input "
            f"feature), got {tuple(x.shape)}"
        )


def check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is None:
        return
    check_floating(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
