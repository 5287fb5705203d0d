"""Backend switch: which implementation of each op runs.

``"torch"`` is the plain-PyTorch reference path (any device). ``"triton"`` is the fused
Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). ``"auto"``
(the default) takes Triton for CUDA tensors when it is usable and the reference otherwise,
so callers never branch on hardware; an op may keep measured-slower calls on the reference
(``fieldkern.ops.mfn_stack.AUTO_REFERENCE_POINTS``).

The initial setting comes from the environment variable ``FIELDKERN_BACKEND``.
"""

from __future__ import annotations

import os

from fieldkern._settings import Setting, SettingSwitch

BACKENDS = ("auto", "torch", "triton")

_SETTING = Setting("backend", BACKENDS, "FIELDKERN_BACKEND", "auto")


def get_backend() -> str:
    """The current backend name: "auto", "torch" or "triton"."""
    return _SETTING.get()


class set_backend(SettingSwitch):
    """Select the backend globally, or for a ``with`` block.

    ``fieldkern.set_backend("torch")`` switches until changed again;
    ``with fieldkern.set_backend("torch"): ...`` switches and restores the previous
    setting when the block exits (also on error).
    """

    setting = _SETTING


def triton_usable(device) -> bool:
    """Whether the Triton path can run on tensors of ``device``."""
    from fieldkern.kernels import AVAILABLE

    if not AVAILABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_usable(device, op: str | None = None) -> None:
    """RuntimeError, saying why, when the current backend cannot run on ``device`` (only
    ``"triton"`` can fail: where Triton cannot run). Command lines call it before any work."""
    import torch

    device = torch.device(device)
    if get_backend() != "triton" or triton_usable(device):
        return
    from fieldkern.kernels import AVAILABLE, UNAVAILABLE_REASON

    if not AVAILABLE:
        reason = UNAVAILABLE_REASON
    else:
        reason = (
            f"tensors are on {device}; the Triton kernels need CUDA tensors, or CPU "
            "tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    what = f"for {op}" if op else f"(FIELDKERN_BACKEND or set_backend) on {device}"
    raise RuntimeError(
        f"fieldkern backend 'triton' was requested {what}, but {reason}. "
        "Use fieldkern.set_backend('auto') or 'torch' (FIELDKERN_BACKEND=auto) to run the PyTorch reference."
    )


def resolve(op: str, *tensors) -> str:
    """Pick "torch" or "triton" for ``op`` on ``tensors`` under the current setting."""
    name = get_backend()
    device = next(t.device for t in tensors if t is not None)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    check_usable(device, op)
    return "triton"
