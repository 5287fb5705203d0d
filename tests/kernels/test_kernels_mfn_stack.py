"""Fused mfn_stack kernels (forward + backward) vs the reference, under the interpreter."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fieldkern
from fieldkern.kernels._common import _split_tf32, split_tf32
from _kernel_helpers import compare_stack, needs_interpreter, spy_launches, stack_params

pytestmark = needs_interpreter


def _x(n, d, seed=3, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) - 0.5).requires_grad_(grad)


# (d, hidden, n_layers, out, gabor, residual, relu, detach, trainable_w, linear_bias, heads)
CASES = [
    (2, 16, 1, 1, False, True, False, 0, False, True, None),      # single layer
    (2, 20, 3, 3, False, True, True, 0, False, False, None),      # residual MFN + ReLU, no c
    (3, 33, 4, 1, True, True, True, 0, True, False, None),        # 3D Gabor, trainable W
    (2, 64, 5, 2, False, False, False, 3, False, True, None),     # fair BACON, 5 scales
    (3, 20, 3, 2, True, False, True, 1, True, True, None),        # Gabor BACON detach + ReLU
    (2, 16, 4, 1, True, False, False, 0, True, True, [3]),        # plain MFN: one head on top
    (2, 33, 3, 2, False, True, False, 0, False, True, [0, 2]),    # sparse heads, residual
    (3, 200, 2, 1, True, True, True, 0, True, False, None),       # H > 128: scratch + K blocks
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_mfn_stack_matches_reference(case):
    d, hidden, n_layers, out, gabor, residual, relu, detach, train_w, lin_b, heads = case
    p = stack_params(d, hidden, n_layers, out, gabor, heads, lin_b, train_w)
    x = _x(77, d)
    compare_stack(p, x, residual=residual, head_activation="relu" if relu else None,
                  detach_heads_below=detach)


# the layer-by-layer forward (filter kernel, multiplicative-layer kernel, GEMM heads), the
# ``mfn_forward="layered"`` variant and where the fused kernel's int32 offsets would wrap;
# its lin_i / ReLU pre-activations feed the backward
LAYERED = [CASES[i] for i in (0, 1, 2, 4, 6, 7)]


@pytest.mark.parametrize("case", LAYERED, ids=[f"case{CASES.index(c)}" for c in LAYERED])
def test_mfn_stack_layered_forward(case):
    d, hidden, n_layers, out, gabor, residual, relu, detach, train_w, lin_b, heads = case
    p = stack_params(d, hidden, n_layers, out, gabor, heads, lin_b, train_w)
    with fieldkern.ops.set_variant(mfn_forward="layered"):
        compare_stack(p, _x(77, d), residual=residual, head_activation="relu" if relu else None,
                      detach_heads_below=detach)


def test_mfn_stack_layered_forward_in_chunks(monkeypatch):
    """The layered forward's point chunks (32 + 32 + 13), saving for the backward, mixed
    precision (bf16 operands in the layers and the heads) against the fused kernel's."""
    from fieldkern.kernels import mfn_stack as M

    hidden = 24
    monkeypatch.setattr(M, "FWD_WORKSPACE_BYTES", 2 * 4 * hidden * 32)
    p = stack_params(3, hidden, 3, 2, gabor=True, trainable_w=True)
    x = _x(77, 3)
    with fieldkern.ops.set_variant(mfn_forward="layered"):
        compare_stack(p, x, residual=True, head_activation="relu")
    with fieldkern.set_backend("triton"), fieldkern.ops.set_precision("mixed"):
        with fieldkern.ops.set_variant(mfn_forward="layered"):
            layered = fieldkern.ops.mfn_stack(x, **p, residual=True)
        with fieldkern.ops.set_variant(mfn_forward="fused"):
            fused = fieldkern.ops.mfn_stack(x, **p, residual=True)
    for a_, b_ in zip(layered, fused):
        torch.testing.assert_close(a_, b_, rtol=2e-2, atol=2e-2)


