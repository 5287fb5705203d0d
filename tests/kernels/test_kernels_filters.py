"""Fused Fourier / Gabor filter kernels vs the reference, under the interpreter."""

import contextlib
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import fieldkern
from fieldkern.kernels import _common
from fieldkern.kernels._common import _reduce, point_chunks
from _kernel_helpers import compare_op, needs_interpreter, spy_launches

pytestmark = needs_interpreter


def _args(n, d, h, gabor, train_w=True, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(*lead, n, d, generator=g) - 0.5).requires_grad_()
    w = (torch.randn(h, d, generator=g) * 30).requires_grad_(train_w)
    b = (torch.randn(h, generator=g) * 3).requires_grad_()
    if not gabor:
        return (x, w, b)
    gamma = (torch.rand(h, generator=g) * 5).requires_grad_()
    mu = (torch.rand(h, d, generator=g) - 0.5).requires_grad_()
    return (x, w, b, gamma, mu)


@pytest.mark.parametrize("gabor", [False, True], ids=["fourier", "gabor"])
@pytest.mark.parametrize("d,h,n,train_w", [(2, 16, 37, True), (3, 33, 100, False), (2, 64, 65, True)])
def test_filter_matches_reference(gabor, d, h, n, train_w):
    fn = fieldkern.ops.gabor_filter if gabor else fieldkern.ops.fourier_filter
    compare_op(fn, _args(n, d, h, gabor, train_w))


def test_filter_leading_dims():
    compare_op(fieldkern.ops.gabor_filter, _args(9, 3, 20, True, lead=(4,)))


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 120), d=st.sampled_from([1, 2, 3]), h=st.integers(1, 40), gabor=st.booleans())
def test_filter_shapes_hypothesis(n, d, h, gabor):
    fn = fieldkern.ops.gabor_filter if gabor else fieldkern.ops.fourier_filter
    compare_op(fn, _args(n, d, h, gabor, seed=n))


def test_filter_modules_match():
    for module in (fieldkern.FourierFilter(2, 24, trainable_frequencies=True), fieldkern.GaborFilter(3, 17)):
        x = torch.rand(50, module.in_features) - 0.5
        compare_op(module, (x.requires_grad_(),))


@pytest.mark.parametrize("gabor", [False, True], ids=["fourier", "gabor"])
def test_filter_in_chunks_below_int32_offsets(monkeypatch, gabor):
    """The kernels' int32 offsets into (P, H) buffers wrap past 2^31 elements (2^24 points at
    H 128): the launchers walk the points in chunks below the limit, lowered here to 16
    rows of H, so 77 points take five launches each way; the parameter gradients add up
    over the chunks."""
    from fieldkern.kernels import filters as F

    n, d, h = 77, 3, 24
    fwd = spy_launches(monkeypatch, F, "_filter_fwd_kernel")
    bwd = spy_launches(monkeypatch, F, "_filter_bwd_kernel")
    fn = fieldkern.ops.gabor_filter if gabor else fieldkern.ops.fourier_filter
    compare_op(fn, _args(n, d, h, gabor))
    assert (len(fwd), len(bwd)) == (1, 1)  # below the limit: one launch, as ever
    monkeypatch.setattr(_common, "MAX_ELEMENTS", 16 * h + 1)
    compare_op(fn, _args(n, d, h, gabor))
    assert (len(fwd), len(bwd)) == (1 + 5, 1 + 5)


def test_point_chunks():
    """At the real limit: one chunk up to 2^31 - 1 elements, then chunks of whole 16-row
    groups (aligned starts); nothing for no points."""
    assert point_chunks(0, 128) == []
    assert point_chunks((1 << 24) - 1, 128, 3) == [(0, (1 << 24) - 1)]
    assert point_chunks(1 << 24, 128, 3) == [(0, (1 << 24) - 16), ((1 << 24) - 16, 1 << 24)]
    assert point_chunks(5 << 30, 1) == [(0, (1 << 31) - 16), ((1 << 31) - 16, (2 << 31) - 32),
                                        ((2 << 31) - 32, 5 << 30)]


def test_launchers_run_on_their_inputs_gpu(monkeypatch):
    """Triton launches on the current CUDA device: every public launcher first makes its
    first tensor argument's GPU current (tensors on cuda:1 while cuda:0 is current would
    otherwise be read by kernels on the other GPU). CPU tensors change nothing."""
    from fieldkern.kernels import _common, filters, mfn_stack, multiplicative_layer, project_volume

    entered = []

    class Device:  # stands in for torch.cuda.device, which needs CUDA
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    with _common.device_guard(torch.device("cpu")), _common.device_guard(None):
        pass
    assert entered == [torch.device("cuda", 1)]

    seen = []
    wrapped = _common.on_input_device(lambda *args, **kw: seen.append((args, kw)) or "done")
    assert wrapped(3, torch.zeros(2), k=1) == "done" and len(seen) == 1
    assert entered == [torch.device("cuda", 1)]  # a CPU tensor: no device switch
    launchers = [filters.filter_forward, filters.filter_backward_launch,
                 multiplicative_layer.multiplicative_layer_forward,
                 multiplicative_layer.multiplicative_layer_backward, mfn_stack.mfn_stack_forward,
                 mfn_stack.mfn_stack_backward, project_volume.project_volume_forward,
                 project_volume.project_volume_backward]
    # each is on_input_device's wrapper (not merely some functools.wraps decorator) ...
    wrapper_code = _common.on_input_device(lambda: None).__code__
    assert all(f.__code__ is wrapper_code for f in launchers)
    # ... which enters device_guard with its first tensor's device
    guarded = []
    monkeypatch.setattr(_common, "device_guard", lambda device: guarded.append(device) or contextlib.nullcontext())
    t = torch.zeros(2)
    assert wrapped(3, t, torch.ones(1, device="meta")) == "done"
    assert guarded == [t.device]


@triton.jit
def _reduce_kernel(s_ptr, r_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(r_ptr + offs, _reduce(tl.load(s_ptr + offs)))


@pytest.mark.parametrize("top, bound", [(1e4, 3e-7), (1e5, 2e-6), (4e5, 6e-6)])
def test_sine_argument_reduction(top, bound):
    """The GPU's sines take ``sin.approx`` of ``_reduce(s)`` (the interpreter takes an exact
    sine of the same reduced argument, so the comparisons see the reduction but not its
    bound): sin and cos of the reduced argument against float64 sin(s), cos(s). Filter arguments stay below ~1e4 rad in
    practice (|W| <= pi N, |x| <= 1/2); 4e5 is where k * 2pi's head stops being exact.
    Without FMA contraction, as the interpreter computes it; a GPU's fma only helps."""
    s = (torch.rand(1 << 14, generator=torch.Generator().manual_seed(0)) * 2 - 1) * top
    r = torch.empty_like(s)
    _reduce_kernel[(s.numel() // 1024,)](s, r, BLOCK=1024)
    assert r.abs().max() < 3.2  # sin.approx's accuracy is stated on [-pi, pi]
    for f in (torch.sin, torch.cos):
        assert (f(r.double()) - f(s.double())).abs().max() < bound
