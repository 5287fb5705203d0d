"""The Triton projector against the reference: values, volume and rotation gradients.

Tolerances (float32 both sides, compared as |a - b| <= ATOL + RTOL * max|b|): the kernel and
``grid_sample`` compute the same trilinear taps in a different order.
"""

import pytest
import torch
from _kernel_helpers import close, needs_interpreter, projection_both_paths, smooth_volume
from hypothesis import given, settings
from hypothesis import strategies as st

import fieldkern
from fieldkern import ops
from fieldkern.cryoem import random_rotations

pytestmark = needs_interpreter

RTOL, ATOL = 2e-5, 1e-5


@pytest.mark.parametrize("D, B", [(6, 1), (10, 3), (12, 5)])
def test_projection_values_and_gradients(D, B):
    """Even D that are not powers of two, B = 1 and B not a multiple of anything."""
    volume = smooth_volume(D)
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(D)).float()
    grad_out = torch.randn(B, D, D, generator=torch.Generator().manual_seed(1))
    (out, gv, gr), (out_ref, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("images", out, out_ref, RTOL, ATOL)
    close("d volume", gv, gv_ref, RTOL, ATOL)
    close("d rotations", gr, gr_ref, 1e-4, 1e-4)


def test_rotation_gradient_matches_finite_differences():
    D = 8
    volume = smooth_volume(D, seed=3).double()
    R = random_rotations(2, generator=torch.Generator().manual_seed(5)).float()
    grad_out = torch.randn(2, D, D, generator=torch.Generator().manual_seed(2)).double()
    r = R.clone().requires_grad_()
    with fieldkern.set_backend("triton"):
        loss = (ops.project_volume(volume.float(), r).double() * grad_out).sum()
    loss.backward()
    eps = 1e-3
    fd = torch.zeros(2, 3, 3, dtype=torch.float64)
    with fieldkern.set_backend("torch"):
        for b in range(2):
            for i in range(3):
                for j in range(3):
                    dR = torch.zeros(2, 3, 3, dtype=torch.float64)
                    dR[b, i, j] = eps
                    lp = (ops.project_volume(volume, R.double() + dR) * grad_out).sum()
                    lm = (ops.project_volume(volume, R.double() - dR) * grad_out).sum()
                    fd[b, i, j] = (lp - lm) / (2 * eps)
    # The trilinear interpolant has kinks at voxel faces that some of the 2 * D^3 samples
    # cross within +-eps: central differences are good to ~1% here, not to rounding.
    close("d rotations vs finite differences", r.grad.double(), fd, rtol=1e-2, atol=1e-3)


def test_bfloat16_volume_storage_accumulates_in_float32():
    D = 8
    volume = smooth_volume(D)
    R = random_rotations(3, generator=torch.Generator().manual_seed(0)).float()
    with fieldkern.set_backend("triton"):
        out = ops.project_volume(volume.bfloat16(), R)
    ref = ops.project_volume(volume.bfloat16().float(), R)  # the same stored values, fp32 path
    assert out.dtype == torch.bfloat16
    close("bf16 storage", out.float(), ref, rtol=1e-2, atol=1e-2)


def test_empty_batch():
    with fieldkern.set_backend("triton"):
        assert ops.project_volume(torch.zeros(4, 4, 4), torch.zeros(0, 3, 3)).shape == (0, 4, 4)


@settings(max_examples=6, deadline=None)
@given(half=st.integers(2, 6), B=st.integers(1, 4), seed=st.integers(0, 100))
def test_projection_hypothesis_shapes(half, B, seed):
    D = 2 * half
    volume = smooth_volume(D, seed)
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(seed)).float()
    with fieldkern.set_backend("triton"):
        out = ops.project_volume(volume, rotations)
    close("images", out, ops.project_volume(volume, rotations), RTOL, ATOL)
