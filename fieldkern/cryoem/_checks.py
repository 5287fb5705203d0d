"""Argument checks only the cryo-EM layer needs (image stacks, CTF units); the shared ones are
in :mod:`fieldkern.checks`."""

from __future__ import annotations


import numpy as np
import torch

from fieldkern.checks import check_count, check_floating, to_numpy


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
