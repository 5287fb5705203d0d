"""Testing aids for the kernels under the Triton interpreter (CPU).

The interpreter computes ``tl.dot(..., input_precision="tf32")`` in full float32, while a
GPU's tensor cores read only the top 10 mantissa bits of each float32 operand, so a float32
path that forgot to split a product (``_common.mm_split``) passes every CPU comparison and
then misses float32 tolerances by ~50x on the device. :func:`emulate_tf32_tensor_cores`
makes the interpreter round those operands as the hardware does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

#: How the emulated tensor cores drop the 13 low mantissa bits: ignored (truncation) or
#: rounded to nearest (ties to even); tests run both, as the split must hold for either.
TF32_MODES = ("truncate", "nearest")


def round_to_tf32(data: np.ndarray, mode: str) -> np.ndarray:
    """float32 values with 10 mantissa bits (inf / NaN kept)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    if mode == "nearest":
        finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
        bias = ((bits >> np.uint32(13)) & np.uint32(1)) + np.uint32(0xFFF)
        bits = np.where(finite, bits + bias, bits)
    elif mode != "truncate":
        raise ValueError(f"mode must be one of {TF32_MODES}, got {mode!r}")
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@contextlib.contextmanager
def emulate_tf32_tensor_cores(mode: str = "truncate") -> Iterator[None]:
    """Within the block, interpreted ``tl.dot``s with ``input_precision="tf32"`` on float32
    operands round both operands to TF32 first (``mode``: see :data:`TF32_MODES`). Only
    meaningful under ``TRITON_INTERPRET=1``; other precisions are left alone."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    if mode not in TF32_MODES:
        raise ValueError(f"mode must be one of {TF32_MODES}, got {mode!r}")
    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == b.data.dtype == np.float32:
            a = interpreter.TensorHandle(round_to_tf32(a.data, mode), a.dtype)
            b = interpreter.TensorHandle(round_to_tf32(b.data, mode), b.dtype)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = dot
    try:
        yield
    finally:
        builder.create_dot = create_dot
