"""Kernel tests: Triton kernels vs the PyTorch reference.

Without CUDA the kernels run on CPU tensors under the Triton interpreter. ``triton.jit``
picks interpreter or compiler when a function is *decorated*: triton's own library
(``tl.cdiv``, ...) when ``triton`` is first imported (``import fieldkern.kernels`` does
that), fieldkern's kernels when ``fieldkern.kernels.<op>`` is (lazily, on the first Triton
call). Setting the variable here, at conftest import, is early enough if nothing collected
before this folder imported triton (``import fieldkern`` does not): a test module elsewhere
must import ``fieldkern.kernels`` inside its tests, not at module level. Otherwise every
interpreted kernel fails with "Cannot call @triton.jit'd outside of the scope of a kernel",
so this conftest stops the run at once and names the cause. With CUDA the variable is left
alone and the CPU cases skip.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:  # a value set by hand is kept
    if "triton" in sys.modules:  # pragma: no cover - guard
        raise pytest.UsageError(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so the "
            "interpreted kernel tests would all fail: a test module collected earlier imports "
            "fieldkern.kernels (or triton) at module level; import it inside the test, or run with "
            "TRITON_INTERPRET=1 set")
    os.environ["TRITON_INTERPRET"] = "1"


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
