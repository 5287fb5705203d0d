"""Benchmark fixtures: device, problem sizes, and how to measure peak memory.

Run with ``pytest bench/ --benchmark-only``. On CUDA the paper-sized problems run; on a
CPU-only machine small versions of the same networks run (eager and ``torch.compile`` of
the reference) and the Triton cases skip: there the kernels only run under the Triton
interpreter, which is a correctness tool, not a performance path.
"""

from __future__ import annotations

import pytest
import torch

from _bench_utils import CUDA, DEVICE


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """The float32 comparisons are against eager fp32 without TF32 (the library default)."""
    if CUDA:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield
