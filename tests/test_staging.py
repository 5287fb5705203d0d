"""Coarse-to-fine training: what each stage trains, freezes and detaches."""

import pytest
import torch

from fieldkern import BACON, ResidualMFN


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def changed(before, model):
    after = model.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def step(model, optimizer, x, target):
    optimizer.zero_grad()
    loss = model.stage_loss(model(x), target)
    loss.backward()
    optimizer.step()
    return loss


def layer_names(model, i):
    """State-dict names of the trunk layer i: its filter and the linear map feeding it."""
    names = {n for n in model.state_dict() if n.startswith(f"filters.{i}.")}
    if i > 0:
        names |= {n for n in model.state_dict() if n.startswith(f"linears.{i - 1}.")}
    return names


def head_names(model, k):
    return {n for n in model.state_dict() if n.startswith(f"heads.{k}.")}


def frequency_names(model):
    return {f"filters.{i}.weight" for i in range(model.n_scales)}


@pytest.fixture
def data():
    x = torch.rand(64, 2) - 0.5
    return x, torch.sin(5 * x[:, :1]) + x[:, 1:] ** 2


def test_residual_stage_trains_scales_up_to_the_stage_and_nothing_else(data):
    x, target = data
    model = ResidualMFN(2, 16, 1, 4, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.set_stage(1)
    assert model.stage == 1 and len(model(x)) == 2
    before = snapshot(model)
    step(model, optimizer, x, target)
    moved = changed(before, model)
    expected = (layer_names(model, 0) | layer_names(model, 1) | head_names(model, 0)
                | head_names(model, 1)) - frequency_names(model)
    assert moved == expected
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in expected), name


def test_stage_switch_clears_stale_gradients_and_refreezes(data):
    x, target = data
    model = ResidualMFN(2, 16, 1, 3, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.set_stage(2)
    step(model, optimizer, x, target)
    assert model.heads[2].weight.grad is not None
    model.set_stage(0)
    assert model.heads[2].weight.grad is None and not model.heads[2].weight.requires_grad
    before = snapshot(model)
    # Adam's moments from stage 2 must not move the now-frozen layers.
    step(model, optimizer, x, target)
    moved = changed(before, model)
    assert moved == (layer_names(model, 0) | head_names(model, 0)) - frequency_names(model)


def test_residual_stage_loss_is_on_the_current_scale_only(data):
    x, target = data
    model = ResidualMFN(2, 16, 1, 3, 32)
    model.set_stage(2)
    ys = model(x)
    loss = model.stage_loss(ys, target)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(ys[-1], target))


def test_unfair_bacon_freezes_earlier_heads(data):
    x, target = data
    model = BACON(2, 16, 1, 4, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.set_stage(2, fair=False)
    before = snapshot(model)
    step(model, optimizer, x, target)
    moved = changed(before, model)
    trunk = layer_names(model, 0) | layer_names(model, 1) | layer_names(model, 2)
    assert moved == (trunk | head_names(model, 2)) - frequency_names(model)
    assert model.heads[0].weight.grad is None and model.heads[1].bias.grad is None


def test_fair_bacon_trains_earlier_heads_on_detached_features(data):
    x, target = data
    model = BACON(2, 16, 1, 4, 32)
    model.set_stage(2, fair=True)
    ys = model(x)
    assert len(ys) == 3
    full = model.stage_loss(ys, target)
    torch.testing.assert_close(full, sum(torch.nn.functional.mse_loss(y, target) for y in ys))
    full.backward()
    head_grads = [model.heads[k].weight.grad.clone() for k in range(3)]
    trunk_grads = {n: p.grad.clone() for n, p in model.named_parameters()
                   if n.startswith(("filters", "linears")) and p.grad is not None}
    assert all(g.abs().sum() > 0 for g in head_grads)  # every head up to the stage trains
    assert model.heads[3].weight.grad is None

    # The trunk sees only the current scale's loss: the earlier heads are detached.
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x)[-1], target).backward()
    for name, g in trunk_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-6, atol=1e-7)


def test_vanilla_training_sums_all_scales_and_trains_everything(data):
    x, target = data
    model = ResidualMFN(2, 16, 1, 3, 32)
    model.set_stage(1)
    model.set_stage(None)
    assert model.stage is None
    ys = model(x)
    assert len(ys) == 3
    loss = model.stage_loss(ys, target)
    torch.testing.assert_close(loss, sum(torch.nn.functional.mse_loss(y, target) for y in ys))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(not t.requires_grad for n, t in model.named_buffers())


def test_trainable_frequencies_follow_the_stage(data):
    x, target = data
    model = ResidualMFN(2, 16, 1, 3, 32, trainable_frequencies=True)
    for stage in (0, 1, 2):  # the frequencies of the stage's layers and below train
        model.set_stage(stage)
        assert [f.weight.requires_grad for f in model.filters] == [i <= stage for i in range(3)]
    model.set_stage(None)
    assert all(f.weight.requires_grad for f in model.filters)


@pytest.mark.parametrize("stage", [-1, 3, 1.0])
def test_bad_stage(stage):
    with pytest.raises(ValueError, match="stage"):
        ResidualMFN(2, 8, 1, 3, 16).set_stage(stage)


def test_stage_loss_rejects_a_target_that_would_broadcast():
    """mse_loss broadcasts: a (N,) target against (N, 1) outputs is an N x N error, silently."""
    model = ResidualMFN(2, 8, 1, 2, 16)
    ys = model(torch.rand(6, 2) - 0.5)
    with pytest.raises(ValueError, match=r"target must have the outputs' shape \(6, 1\), got \(6,\)"):
        model.stage_loss(ys, torch.rand(6))
    with pytest.raises(TypeError, match="outputs must be the list"):
        model.stage_loss(ys[-1], torch.rand(6, 1))
    assert model.stage_loss(ys, torch.rand(6, 1)).dim() == 0


def test_stage_loss_of_no_outputs_is_refused():
    """The sum over no scales was the int 0, which backward() cannot take."""
    model = ResidualMFN(2, 8, 1, 2, 16)
    with pytest.raises(ValueError, match="outputs is empty"):
        model.stage_loss([], torch.zeros(4, 1))