def test_mfn_stack_fused_forward_never_past_int32_offsets(monkeypatch):
    """The fused kernel's int32 offsets into lin (L-1, P, H) wrap past 2^31 elements (a 203^3
    grid with gradients for 3D hidden 128, 3 layers: an illegal address on a GPU); there the
    layered forward runs, even with mfn_forward="fused" named. The limit is lowered to this
    problem."""
    from fieldkern.kernels import _common
    from fieldkern.kernels import mfn_stack as M

    hidden, n_layers, n = 24, 3, 77
    monkeypatch.setattr(_common, "MAX_ELEMENTS", (n_layers - 1) * n * hidden)
    launches = spy_launches(monkeypatch, M, "_mfn_stack_fwd_kernel")
    p = stack_params(3, hidden, n_layers, 2, gabor=True, trainable_w=True)
    with fieldkern.ops.set_variant(mfn_forward="fused"):
        compare_stack(p, _x(n, 3), residual=True, head_activation="relu")
        assert launches == []
        with torch.no_grad(), fieldkern.set_backend("triton"):  # nothing saved: lin not addressed
            fieldkern.ops.mfn_stack(_x(n, 3, grad=False), **p, residual=True)
    assert len(launches) == 1


@pytest.mark.parametrize("products", ["cublas", "triton"])
def test_mfn_stack_backward_products(products):
    """Both float32 product paths of the backward: cuBLAS (the rule's), the Triton GEMMs
    (named)."""
    p = stack_params(3, 40, 3, 2, gabor=True, trainable_w=True)
    with fieldkern.ops.set_variant(mfn_backward_products=products):
        compare_stack(p, _x(77, 3), residual=True, head_activation="relu")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_points=st.integers(1, 130),
    d=st.sampled_from([2, 3]),
    hidden=st.sampled_from([16, 17, 24, 40]),
    n_layers=st.integers(1, 5),
    out=st.integers(1, 3),
    gabor=st.booleans(),
    residual=st.booleans(),
    relu=st.booleans(),
    detach=st.integers(0, 5),
)
def test_mfn_stack_shapes_hypothesis(n_points, d, hidden, n_layers, out, gabor, residual, relu, detach):
    p = stack_params(d, hidden, n_layers, out, gabor, trainable_w=True, seed=n_points)
    x = _x(n_points, d, seed=n_points)
    compare_stack(p, x, residual=residual, head_activation="relu" if relu else None,
                  detach_heads_below=min(detach, n_layers))


def test_mfn_stack_leading_dims_and_no_x_grad():
    """Leading dimensions kept; the backward without dx gives every parameter's gradient."""
    p = stack_params(2, 16, 2, 1)
    x = (torch.rand(5, 7, 2) - 0.5)
    with fieldkern.set_backend("triton"):
        out = fieldkern.ops.mfn_stack(x, **p, residual=True)
    assert out[0].shape == (5, 7, 1) and len(out) == 2
    compare_stack(p, x, residual=True)  # values and parameter gradients against the reference


def test_mfn_stack_kernels_reduce_without_atomics():
    """The stack's sums over points are repeatable by construction (each program adds into
    its own row of partials, summed in a fixed order: module docstring), so no kernel the
    stack launches may use an atomic; project_volume's scatter kernels do, so the check sees
    them. Bitwise repeatability itself is a GPU test (test_mfn_stack_backward_deterministic_cuda):
    the interpreter runs programs one after another, so a repeat there cannot differ."""
    import inspect

    from fieldkern.kernels import (
        _common,
        filters,
        mfn_stack,
        multiplicative_layer,
        project_volume,
    )

    for module in (mfn_stack, _common, filters, multiplicative_layer):
        assert "tl.atomic" not in inspect.getsource(module), module.__name__
    assert "tl.atomic" in inspect.getsource(project_volume)


