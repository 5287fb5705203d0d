"""Launches, allocations and host syncs of a training step through the Triton ``mfn_stack``.

A step here is the models' forward and the backward to every trainable parameter
(``torch.autograd.grad`` with given output gradients, so no loss operators are counted),
counted by :func:`fieldkern.kernels.testing.count_launches` with the Triton launches no-op'd
(the counts do not depend on what the kernels compute). On a GPU every counted ATen operator
is one kernel launch; allocations go through the caching allocator and launch nothing.

The numbers this file states, for the benchmark's 3D ResidualMFN (3 scales, one output,
no linear biases; any hidden width, any number of points below the backward's 256 MiB
workspace chunk):

* float32, default variants: 4 Triton launches (the fused forward, one backward kernel per
  layer) and 29 ATen launches: 6 parameter stacks, 6 for the tf32x3 weight splits of the
  fused forward, 4 zero fills, 3 for the residual head gradients, 5 ``addmm_`` (dU, dA) and
  2 ``mm`` (dz) on cuBLAS, 3 reductions (dd, dW, db);
* mixed precision: 11 Triton launches (the backward's products as Triton bf16 GEMMs: one
  per product), 26 ATen launches (no weight splits; each Triton product's slab sum and
  in-place add: 10).

None of them reads a value back to the host, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from _kernel_helpers import needs_interpreter

import fieldkern
from fieldkern import BACON, MFN, ResidualMFN

pytestmark = needs_interpreter

MODELS = {
    "residual_3d": lambda: ResidualMFN(3, 32, 1, n_scales=3, resolution=32),
    "residual_2d_relu": lambda: ResidualMFN(2, 24, 3, n_scales=4, resolution=64, head_activation="relu"),
    "bacon_2d": lambda: BACON(2, 24, 3, n_scales=4, resolution=64),
    "mfn_fourier": lambda: MFN(2, 24, 3, n_layers=4),
    "mfn_gabor": lambda: MFN(3, 24, 2, n_layers=3, filter="gabor"),
}


def _count_step(model, P, precision="float32", products="auto"):
    from fieldkern.kernels.testing import count_launches, triton_launches

    torch.manual_seed(1)
    d = model.filters[0].weight.shape[1]
    x = torch.rand(P, d) * 2 - 1
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with fieldkern.set_backend("triton"), fieldkern.ops.set_precision(precision), \
                fieldkern.ops.set_variant(mfn_backward_products=products):
            outs = model(x)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            return torch.autograd.grad(outs, params, grads(outs))

    grads_held = {}

    def grads(outs):
        if not grads_held:  # made once, outside the counted step
            grads_held["g"] = [torch.ones_like(o) for o in outs]
        return grads_held["g"]

    with triton_launches(noop=True):
        step()  # first call: anything cached per process is built outside the count
    with count_launches(noop=True) as count:
        step()
    return count


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("precision", ["float32", "mixed"])
def test_step_launches_do_not_depend_on_the_number_of_points(name, precision):
    """1000 and 3000 points (different bit lengths, several tiles): the same launches, the
    same allocations, no host sync; float32 runs one forward launch and one backward
    kernel per layer."""
    model = MODELS[name]()
    small, large = _count_step(model, 1000, precision), _count_step(model, 3000, precision)
    assert small.triton == large.triton
    assert small.torch == large.torch
    assert small.allocations == large.allocations
    assert small.syncs == [] and large.syncs == []
    n_layers = len(model.filters)
    kinds = {"_mfn_stack_fwd_kernel": 1, "_mfn_stack_bwd_kernel": n_layers}
    assert {k: small.triton.count(k) for k in kinds} == kinds
    if precision == "float32":
        assert len(small.triton) == 1 + n_layers


@pytest.mark.parametrize("precision, products, triton, aten", [
    ("float32", "auto", 4, 29),
    ("float32", "triton", 11, 38),
    ("mixed", "auto", 11, 26),
])
def test_benchmark_network_launch_counts(precision, products, triton, aten):
    """The numbers the module docstring states, for the benchmark's 3D ResidualMFN."""
    count = _count_step(MODELS["residual_3d"](), 2000, precision, products)
    assert len(count.triton) == triton, count.triton
    assert sum(count.torch.values()) == aten, dict(count.torch)
    assert count.syncs == []


def test_the_counter_sees_syncs_launches_and_custom_ops():
    """The counter can fail: a host read, a launch and the inside of a custom op are seen."""
    from fieldkern.kernels.testing import count_launches

    x = torch.rand(64, 2)
    w, b = torch.randn(8, 2), torch.randn(8)
    with count_launches() as count, fieldkern.set_backend("triton"):
        y = fieldkern.ops.fourier_filter(x, w, b)
        assert bool(y.abs().sum() >= 0)
    assert len(count.triton) == 1, count.triton
    assert count.syncs == ["_local_scalar_dense"]
    assert count.torch["sum"] == 1 and count.torch["abs"] == 1
    assert count.allocations >= 1  # the op's output, allocated inside the custom op


def test_the_counter_sees_reads_no_dispatch_mode_sees(monkeypatch):
    """``tolist``/``numpy`` (which bypass the dispatcher) and an ``.item()`` inside a
    fieldkern custom op's body are host syncs too."""
    from fieldkern.kernels import filters
    from fieldkern.kernels.testing import count_launches

    x = torch.rand(16, 2)
    w, b = torch.randn(8, 2), torch.randn(8)
    with count_launches() as count:
        x.sum().tolist()
        x.numpy()
    assert count.syncs == ["tolist", "numpy"]
    forward = filters.filter_forward
    monkeypatch.setattr(filters, "filter_forward", lambda x, w, b, *a: forward(x, w, b, *a) + 0 * b.max().item())
    with count_launches() as count, fieldkern.set_backend("triton"):
        fieldkern.ops.fourier_filter(x, w, b)
    assert count.syncs == ["item"], count.syncs
