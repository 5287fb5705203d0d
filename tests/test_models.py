"""Model structure, initialisation statistics and argument checks."""

import math
import warnings

import numpy as np
import pytest
import torch

from fieldkern import BACON, MFN, FourierFilter, GaborFilter, ResidualMFN, grid_coordinates
from fieldkern import ops
from fieldkern.nn.init import neighbour_directions


def test_outputs_are_a_list_per_scale_coarsest_first():
    model = ResidualMFN(2, 16, 3, 4, 32)
    x = torch.rand(5, 7, 2) - 0.5
    ys = model(x)
    assert isinstance(ys, list) and len(ys) == 4
    assert all(y.shape == (5, 7, 3) for y in ys)
    assert MFN(3, 16, 2)(torch.rand(4, 3)).shape == (4, 2)


def _trunk_by_layer_ops(model, x):
    """The trunk z_0..z_{L-1} composed from the single-layer ops."""
    f0 = model.filters[0].filter_tensors()
    z = ops.fourier_filter(x, f0["weight"], f0["bias"]) if f0["gamma"] is None else \
        ops.gabor_filter(x, **f0)
    zs = [z]
    for lin, f in zip(model.linears, model.filters[1:]):
        z = ops.multiplicative_layer(z, lin.weight, lin.bias, x, **f.filter_tensors())
        zs.append(z)
    return zs


@pytest.mark.parametrize("filter", ["fourier", "gabor"])
@pytest.mark.parametrize("head_activation", [None, "relu"])
@pytest.mark.parametrize("init", ["residual", "bacon"])
def test_residual_outputs_differ_by_the_head_outputs(filter, head_activation, init):
    model = ResidualMFN(3, 12, 2, 3, 16, init=init, filter=filter, head_activation=head_activation).double()
    x = torch.rand(50, 3, dtype=torch.float64) - 0.5
    ys = model(x)
    zs = _trunk_by_layer_ops(model, x)
    previous = torch.zeros_like(ys[0])
    for k, (y, z, head) in enumerate(zip(ys, zs, model.heads)):
        head_out = head(z)
        if head_activation == "relu":
            head_out = torch.relu(head_out)
        torch.testing.assert_close(y - previous, head_out, rtol=1e-10, atol=1e-10)
        previous = y


def test_bacon_outputs_are_the_heads_alone():
    model = BACON(2, 12, 1, 3, 16).double()
    x = torch.rand(40, 2, dtype=torch.float64) - 0.5
    for y, z, head in zip(model(x), _trunk_by_layer_ops(model, x), model.heads):
        torch.testing.assert_close(y, head(z), rtol=1e-12, atol=1e-12)


def test_bacon_outputs_are_periodic_on_the_unit_cell():
    model = BACON(2, 16, 1, 3, 32).double()
    x = torch.rand(30, 2, dtype=torch.float64) - 0.5
    shift = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for a, b in zip(model(x), model(x + shift)):
        # float32 frequencies carry 2 pi k to ~1e-7 relative: periodic to ~1e-5.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    residual = ResidualMFN(2, 16, 1, 3, 32).double()  # not quantised: not periodic
    assert (residual(x)[-1] - residual(x + shift)[-1]).abs().max() > 0.1


def test_new_init_statistics():
    lam1, lam2, hidden, n = 0.3, 2.0, 256, 4
    model = ResidualMFN(2, hidden, 3, n, 64)
    bands = model.band_limits
    w0 = model.filters[0].weight
    assert w0.abs().max() <= bands[0] and w0.abs().max() > 0.95 * bands[0]
    dirs = neighbour_directions(2)
    for i in range(1, n):
        w = model.filters[i].weight / bands[i - 1]  # (hidden, 2)
        # Each row is lambda2 * r plus a U(-lambda1, lambda1) jitter for some direction r.
        dist = (w.unsqueeze(1) - lam2 * dirs).abs().amax(-1)  # (hidden, n_dirs)
        best, which = dist.min(1)
        assert torch.all(best <= lam1 + 1e-6)
        assert set(which.tolist()) == set(range(len(dirs)))  # every direction is drawn
    for f in model.filters:
        assert f.bias.min() >= -math.pi and f.bias.max() <= math.pi
        assert f.bias.min() < -2.5 and f.bias.max() > 2.5
    for lin in [*model.linears, *model.heads]:
        bound = math.sqrt(6 / lin.in_features)
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.95 * bound
        assert abs(lin.weight.mean().item()) < 0.05 * bound
    assert all(lin.bias is None for lin in model.linears)  # the new init has no c_i
    assert all(lin.bias is not None for lin in ResidualMFN(2, 8, 1, 3, 16, init="bacon").linears)


def test_neighbour_directions():
    assert neighbour_directions(2).shape == (4, 2)
    d3 = neighbour_directions(3)
    assert d3.shape == (13, 3)
    # No direction is the negative of another: one of each +-pair of the 26-neighbourhood.
    vectors = {tuple(v) for v in d3.tolist()}
    assert len(vectors | {tuple(-c for c in v) for v in vectors}) == 26


def test_bacon_frequencies_are_quantised():
    model = BACON(3, 64, 1, 4, 64)
    m = 64 // 8
    for f in model.filters:
        q = f.weight / (2 * math.pi)
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-5)
        assert q.abs().max() <= m and q.abs().max() >= m - 1


def test_frozen_frequencies_are_not_trainable_parameters():
    model = ResidualMFN(2, 16, 1, 3, 32)
    model.requires_grad_(True)  # cannot unfreeze buffers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.endswith("weight") and name.startswith("filters") for name in trainable)
    assert {f"filters.{i}.weight" for i in range(3)} <= set(dict(model.named_buffers()))
    assert {f"filters.{i}.bias" for i in range(3)} <= trainable
    state = model.state_dict()
    assert "filters.0.weight" in state  # still saved

    trainable_model = ResidualMFN(2, 16, 1, 3, 32, trainable_frequencies=True)
    names = {name for name, p in trainable_model.named_parameters() if p.requires_grad}
    assert "filters.0.weight" in names


