"""Shared pieces of the benchmarks (a plain module: bench/conftest.py and the benchmark
files import it, so nothing depends on which ``conftest`` module pytest registered first)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")

# (name, in_features, hidden, n_scales, grid shapes on CUDA, grid shapes on CPU)
PROBLEMS = [
    ("2d_h256_s4", 2, 256, 4, [(256, 256), (512, 512), (1024, 1024)], [(32, 32)]),
    ("3d_h128_s3", 3, 128, 3, [(64, 64, 64), (128, 128, 128)], [(12, 12, 12)]),
]


def problem_params():
    out = []
    for name, d, h, s, cuda_shapes, cpu_shapes in PROBLEMS:
        for shape in cuda_shapes if CUDA else cpu_shapes:
            label = f"{name}-{'x'.join(map(str, shape))}"
            out.append(pytest.param((d, h, s, shape), id=label))
    return out


def sync():
    if CUDA:
        torch.cuda.synchronize()


def peak_memory_bytes(fn):
    """Peak extra CUDA memory of one ``fn()`` call (None on CPU: torch's CPU allocator is
    not visible to tracemalloc, so no honest figure is available there)."""
    if not CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base
