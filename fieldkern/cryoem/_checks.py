"""Argument checks for the cryo-EM layer: cheap, Python-level, naming the argument."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

# The tensor checks the ops need live with the ops (the layer below); re-exported here.
from fieldkern.ops._checks import (  # noqa: F401
    ROTATION_ATOL,
    check_chunk,
    check_count,
    check_finite,
    check_floating,
    check_proper_rotations,
    check_rotations,
    check_tensor,
    check_volume,
    is_int,
    to_numpy,
)


def check_box_size(name: str, D: object) -> int:
    """D must be a positive even int (the centre index D//2 is then unambiguous)."""
    if not is_int(D):
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


def check_finite_number(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x


def _values(a: object) -> np.ndarray:
    """Flat float64 values of a number, array or tensor (for the unit checks below)."""
    return to_numpy(a).astype(np.float64, copy=False).reshape(-1)


#: Above this a "voltage" is almost surely in volts (microscopes for single particles run at
#: 100-300 kV, and the CTF takes kV).
MAX_VOLTAGE_KV = 1000.0
#: Real defocus values are thousands of A; 0 < |df| < 100 is almost surely micrometres.
MIN_DEFOCUS_ANGSTROM = 100.0


def check_voltage_kv(name: str, a: object, where: str = "") -> None:
    v = _values(a)
    high = v[v > MAX_VOLTAGE_KV]
    if high.size:
        raise ValueError(
            f"{where}{name} must be the acceleration voltage in kV (e.g. 300), got {high[0]:g}: "
            f"above {MAX_VOLTAGE_KV:g} kV it looks like volts"
        )
    low = v[~(v > 0)]
    if low.size:
        raise ValueError(f"{where}{name} must be a positive voltage in kV, got {low[0]:g}")


def check_defocus_angstrom(name: str, a: object, where: str = "") -> None:
    d = np.abs(_values(a))
    bad = d[(d > 0) & (d < MIN_DEFOCUS_ANGSTROM)]
    if bad.size:
        raise ValueError(
            f"{where}{name} must be in Angstrom (e.g. 15000 for 1.5 um), got {bad[0]:g}: "
            f"0 < |defocus| < {MIN_DEFOCUS_ANGSTROM:g} A looks like micrometres"
        )


def check_amplitude_contrast(name: str, a: object, where: str = "") -> None:
    w = _values(a)
    bad = w[~((w >= 0) & (w <= 1))]
    if bad.size:
        raise ValueError(f"{where}{name} (amplitude contrast) must lie in [0, 1], got {bad[0]:g}")


def check_ndim(name: str, ndim: object, x: torch.Tensor) -> int:
    """``ndim`` trailing axes of ``x`` to transform: a positive int <= ``x.dim()``."""
    ndim = check_count(name, ndim)
    if x.dim() < ndim:
        raise ValueError(f"{name} = {ndim} needs a tensor with at least {ndim} axes, got shape {tuple(x.shape)}")
    return ndim
