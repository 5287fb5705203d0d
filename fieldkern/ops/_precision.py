"""Arithmetic precision of the Triton kernels: ``"float32"`` (default) or ``"mixed"``.

* ``"float32"``: fp32 accuracy. The fused stack's forward computes its products on tensor
  cores as ``tf32x3`` (each operand split into a TF32 head and remainder, three products
  summed in fp32), its backward on the FMA path (``ieee``); no plain TF32 anywhere.
  Measured under the Triton interpreter (ResidualMFN 2D hidden 256 / 4 scales and 3D
  hidden 128 / 3 scales, 512 points), error relative to the tensor's max: <= 6e-6 on
  outputs, <= 1.5e-5 on every parameter gradient; on an H200 the device tests pass at
  rtol 2e-5 on outputs (plain TF32 fails that) and 1e-4 on gradients. On GPU, eager
  ``torch.matmul`` in the multiplicative layer's backward follows
  ``torch.backends.cuda.matmul.allow_tf32`` (off by default).
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

from fieldkern._settings import Setting, SettingSwitch

PRECISIONS = ("float32", "mixed")
_SETTING = Setting("precision", PRECISIONS, "FIELDKERN_PRECISION", "float32")


def get_precision() -> str:
    """The current kernel precision: "float32" or "mixed"."""
    return _SETTING.get()


class set_precision(SettingSwitch):
    """Select the kernel precision globally, or for a ``with`` block (restored on exit)."""

    setting = _SETTING