def test_gabor_filter_has_trainable_envelope():
    model = ResidualMFN(2, 8, 1, 2, 16, filter="gabor")
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"filters.0.gamma", "filters.0.mu"} <= names
    g = model.filters[0]
    assert torch.all(g.gamma > 0) and torch.all(g.mu.abs() <= 0.5)


def test_filters_as_modules():
    x = torch.rand(10, 2) - 0.5
    f = FourierFilter(2, 8)
    torch.testing.assert_close(f(x), torch.sin(x @ f.weight.T + f.bias))
    g = GaborFilter(2, 8, trainable_frequencies=True)
    env = torch.exp(-0.5 * g.gamma * ((x[:, None, :] - g.mu) ** 2).sum(-1))
    torch.testing.assert_close(g(x), env * torch.sin(x @ g.weight.T + g.bias))
    assert isinstance(g.weight, torch.nn.Parameter)


def test_grid_coordinates_are_pixel_centres_in_xy_order():
    c = grid_coordinates((4, 8))
    assert c.shape == (4, 8, 2)
    torch.testing.assert_close(c[0, 0], torch.tensor([-0.5 + 0.5 / 8, -0.5 + 0.5 / 4]))
    torch.testing.assert_close(c[3, 7], torch.tensor([0.5 - 0.5 / 8, 0.5 - 0.5 / 4]))
    v = grid_coordinates((2, 3, 4), dtype=torch.float64)
    assert v.shape == (2, 3, 4, 3) and v.dtype == torch.float64
    assert v[1, 2, 3].tolist() == pytest.approx([0.375, 1 / 3, 0.25])


@pytest.mark.parametrize(
    "shape, error", [((), ValueError), ((0, 4), ValueError), ((2, 2, 2, 2), ValueError), (5, TypeError)]
)
def test_grid_coordinates_rejects_bad_shapes(shape, error):
    with pytest.raises(error, match="shape"):
        grid_coordinates(shape)


def test_bad_coordinates_are_rejected_by_name():
    model = ResidualMFN(2, 8, 1, 2, 16)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.rand(10, 3))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        model(torch.ones(10, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model([[0.0, 0.0]])
    # numpy-built coordinates are float64: named, not torch's "mat1 and mat2" error
    with pytest.raises(TypeError, match=r"x must have the parameters' dtype torch.float32, got torch.float64"):
        model(torch.rand(10, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have the parameters' dtype"):
        model(torch.rand(10, 2).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the operands itself
        assert model(torch.rand(10, 2).bfloat16())[0].shape == (10, 1)
    assert model.double()(torch.rand(10, 2, dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_scales": 0}, "n_scales"),
        ({"resolution": 1}, "resolution"),
        ({"resolution": 16.0}, "resolution"),
        ({"init": "siren"}, "init"),
        ({"filter": "wavelet"}, "filter"),
        ({"head_activation": "tanh"}, "head_activation"),
        ({"lambda1": -0.1}, "lambda1"),
        ({"hidden_features": 0}, "hidden_features"),
    ],
)
def test_bad_residual_mfn_arguments(kwargs, match):
    args = {"in_features": 2, "hidden_features": 8, "out_features": 1, "n_scales": 2, "resolution": 16}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ResidualMFN(**args)


def test_lambda2_beyond_coverage_warns():
    with pytest.warns(UserWarning, match="gaps in Fourier coverage"):
        ResidualMFN(2, 8, 1, 2, 16, lambda1=0.3, lambda2=2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ResidualMFN(2, 8, 1, 2, 16, lambda1=0.3, lambda2=2.3)


def test_bacon_needs_room_for_its_quantised_bands():
    with pytest.raises(ValueError, match="resolution"):
        BACON(2, 8, 1, 4, 6)
    with pytest.raises(ValueError, match="n_scales"):
        BACON(2, 8, 1, 0, 16)


def test_non_finite_hyper_parameters_and_frequency_shapes_are_refused():
    with pytest.raises(ValueError, match="input_scale must be a positive finite number, got inf"):
        MFN(2, 8, 1, 3, input_scale=float("inf"))
    with pytest.raises(ValueError, match="gamma_rate must be a positive finite number, got nan"):
        GaborFilter(2, 8, gamma_rate=float("nan"))
    with pytest.raises(ValueError, match=r"weight must have shape \(8, 2\), got \(1, 2\)"):
        FourierFilter(2, 8).set_frequencies(torch.rand(1, 2))  # copy_ would broadcast the row


def test_numpy_integers_are_counts_and_bools_are_not():
    """Sweeps over np.arange hand out numpy integers; True as a size is a bug."""
    model = ResidualMFN(np.int64(2), np.int64(8), 1, n_scales=np.int64(2), resolution=np.int64(16))
    model.set_stage(np.int64(1))
    assert model.stage == 1 and type(model.stage) is int
    assert grid_coordinates((np.int64(4), 4)).shape == (4, 4, 2)
    with pytest.raises(ValueError, match="n_scales must be an int >= 1, got True"):
        ResidualMFN(2, 8, 1, n_scales=True, resolution=16)


def test_coordinates_on_another_device_than_the_model_are_named():
    """A CPU model given a meta input raised torch's own device error."""
    model = ResidualMFN(2, 8, 1, 2, 16)
    with pytest.raises(ValueError, match=r"x is on meta, the model's parameters on cpu"):
        model(torch.zeros(3, 2, device="meta"))
