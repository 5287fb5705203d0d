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


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the library versions in the JSON, so ``bench/summarize.py`` can print them
    beside every table (pytest-benchmark records only the interpreter and the host)."""
    machine_info["torch_version"] = torch.__version__
    try:
        import triton
    except ImportError:
        triton = None
    machine_info["triton_version"] = getattr(triton, "__version__", None)
    machine_info["device_name"] = torch.cuda.get_device_name() if CUDA else "cpu"
