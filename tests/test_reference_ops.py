"""The PyTorch reference path of every op: gradients by gradcheck (float64), shapes by
hypothesis, and argument checks. The Triton kernels are tested against this path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldkern import ops


def rand(*shape, scale=1.0):
    return (scale * (torch.rand(*shape, dtype=torch.float64) - 0.5)).requires_grad_()


def filter_params(h, d, gabor):
    p = {"weight": rand(h, d, scale=20.0), "bias": rand(h, scale=6.0)}
    if gabor:
        p["gamma"] = (torch.rand(h, dtype=torch.float64) * 4 + 0.5).requires_grad_()
        p["mu"] = rand(h, d)
    return p


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("gabor", [False, True])
def test_filter_gradients(d, gabor):
    x = rand(6, d)
    p = filter_params(5, d, gabor)
    if gabor:
        fn = lambda x, w, b, g, m: ops.gabor_filter(x, w, b, g, m)  # noqa: E731
        args = (x, p["weight"], p["bias"], p["gamma"], p["mu"])
    else:
        fn = ops.fourier_filter
        args = (x, p["weight"], p["bias"])
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("gabor", [False, True])
@pytest.mark.parametrize("linear_bias", [False, True])
def test_multiplicative_layer_gradients(gabor, linear_bias):
    d, h = 3, 4
    x, z = rand(5, d), rand(5, 6)
    A, c = rand(h, 6), rand(h) if linear_bias else None
    p = filter_params(h, d, gabor)
    args = (z, A, c, x, p["weight"], p["bias"], p.get("gamma"), p.get("mu"))
    assert torch.autograd.gradcheck(ops.multiplicative_layer, args)


def stack_args(n_layers, d, h, o, gabor, heads="all"):
    filt = [filter_params(h, d, gabor) for _ in range(n_layers)]
    head_at = range(n_layers) if heads == "all" else [n_layers - 1]
    return dict(
        filter_weight=[f["weight"] for f in filt],
        filter_bias=[f["bias"] for f in filt],
        linear_weight=[rand(h, h) for _ in range(n_layers - 1)],
        linear_bias=[rand(h) for _ in range(n_layers - 1)],
        head_weight=[rand(o, h) if i in head_at else None for i in range(n_layers)],
        head_bias=[rand(o) if i in head_at else None for i in range(n_layers)],
        gabor_gamma=[f["gamma"] for f in filt] if gabor else None,
        gabor_mu=[f["mu"] for f in filt] if gabor else None,
    )


def flat_tensors(kwargs):
    out = []
    for v in kwargs.values():
        if isinstance(v, list):
            out += [t for t in v if t is not None]
    return out


@pytest.mark.parametrize("gabor", [False, True])
@pytest.mark.parametrize("residual, relu", [(True, False), (True, True), (False, False)])
def test_mfn_stack_gradients(gabor, residual, relu):
    x = rand(5, 2)
    kwargs = stack_args(3, 2, 3, 2, gabor)
    tensors = [x, *flat_tensors(kwargs)]

    def fn(*_):
        ys = ops.mfn_stack(x, **kwargs, residual=residual, head_activation="relu" if relu else None)
        return tuple(ys)

    assert torch.autograd.gradcheck(fn, tensors)


def test_detached_heads_do_not_reach_the_trunk():
    x = rand(7, 2)
    kwargs = stack_args(3, 2, 4, 1, gabor=False)
    ys = ops.mfn_stack(x, **kwargs, residual=False, detach_heads_below=2)
    grads = torch.autograd.grad(ys[0].sum() + ys[1].sum(), [x, kwargs["head_weight"][0]],
                                allow_unused=True)
    assert grads[0] is None  # nothing flows from heads 0 and 1 into the trunk or x
    assert grads[1] is not None and grads[1].abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(
    n_layers=st.integers(1, 5),
    d=st.integers(1, 3),
    h=st.integers(1, 9),
    o=st.integers(1, 3),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    gabor=st.booleans(),
    residual=st.booleans(),
    heads=st.sampled_from(["all", "last"]),
)
def test_mfn_stack_matches_layer_by_layer_composition(n_layers, d, h, o, lead, gabor, residual, heads):
    torch.manual_seed(n_layers * 100 + d * 10 + h)
    x = rand(*lead, d)
    kwargs = stack_args(n_layers, d, h, o, gabor, heads)
    ys = ops.mfn_stack(x, **kwargs, residual=residual)
    expect, total = [], 0
    g = (lambda i: {"gamma": kwargs["gabor_gamma"][i], "mu": kwargs["gabor_mu"][i]}) if gabor else (lambda i: {})
    z = (ops.gabor_filter if gabor else ops.fourier_filter)(
        x, kwargs["filter_weight"][0], kwargs["filter_bias"][0], **g(0))
    for i in range(n_layers):
        if i:
            z = ops.multiplicative_layer(z, kwargs["linear_weight"][i - 1], kwargs["linear_bias"][i - 1], x,
                                         kwargs["filter_weight"][i], kwargs["filter_bias"][i], **g(i))
        if kwargs["head_weight"][i] is None:
            continue
        y = z @ kwargs["head_weight"][i].T + kwargs["head_bias"][i]
        total = total + y
        expect.append(total if residual else y)
    assert len(ys) == len(expect)
    for a, b in zip(ys, expect):
        assert a.shape == (*lead, o)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_argument_checks_name_the_argument():
    x = torch.rand(4, 2)
    w, b = torch.rand(3, 2), torch.rand(3)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.fourier_filter(x, w, torch.rand(4))
    with pytest.raises(ValueError, match="x must have shape"):
        ops.fourier_filter(torch.rand(4, 3), w, b)
    with pytest.raises(ValueError, match="gamma and mu"):
        ops.multiplicative_layer(torch.rand(4, 3), torch.rand(3, 3), None, x, w, b, gamma=torch.rand(3))
    with pytest.raises(ValueError, match="same leading shape"):
        ops.multiplicative_layer(torch.rand(5, 3), torch.rand(3, 3), None, x, w, b)
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        ops.multiplicative_layer(torch.rand(4, 5), torch.rand(3, 3), None, x, w, b)
    with pytest.raises(TypeError, match="x must have the parameters' dtype torch.float32, got torch.float64"):
        ops.fourier_filter(x.double(), w, b)
    with pytest.raises(TypeError, match="bias must have the parameters' dtype"):
        ops.fourier_filter(x, w, b.double())
    with pytest.raises(TypeError, match="z must have the parameters' dtype"):
        ops.multiplicative_layer(torch.rand(4, 3, dtype=torch.float64), torch.rand(3, 3), None, x, w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(hidden, in_features\)"):
        ops.fourier_filter(x, torch.rand(3), b)
    kwargs = stack_args(2, 2, 3, 1, gabor=False)
    with pytest.raises(TypeError, match=r"x must have the parameters' dtype torch.float64, got torch.float32"):
        ops.mfn_stack(torch.rand(4, 2), **kwargs)
    with pytest.raises(ValueError, match="head_activation"):
        ops.mfn_stack(torch.rand(4, 2, dtype=torch.float64), **kwargs, head_activation="gelu")
    kwargs["linear_weight"] = []
    with pytest.raises(ValueError, match="linear_weight must hold 1"):
        ops.mfn_stack(torch.rand(4, 2, dtype=torch.float64), **kwargs)
