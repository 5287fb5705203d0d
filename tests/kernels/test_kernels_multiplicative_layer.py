"""Fused multiplicative layer kernels vs the reference, under the interpreter."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fieldkern
from fieldkern.kernels import _common
from _kernel_helpers import compare_op, needs_interpreter, spy_launches

pytestmark = needs_interpreter


def _args(n, d, h_in, h, gabor, has_c=True, train_w=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(grad)

    z = r(n, h_in)
    a = r(h, h_in, scale=h_in ** -0.5)
    c = r(h, scale=0.1) if has_c else None
    x = (torch.rand(n, d, generator=g) - 0.5).requires_grad_()
    w = r(h, d, scale=20.0, grad=train_w)
    b = r(h, scale=3.0)
    gamma = (torch.rand(h, generator=g) * 5).requires_grad_() if gabor else None
    mu = (torch.rand(h, d, generator=g) - 0.5).requires_grad_() if gabor else None
    return (z, a, c, x, w, b, gamma, mu)


@pytest.mark.parametrize("gabor", [False, True], ids=["fourier", "gabor"])
@pytest.mark.parametrize("d,h_in,h,n,has_c,train_w", [
    (2, 16, 16, 37, True, False), (3, 20, 33, 70, False, True), (2, 64, 40, 45, True, True)])
def test_multiplicative_layer_matches_reference(gabor, d, h_in, h, n, has_c, train_w):
    compare_op(fieldkern.ops.multiplicative_layer, _args(n, d, h_in, h, gabor, has_c, train_w))


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 100), d=st.sampled_from([2, 3]), h_in=st.integers(1, 40),
       h=st.integers(1, 40), gabor=st.booleans(), has_c=st.booleans())
def test_multiplicative_layer_shapes_hypothesis(n, d, h_in, h, gabor, has_c):
    compare_op(fieldkern.ops.multiplicative_layer, _args(n, d, h_in, h, gabor, has_c, seed=n))


def test_multiplicative_layer_float32_on_tf32_tensor_cores(tf32_tensor_cores):
    """float32 tolerances when the kernels' products round their operands to TF32 as a GPU's
    tensor cores do (emulated): the forward's and backward's split products undo it."""
    compare_op(fieldkern.ops.multiplicative_layer, _args(45, 3, 64, 40, True))


@pytest.mark.parametrize("gabor,has_c,train_w", [(False, True, False), (True, False, True), (True, True, True)],
                         ids=["fourier-c", "gabor", "gabor-c"])
def test_multiplicative_layer_in_chunks_below_int32_offsets(monkeypatch, gabor, has_c, train_w):
    """The kernels' int32 offsets into (P, H) and (P, K) buffers wrap past 2^31 elements: the
    launchers walk the points in chunks below the limit, lowered here to 16 rows of the
    widest (K 40), so 77 points take five launches each way; the parameter gradients add up
    over the chunks, dlin is written chunk by chunk for dz and dA."""
    from fieldkern.kernels import multiplicative_layer as M

    n, d, h_in, h = 77, 3, 40, 24
    fwd = spy_launches(monkeypatch, M, "_multiplicative_layer_fwd_kernel")
    bwd = spy_launches(monkeypatch, M, "_multiplicative_layer_bwd_kernel")
    args = _args(n, d, h_in, h, gabor, has_c, train_w)
    compare_op(fieldkern.ops.multiplicative_layer, args)
    assert (len(fwd), len(bwd)) == (1, 1)  # below the limit: one launch, as ever
    monkeypatch.setattr(_common, "MAX_ELEMENTS", 16 * h_in + 1)
    compare_op(fieldkern.ops.multiplicative_layer, args)
    assert (len(fwd), len(bwd)) == (1 + 5, 1 + 5)
