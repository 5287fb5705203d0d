"""The host's share of a training step through the Triton ``mfn_stack``.

``triton_noop`` times the float32 or mixed step (forward of the 3D ResidualMFN, hidden 128,
3 scales, and ``torch.autograd.grad`` to every trainable parameter) with every Triton launch
no-op'd (:func:`fieldkern.kernels.testing.triton_launches`): what is left is the Python side
of the op and its ATen launches, i.e. the host time a step costs before any kernel runs.
``eager`` and ``compile`` time the whole reference step on the same inputs in the same run,
for scale. ``extra_info`` holds the step's launch counts (Triton, ATen) and host syncs.

Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (the no-op'd Triton path needs no
GPU); there the ATen launches compute on the CPU, so ``triton_noop`` is an upper bound of
the host cost at the small CPU size (16^3 points). Not a speed claim for the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

import fieldkern
from _bench_utils import CUDA, DEVICE, sync

SHAPE = (64, 64, 64) if CUDA else (16, 16, 16)


def _step(model, x, params, grads, backend, precision):
    def step():
        with fieldkern.set_backend(backend), fieldkern.ops.set_precision(precision):
            outs = model(x)
            result = torch.autograd.grad(outs, params, grads)
        sync()
        return result
    return step


@pytest.mark.parametrize("impl, precision", [("triton_noop", "float32"), ("triton_noop", "mixed"),
                                             ("eager", "float32"), ("compile", "float32")])
def test_bench_host_cost(benchmark, impl, precision):
    if impl == "triton_noop" and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the no-op'd Triton step needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)")
    from fieldkern.kernels.testing import count_launches, triton_launches

    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(3, 128, 1, n_scales=3, resolution=max(SHAPE)).to(DEVICE)
    x = fieldkern.grid_coordinates(SHAPE, device=DEVICE).reshape(-1, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.ones(x.shape[0], 1, device=DEVICE) for _ in range(3)]
    runner = torch.compile(model) if impl == "compile" else model
    backend = "triton" if impl == "triton_noop" else "torch"
    step = _step(runner, x, params, grads, backend, precision)
    if impl == "triton_noop":
        with triton_launches(noop=True):
            step()  # what is cached per process (the op's registration, ...) stays out of the count
        with count_launches(noop=True) as count:
            step()
        benchmark.extra_info.update(triton_launches=len(count.triton), aten_launches=sum(count.torch.values()),
                                    host_syncs=len(count.syncs))
        with triton_launches(noop=True):
            benchmark.pedantic(step, rounds=20, iterations=5, warmup_rounds=2)
    else:
        step()
        benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(points=x.shape[0], device=str(DEVICE))
