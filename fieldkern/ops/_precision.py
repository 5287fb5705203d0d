"""Arithmetic precision of the Triton kernels: ``"float32"`` (default) or ``"mixed"``.

* ``"float32"``: every ``tl.dot`` runs with ``input_precision="ieee"`` (TF32 off), so the
  kernels match the PyTorch float32 reference to rounding. Measured under the Triton
  interpreter (ResidualMFN 2D hidden 256 / 4 scales and 3D hidden 128 / 3 scales, 512
  points), error relative to the tensor's max: <= 6e-6 on outputs, <= 1.5e-5 on every
  parameter gradient. On GPU, eager ``torch.matmul`` in the multiplicative layer's backward
  follows ``torch.backends.cuda.matmul.allow_tf32`` (off by default).
* ``"mixed"``: matmul operands (``A_i``, ``U_i``, the hidden features and their
  gradients) are rounded to bfloat16, products accumulate in fp32; sine arguments
  ``x W^T + b``, the filters, the elementwise products and all reductions over points stay
  fp32. bf16 has an 8-bit mantissa: on the same two networks, 1-2e-2 on outputs and
  3-4e-2 on gradients (interpreter emulation: operands rounded to bf16, products in fp32;
  to be re-measured on the GPU, see bench/RESULTS.md). Meant for training throughput on
  tensor cores, not for evaluation to float32 accuracy.

The setting is global like the backend: ``fieldkern.ops.set_precision("mixed")``, usable as
a context manager, initial value from the environment variable ``FIELDKERN_PRECISION``.
The PyTorch reference path ignores it (it computes in the tensors' dtype).
"""

from __future__ import annotations

import os

PRECISIONS = ("float32", "mixed")
_ENV_VAR = "FIELDKERN_PRECISION"
_current: str | None = None


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in PRECISIONS:
        raise ValueError(f"{source} must be one of {PRECISIONS}, got {name!r}")
    return name.lower()


def get_precision() -> str:
    """The current kernel precision: "float32" or "mixed"."""
    if _current is not None:
        return _current
    return _check(os.environ.get(_ENV_VAR, "float32"), f"environment variable {_ENV_VAR}")


class set_precision:
    """Select the kernel precision globally, or for a ``with`` block (restored on exit)."""

    def __init__(self, name: str):
        global _current
        new = _check(name, "precision")
        self._previous = _current
        _current = new

    def __enter__(self) -> "set_precision":
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = self._previous

    def __repr__(self) -> str:
        return f"set_precision({get_precision()!r})"
