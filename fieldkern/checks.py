"""Argument checks shared by every layer (ops, nn, train, cryoem, image): cheap, Python-level,
naming the argument. Domain-only checks (CTF units, image layouts) live beside their domain
in ``cryoem/_checks.py`` and ``image/_checks.py``."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_floating(name: str, t: object) -> torch.Tensor:
    check_tensor(name, t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    return t


def check_coordinates(x: torch.Tensor, in_features: int, name: str = "x",
                      dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    """``(..., in_features)`` floating coordinates; with ``dtype``/``device``, of the
    parameters' dtype (numpy-built coordinates are float64 while models are float32) and on
    their device."""
    check_floating(name, x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{name} must have shape (..., {in_features}) (one coordinate per input "
            f"feature), got {tuple(x.shape)}"
        )
    check_dtype(name, x, dtype)
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, the model's parameters on {device}: move one of them "
                         f"(x.to({str(device)!r}) or model.to({str(x.device)!r}))")


def check_dtype(name: str, t: torch.Tensor | None, dtype: torch.dtype | None) -> None:
    """``t`` of the parameters' ``dtype`` (None: no check). Autocast regions are left to
    autocast, which casts the operands itself."""
    if t is None or dtype is None or t.dtype == dtype or torch.is_autocast_enabled(t.device.type):
        return
    raise TypeError(
        f"{name} must have the parameters' dtype {dtype}, got {t.dtype} "
        f"(convert it with .to({dtype}), or the parameters with .to({t.dtype}))"
    )


def check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...],
                dtype: torch.dtype | None = None) -> None:
    if t is None:
        return
    check_floating(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    check_dtype(name, t, dtype)


def check_volume(name: str, v: object) -> int:
    """A cubic, even-sized, floating (D, D, D) tensor; returns D."""
    check_floating(name, v)
    if v.dim() != 3:
        raise ValueError(f"{name} must have shape (D, D, D), got {tuple(v.shape)}")
    if not (v.shape[0] == v.shape[1] == v.shape[2]):
        raise ValueError(f"{name} must be cubic (D, D, D), got {tuple(v.shape)}")
    if v.shape[0] % 2 or v.shape[0] < 2:
        raise ValueError(f"{name} must have an even size D, got D = {v.shape[0]}")
    return v.shape[0]


def check_rotations(name: str, r: object, improper: bool = False) -> int:
    """Floating ``(B, 3, 3)`` rotation matrices (:func:`check_proper_rotations`; ``improper``:
    orthogonal, a determinant of -1 allowed too); returns B."""
    check_floating(name, r)
    if r.dim() != 3 or r.shape[1:] != (3, 3):
        raise ValueError(f"{name} must have shape (B, 3, 3), got {tuple(r.shape)}")
    _check_orthonormal(name, r, ROTATION_ATOL, improper)
    return r.shape[0]


#: How far from a rotation a matrix may be where rotations enter the public API: max entry of
#: ``|R^T R - I|`` and ``|det R - 1|``. Loose enough for float32 rotations that went through
#: many updates (those made from angles are within ~1e-6), tight enough to catch scaled,
#: sheared or reflected matrices.
ROTATION_ATOL = 1e-3


def check_proper_rotations(name: str, r: object, atol: float = ROTATION_ATOL) -> None:
    """Floating ``(..., 3, 3)`` matrices that are rotations: orthonormal with determinant +1,
    within ``atol``; a scaled matrix, a reflection, a shear or a zero matrix raises ValueError
    (they would give plausible but wrong projections and angles). A matrix holding NaN or inf
    passes: it propagates NaN, which the trainer reports as a diverged pose. Checked on host
    tensors (one small reduction); CUDA tensors get the shape check only, so that per-step
    calls on a GPU never wait for the device."""
    check_floating(name, r)
    if r.dim() < 2 or r.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (..., 3, 3), got {tuple(r.shape)}")
    _check_orthonormal(name, r, atol, improper=False)


def _check_orthonormal(name: str, r: torch.Tensor, atol: float, improper: bool) -> None:
    if r.is_cuda or r.numel() == 0:
        return
    with torch.no_grad():
        m = r.detach().reshape(-1, 3, 3).to(torch.float64)
        orth = (m.transpose(-1, -2) @ m - torch.eye(3, dtype=torch.float64)).abs().amax((-1, -2))
        det = torch.linalg.det(m)
        off = torch.maximum(orth, ((det.abs() if improper else det) - 1).abs())
        off = torch.where(torch.isfinite(m).all(-1).all(-1), off, torch.zeros_like(off))  # NaN propagates
        worst = int(off.argmax())
        if bool(off[worst] > atol):
            what = "orthogonal matrices (determinant +1 or -1" if improper else \
                "rotation matrices (orthonormal, determinant +1"
            raise ValueError(
                f"{name} must be {what}, within {atol:g}); matrix {worst} is not "
                f"(|R^T R - I| up to {float(orth[worst]):.3g}, determinant {float(det[worst]):.4g})"
            )


def check_weight(name: str, w: object) -> tuple[int, int]:
    """A floating ``(hidden, in_features)`` matrix; returns its shape."""
    check_floating(name, w)
    if w.dim() != 2:
        raise ValueError(f"{name} must have shape (hidden, in_features), got {tuple(w.shape)}")
    return tuple(w.shape)


def to_numpy(a: object) -> np.ndarray:
    """A tensor's values (detached, on the host) or ``np.asarray(a)``."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def check_finite(name: str, a: object, where: str = "", hint: str = "") -> None:
    """No NaN or inf in a number, array or tensor (``where`` prefixes the message, ``hint``
    ends it). On a CUDA tensor this waits for the device: callers in per-step paths check
    only host values."""
    if isinstance(a, torch.Tensor):
        ok = bool(torch.isfinite(a).all())
    else:
        arr = np.asarray(a)
        if arr.dtype.kind not in "fc":  # no float64 copy of a large float32 map
            arr = arr.astype(np.float64)
        ok = bool(np.isfinite(arr).all())
    if not ok:
        raise ValueError(f"{where}{name} holds NaN or inf values{hint}")


def is_int(n: object) -> bool:
    """Python or numpy integer (sweeps over ``np.arange`` give numpy ones), not bool (an int
    to Python, but ``True`` as a size is a bug, not a request for 1)."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def check_count(name: str, n: object, minimum: int = 1) -> int:
    """An int (see :func:`is_int`) >= ``minimum``; returns it as a Python int."""
    if not is_int(n) or n < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {n!r}")
    return int(n)


def check_chunk(name: str, c: object) -> int | None:
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or int(c) < 1:
        raise ValueError(f"{name} must be a positive int or None, got {c!r}")
    return int(c)


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