def test_mfn_stack_half_inputs_computed_in_fp32():
    p = stack_params(2, 16, 2, 1, dtype=torch.bfloat16, freq=5.0)
    x = _x(40, 2).to(torch.bfloat16)
    with fieldkern.set_backend("triton"):
        out = fieldkern.ops.mfn_stack(x, **p)
    p32 = {k: [t.float() if t is not None else None for t in v] for k, v in p.items()}
    with fieldkern.set_backend("torch"):
        ref = fieldkern.ops.mfn_stack(x.float(), **p32)
    assert len(out) == len(ref) == 2
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        # Computed in fp32 from the bf16 values, then rounded once to bf16: at most half a
        # bf16 ulp, <= 2^-8 |ref| elementwise (measured: equal to ref.bfloat16(), <= 0.82 of
        # the bound); bf16 products (the "mixed" path) reach ~47x the bound.
        torch.testing.assert_close(a.float(), b, rtol=2.0**-8, atol=1e-5)


@pytest.mark.parametrize("hidden, n_buffers, products", [(24, 3, "cublas"), (136, 4, "triton")],
                         ids=["cublas-path", "split-z"])
def test_mfn_stack_backward_in_chunks(monkeypatch, hidden, n_buffers, products):
    """The backward walks the points in chunks of its work-buffer budget: force 3 chunks
    (32 + 32 + 13 points) and a Gabor ReLU net with every parameter trainable; with the
    float32 Triton GEMMs the ``z`` operand comes split (a fourth buffer)."""
    from fieldkern.kernels import mfn_stack as M

    monkeypatch.setattr(M, "BWD_WORKSPACE_BYTES", n_buffers * 4 * hidden * 32)
    launches = spy_launches(monkeypatch, M, "_mfn_stack_bwd_kernel")
    p = stack_params(3, hidden, 3, 2, gabor=True, trainable_w=True)
    with fieldkern.ops.set_variant(mfn_backward_products=products):
        compare_stack(p, _x(77, 3), residual=True, head_activation="relu")
    assert len(launches) == 3 * 3  # layers x chunks


