"""What runs for a call: the fixed rules, the ``fieldkern.ops.set_variant`` setting, kernels
that fail raising, and float32 torch products held to IEEE float32 whatever torch's TF32
switch says. The forced variants themselves are compared against the reference in
test_kernels_mfn_stack.py and test_kernels_project_volume.py."""

import warnings

import pytest
import torch

import fieldkern
from _kernel_helpers import needs_interpreter, spy_launches, stack_params

AUTO = {"mfn_forward": "auto", "mfn_backward_products": "auto", "volume_gradient": "auto"}


def _x(n, d, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) - 0.5).requires_grad_()


# --- the setting ------------------------------------------------------------------------------


def test_variant_setting():
    ops = fieldkern.ops
    assert ops.get_variants() == AUTO and set(ops.VARIANTS) == set(AUTO)
    with ops.set_variant(mfn_forward="layered", volume_gradient="gather"):
        assert ops.get_variants() == {**AUTO, "mfn_forward": "layered", "volume_gradient": "gather"}
        with ops.set_variant(mfn_forward="fused"):
            assert ops.get_variants()["mfn_forward"] == "fused"
        assert ops.get_variants()["mfn_forward"] == "layered"
    assert ops.get_variants() == AUTO
    ops.set_variant(mfn_backward_products="triton")  # called, not entered: until changed
    try:
        assert ops.get_variants()["mfn_backward_products"] == "triton"
    finally:
        ops.set_variant(mfn_backward_products="auto")
    assert ops.get_variants() == AUTO
    with pytest.raises(KeyError), ops.set_variant(volume_gradient="scatter"):
        raise KeyError  # restored on error too
    assert ops.get_variants() == AUTO


def test_variant_setting_refuses_unknown_names():
    ops = fieldkern.ops
    with pytest.raises(ValueError, match=r"mfn_forward must be one of \('auto', 'fused', 'layered'\), got 'fastest'"):
        ops.set_variant(mfn_forward="fastest")
    with pytest.raises(ValueError, match="unknown variant setting 'mfn_backward'"):
        ops.set_variant(mfn_backward="cublas")
    with pytest.raises(ValueError, match="volume_gradient must be one of"):
        ops.set_variant(mfn_forward="layered", volume_gradient="atomics")
    assert ops.get_variants() == AUTO  # a refused call changes nothing


# --- the rules --------------------------------------------------------------------------------


def test_forward_rule():
    """Fused unless named otherwise; layered wherever the fused kernel's int32 offsets would
    wrap, whatever is named."""
    from fieldkern.kernels import mfn_stack as M

    assert M.choose_forward("auto", fits=True) == "fused"
    assert M.choose_forward("fused", fits=True) == "fused"
    assert M.choose_forward("layered", fits=True) == "layered"
    for requested in ("auto", "fused", "layered"):
        assert M.choose_forward(requested, fits=False) == "layered"
    # 3D hidden 128, 3 layers: lin (2, P, 128) reaches 2^31 elements at P = 2^23 (203^3)
    assert M.fused_fits(2**23 - 1, 3, 3, 128, 1, save=True)
    assert not M.fused_fits(2**23, 3, 3, 128, 1, save=True)
    assert M.fused_fits(2**23, 3, 3, 128, 1, save=False)  # nothing saved: lin not addressed
    with pytest.raises(ValueError, match="mfn_forward must be one of"):
        M.choose_forward("fastest", fits=True)


def test_products_rule():
    """float32: cuBLAS unless the Triton GEMMs are named, at every width; mixed: the Triton
    bf16 GEMMs, and cuBLAS refused."""
    from fieldkern.kernels import mfn_stack as M

    assert M.choose_products("auto", "float32") == "cublas"
    assert M.choose_products("cublas", "float32") == "cublas"
    assert M.choose_products("triton", "float32") == "triton"
    assert M.choose_products("auto", "mixed") == M.choose_products("triton", "mixed") == "triton"
    with pytest.raises(ValueError, match="float32 variant"):
        M.choose_products("cublas", "mixed")
    with pytest.raises(ValueError, match="mfn_backward_products must be one of"):
        M.choose_products("fastest", "float32")


def test_volume_gradient_rule():
    """scatter_tiled, or gather under deterministic algorithms; a named method as named,
    except a scatter under deterministic algorithms, which raises."""
    from fieldkern.kernels import project_volume as PV

    assert PV.choose_volume_gradient("auto", deterministic=False) == "scatter_tiled"
    assert PV.choose_volume_gradient("auto", deterministic=True) == "gather"
    for method in PV.VOLUME_GRADIENT_METHODS:
        assert PV.choose_volume_gradient(method, deterministic=False) == method
    assert PV.choose_volume_gradient("gather", deterministic=True) == "gather"
    for method in ("scatter", "scatter_tiled"):
        with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
            PV.choose_volume_gradient(method, deterministic=True)
    with pytest.raises(ValueError, match="volume_gradient must be one of"):
        PV.choose_volume_gradient("atomics", deterministic=False)


