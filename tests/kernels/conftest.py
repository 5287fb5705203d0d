"""Kernel tests: Triton kernels vs the PyTorch reference.

Without CUDA the kernels run on CPU tensors under the Triton interpreter. ``triton.jit``
picks interpreter or compiler when a kernel is *decorated*, i.e. when
``fieldkern.kernels.<op>`` is first imported (lazily, on the first Triton call), so setting
the variable here, at conftest import, is early enough even if fieldkern itself was
imported by another conftest. With CUDA the variable is left alone and the CPU cases skip.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_early = [m for m in ("fieldkern.kernels._common", "fieldkern.kernels.mfn_stack") if m in sys.modules]
if _early and os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover - guard
    import warnings

    warnings.warn(f"{_early} imported before TRITON_INTERPRET=1 was set: CPU kernel tests may fail")


@pytest.fixture(params=["truncate", "nearest"])
def tf32_tensor_cores(request):
    """Interpreted TF32 products round their operands as a GPU's tensor cores do
    (``fieldkern.kernels.testing``), both ways."""
    from fieldkern.kernels.testing import emulate_tf32_tensor_cores

    with emulate_tf32_tensor_cores(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _variants_restored():
    """Every kernel test ends with the variants it started with (the fixed rules), whatever
    it named with ``fieldkern.ops.set_variant``."""
    from fieldkern.ops import _variants

    before = _variants.get_variants()
    yield
    _variants.set_variant(**before)