def test_mfn_stack_saves_for_backward_only_when_needed():
    """Inference keeps nothing for a backward: the op's saved tensors are empty."""
    p = stack_params(2, 16, 3, 1)
    x = _x(50, 2, grad=False)
    args = [torch.stack(p[k]) for k in ("filter_weight", "filter_bias", "linear_weight", "linear_bias",
                                         "head_weight", "head_bias")]
    w, b, a, c, u, d = (t.detach().float() for t in args)
    for save in (False, True):
        out, lin, hpre = torch.ops.fieldkern.mfn_stack(x, w, b, a, c, u, d, None, None, 7, True, True, 0,
                                                       "float32", "auto", "auto", save)
        assert (lin.numel(), hpre.numel()) == ((2 * 50 * 16, 3 * 50 * 1) if save else (0, 0))
    with torch.no_grad(), fieldkern.set_backend("triton"):
        no_grad = fieldkern.ops.mfn_stack(x, **p, residual=True)
    with fieldkern.set_backend("torch"):
        ref = fieldkern.ops.mfn_stack(x, **p, residual=True)
    for a_, b_ in zip(no_grad, ref):
        torch.testing.assert_close(a_, b_.detach(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("mixed", [False, True])
def test_backward_point_products(mixed):
    """The backward's two GEMM kernels (hidden > 128 or mixed) against torch: a sum over
    points split into slabs with a ragged last one, added in place, and rows times a square
    matrix (77 rows: a ragged last row block; the interpreter is slow, and the kernel's row
    blocks are independent)."""
    from fieldkern.kernels import mfn_stack as M

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1100, 200, generator=g), torch.randn(1100, 3, generator=g)
    w = torch.randn(200, 200, generator=g)
    if mixed:
        # bf16 operands (float32 ones rounded in the kernel; the interpreter rounds fp32 ->
        # bf16 differently from torch, so the float32 inputs hold bf16 values here)
        a = a.to(torch.bfloat16)
        b, w = b.to(torch.bfloat16).float(), w.to(torch.bfloat16).float()
    ref_sum, ref_rows = a.float().t() @ b, a[:77].float() @ w
    b_split = (b, None) if mixed else split_tf32(b)
    start = torch.randn(200, 3, generator=g)  # the sum is added in place to what is there
    out = start.clone()
    M._add_points_sum(out, a, *b_split, mixed=mixed, cublas=False)
    torch.testing.assert_close(out, start + ref_sum, rtol=1e-5, atol=1e-4)
    if not mixed:  # and on cuBLAS (float32 only), the same
        out = start.clone()
        M._add_points_sum(out, a, b, None, mixed=False, cublas=True)
        torch.testing.assert_close(out, start + ref_sum, rtol=1e-5, atol=1e-4)
    w_split = (w, None) if mixed else split_tf32(w)
    torch.testing.assert_close(M._rows_matmul(a[:77], *w_split, mixed=mixed, cublas=False), ref_rows,
                               rtol=1e-5, atol=1e-4)


@triton.jit
def _split_kernel(t_ptr, hi_ptr, lo_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    hi, lo = _split_tf32(tl.load(t_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


def test_split_tf32():
    """Host split for the kernels' tf32x3 products: the parts add up exactly, the head has
    TF32's 10 mantissa bits (rounded to nearest), the remainder is at most 2^-11 of t."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    hi, lo = split_tf32(t)
    assert torch.equal(hi + lo, t)
    assert torch.all((hi.view(torch.int32) & 0x1FFF) == 0)
    assert torch.all(lo.abs() <= t.abs() * 2.0 ** -11)
    # round to nearest: no other 10-bit-mantissa value is closer
    ulp = torch.ldexp(torch.ones_like(t), torch.frexp(hi)[1] - 11)
    assert torch.all(lo.abs() <= ulp / 2)
    # the kernels split their first operand in registers the same way
    k_hi, k_lo = torch.empty_like(t), torch.empty_like(t)
    _split_kernel[(1,)](t, k_hi, k_lo, BLOCK=t.numel())
    assert torch.equal(k_hi, hi) and torch.equal(k_lo, lo)


def test_tf32_emulation_bites_and_the_split_undoes_it(tf32_tensor_cores):
    """Under emulated TF32 tensor cores, a product whose second operand is not split loses
    ~1e-4 relative (TF32's 10 bits); with the split (``mm_split``: three TF32 products) the
    error is back at float32's level. Guards the emulation the next test relies on."""
    from fieldkern.kernels import mfn_stack as M

    g = torch.Generator().manual_seed(0)
    # measured: unsplit 1.9e-4, split 2.6e-7 of the scale, both ways (also at 300 rows)
    a, w = torch.randn(64, 200, generator=g), torch.randn(200, 200, generator=g)
    ref = (a.double() @ w.double())
    scale = ref.abs().max().item()
    w_hi, w_lo = split_tf32(w)
    unsplit = (M._rows_matmul(a, w_hi, torch.zeros_like(w_lo), mixed=False, cublas=False).double()
               - ref).abs().max().item()
    split = (M._rows_matmul(a, w_hi, w_lo, mixed=False, cublas=False).double() - ref).abs().max().item()
    assert unsplit > 3e-5 * scale, unsplit / scale
    assert split < 2e-6 * scale, split / scale


# a wide trunk (column and K blocks), Gabor with trainable W and ReLU heads, fair BACON
TF32_CASES = [CASES[i] for i in (2, 3, 7)]


@pytest.mark.parametrize("strategy", ["fused", "layered"])
@pytest.mark.parametrize("case", TF32_CASES, ids=[f"case{CASES.index(c)}" for c in TF32_CASES])
def test_mfn_stack_float32_on_tf32_tensor_cores(case, strategy, tf32_tensor_cores):
    """float32 mode keeps float32 tolerances when every tl.dot rounds its operands to TF32,
    as on a GPU: any product that is not split (or split wrongly) would miss them by ~50x.
    Both forwards, the backward's Triton GEMMs (not cuBLAS) included."""
    d, hidden, n_layers, out, gabor, residual, relu, detach, train_w, lin_b, heads = case
    p = stack_params(d, hidden, n_layers, out, gabor, heads, lin_b, train_w)
    with fieldkern.ops.set_variant(mfn_forward=strategy, mfn_backward_products="triton"):
        compare_stack(p, _x(77, d), residual=residual, head_activation="relu" if relu else None,
                      detach_heads_below=detach)
