"""Arithmetic precision of the Triton kernels: ``"float32"`` (default) or ``"mixed"``.

* ``"float32"``: fp32 accuracy, no plain TF32 anywhere. Products in Triton kernels run on
  tensor cores as ``tf32x3`` (each operand split into a TF32 head and remainder, three
  products summed in fp32): both stack forwards, the multiplicative-layer kernel, the
  stack backward's Triton GEMMs; the stack backward's per-layer kernel computes its one
  small product (the head term) on the FMA path (``ieee``). Products through torch (cuBLAS
  on a GPU: the stack backward's default products, the layered forward's heads, the
  multiplicative layer's backward) run in IEEE float32 whatever torch's TF32 switch says
  (``fieldkern.kernels._common.ieee_float32``). Measured under the Triton interpreter
  (ResidualMFN 2D hidden 256 / 4 scales and 3D hidden 128 / 3 scales, 512 points), error
  relative to the tensor's max: <= 6e-6 on outputs, <= 1.5e-5 on every parameter
  gradient; on an H100 (``bench/accuracy.py``, bench/RESULTS.md) 1.9e-6 to 4.9e-6 on
  outputs and 4.6e-6 to 1.3e-5 on gradients, both forwards.
* ``"mixed"``: matmul operands (``A_i``, ``U_i``, the hidden features and their
  gradients) are rounded to bfloat16, products accumulate in fp32; sine arguments
  ``x W^T + b``, the filters, the elementwise products and all reductions over points stay
  fp32. bf16 has an 8-bit mantissa: on the same two networks, 1.9e-3 to 5.3e-3 on outputs
  and 1.2e-2 to 4.6e-2 on gradients on an H100 (both forwards; measured before the layered
  forward's heads took bf16 operands as the fused kernel's do). Meant for
  training throughput on tensor cores, not for evaluation to float32 accuracy.

The setting is global like the backend: ``fieldkern.ops.set_precision("mixed")``, usable as
a context manager, initial value from the environment variable ``FIELDKERN_PRECISION``.
It is read when an op is called and applies to that call's backward too. The PyTorch
reference path ignores it (it computes in the tensors' dtype, under torch's own switches).
"""

from __future__ import annotations

from fieldkern._settings import Setting, SettingSwitch

PRECISIONS = ("float32", "mixed")
_SETTING = Setting("precision", PRECISIONS, "FIELDKERN_PRECISION", "float32")


def get_precision() -> str:
    """The current kernel precision: "float32" or "mixed"."""
    return _SETTING.get()


class set_precision(SettingSwitch):
    """Select the kernel precision globally, or for a ``with`` block (restored on exit)."""

    setting = _SETTING