@needs_interpreter
@pytest.mark.parametrize("precision, deterministic", [("float32", False), ("float32", True), ("mixed", False)])
def test_rule_runs_what_it_says(precision, deterministic, monkeypatch):
    """By default the fused forward runs; the backward's products run on cuBLAS in float32
    (no Triton GEMM launched, also at hidden > 128) and as the Triton GEMMs in mixed mode;
    deterministic algorithms change nothing (every variant of the stack is repeatable)."""
    from fieldkern.kernels import mfn_stack as M
    from fieldkern.kernels import multiplicative_layer as ML

    fused = spy_launches(monkeypatch, M, "_mfn_stack_fwd_kernel")
    layer = spy_launches(monkeypatch, ML, "_multiplicative_layer_fwd_kernel")
    rows = spy_launches(monkeypatch, M, "_rows_matmul_kernel")
    sums = spy_launches(monkeypatch, M, "_points_sum_kernel")
    p = stack_params(2, 136, 2, 1, trainable_w=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with fieldkern.set_backend("triton"), fieldkern.ops.set_precision(precision):
            outs = fieldkern.ops.mfn_stack(_x(40, 2), **p, residual=True)
            sum(o.sum() for o in outs).backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert len(fused) == 1 and layer == []
    assert (len(rows) > 0 and len(sums) > 0) == (precision == "mixed")
    assert (rows == [] and sums == []) == (precision == "float32")


@needs_interpreter
def test_refused_variant_raises_at_the_call():
    """cuBLAS products named in mixed precision fail when the op is called, not later in
    its backward."""
    p = stack_params(2, 16, 2, 1)
    with fieldkern.set_backend("triton"), fieldkern.ops.set_precision("mixed"), \
            fieldkern.ops.set_variant(mfn_backward_products="cublas"):
        with pytest.raises(ValueError, match="float32 variant"):
            fieldkern.ops.mfn_stack(_x(20, 2), **p)


@needs_interpreter
def test_a_variant_that_fails_raises(monkeypatch):
    """A kernel that cannot run raises its error: nothing warns and runs another variant."""
    from fieldkern.kernels import mfn_stack as M

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("out of resources")
            return launch

    p = stack_params(2, 16, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(M, "_mfn_stack_fwd_kernel", Broken())
        with fieldkern.set_backend("triton"), pytest.raises(RuntimeError, match="out of resources"):
            fieldkern.ops.mfn_stack(_x(20, 2), **p)
        monkeypatch.setattr(M, "_points_sum_kernel", Broken())
        with fieldkern.set_backend("triton"), fieldkern.ops.set_variant(
                mfn_forward="layered", mfn_backward_products="triton"):
            outs = fieldkern.ops.mfn_stack(_x(20, 2), **p)
            with pytest.raises(RuntimeError, match="out of resources"):
                sum(o.sum() for o in outs).backward()


# --- float32 is float32 -----------------------------------------------------------------------


def _tf32_state():
    matmul = torch.backends.cuda.matmul
    return torch.get_float32_matmul_precision(), getattr(matmul, "fp32_precision", None)


def _restore_tf32_state(state):
    legacy, new_api = state
    torch.set_float32_matmul_precision(legacy)
    if new_api is not None:
        torch.backends.cuda.matmul.fp32_precision = new_api


def test_ieee_float32_restores_the_tf32_switch():
    from fieldkern.kernels._common import ieee_float32

    matmul = torch.backends.cuda.matmul
    state = _tf32_state()
    try:
        for on in (True, False):
            matmul.allow_tf32 = on
            with ieee_float32():
                assert not matmul.allow_tf32
            assert matmul.allow_tf32 == on
        matmul.allow_tf32 = True
        with pytest.raises(KeyError), ieee_float32():
            raise KeyError  # restored on error too
        assert matmul.allow_tf32
        torch.set_float32_matmul_precision("high")  # TF32 by the other legacy switch
        with ieee_float32():
            assert not matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        if state[1] is not None:  # torch >= 2.9: the fp32_precision switch
            _restore_tf32_state(state)
            matmul.fp32_precision = "tf32"
            with ieee_float32():
                assert matmul.fp32_precision == "ieee" and not matmul.allow_tf32
            assert matmul.fp32_precision == "tf32"
    finally:
        _restore_tf32_state(state)
    assert _tf32_state() == state


@needs_interpreter
def test_kernels_hold_float32_torch_products_to_ieee(monkeypatch):
    """With TF32 switched on, every torch product of the launchers (the layered forward's
    heads, the stack backward's cuBLAS products, the multiplicative layer's backward) runs
    with it off; it is on again afterwards."""
    seen = []
    for owner, name in ((torch, "mm"), (torch, "addmm"), (torch.Tensor, "addmm_")):
        def spy(*args, _real=getattr(owner, name), _name=name, **kwargs):
            seen.append((_name, torch.backends.cuda.matmul.allow_tf32))
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    p = stack_params(2, 16, 3, 1, trainable_w=True)
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(30, 12, generator=g).requires_grad_(), torch.randn(16, 12, generator=g).requires_grad_()
    x, w, b = _x(30, 2), torch.randn(16, 2, generator=g), torch.randn(16, generator=g)
    state = _tf32_state()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with fieldkern.set_backend("triton"), fieldkern.ops.set_variant(mfn_forward="layered"):
            outs = fieldkern.ops.mfn_stack(_x(30, 2), **p, residual=True)
            sum(o.sum() for o in outs).backward()
            fieldkern.ops.multiplicative_layer(z, a, None, x, w, b).sum().backward()
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        _restore_tf32_state(state)
    names = [n for n, _ in seen]
    # 3 heads; the backward's dU (3) and dA (2) products added in place, its dz (2); the
    # layer's dz and dA
    assert names.count("addmm") == 3 and names.count("addmm_") == 3 + 2, names
    assert names.count("mm") == 2 + 2, names
    assert not any(on for _, on in seen)
