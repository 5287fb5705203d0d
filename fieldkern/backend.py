"""Backend switch: which implementation of each op runs.

``"torch"`` is the plain-PyTorch reference path (any device). ``"triton"`` is the fused
Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). ``"auto"``
(the default) takes Triton for CUDA tensors when it is usable and the reference otherwise,
so callers never branch on hardware.

The initial setting comes from the environment variable ``FIELDKERN_BACKEND``.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "triton")

_ENV_VAR = "FIELDKERN_BACKEND"
_current: str | None = None  # None: not set in code yet, read the environment


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The current backend name: "auto", "torch" or "triton"."""
    if _current is not None:
        return _current
    return _check(os.environ.get(_ENV_VAR, "auto"), f"environment variable {_ENV_VAR}")


class set_backend:
    """Select the backend globally, or for a ``with`` block.

    ``fieldkern.set_backend("torch")`` switches until changed again;
    ``with fieldkern.set_backend("torch"): ...`` switches and restores the previous
    setting when the block exits (also on error).
    """

    def __init__(self, name: str):
        global _current
        new = _check(name, "backend")
        self._previous = _current
        _current = new

    def __enter__(self) -> "set_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = self._previous

    def __repr__(self) -> str:
        return f"set_backend({get_backend()!r})"


def triton_usable(device) -> bool:
    """Whether the Triton path can run on tensors of ``device``."""
    from fieldkern.kernels import AVAILABLE

    if not AVAILABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, *tensors) -> str:
    """Pick "torch" or "triton" for ``op`` on ``tensors`` under the current setting."""
    name = get_backend()
    device = next(t.device for t in tensors if t is not None)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if not triton_usable(device):
        from fieldkern.kernels import AVAILABLE, UNAVAILABLE_REASON

        if not AVAILABLE:
            reason = UNAVAILABLE_REASON
        else:
            reason = (
                f"tensors are on {device}; the Triton kernels need CUDA tensors, or CPU "
                "tensors with TRITON_INTERPRET=1 set before triton is imported"
            )
        raise RuntimeError(
            f"fieldkern backend 'triton' was requested for {op}, but {reason}. "
            "Use fieldkern.set_backend('auto') or 'torch' to run the PyTorch reference."
        )
    return "triton"
