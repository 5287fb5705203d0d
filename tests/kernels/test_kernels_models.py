"""The modules give the same outputs and parameter gradients with backends triton and torch."""

import pytest
import torch

import fieldkern
from _kernel_helpers import close, needs_interpreter

pytestmark = needs_interpreter


def _outputs_and_grads(model, x, backend, loss=None):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with fieldkern.set_backend(backend):
        y = model(x)
    ys = y if isinstance(y, list) else [y]
    if loss is None:
        target = torch.sin(7 * x.detach()[..., :1])
        total = sum(((o - target) ** 2).mean() for o in ys)
    else:
        total = loss(ys)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in ys], grads, x.grad


def _compare(model, x, loss=None):
    ro, rg, rx = _outputs_and_grads(model, x, "torch", loss)
    to, tg, tx = _outputs_and_grads(model, x, "triton", loss)
    assert len(ro) == len(to)
    for k, (a, b) in enumerate(zip(to, ro)):
        close(f"output {k}", a, b)
    assert rg.keys() == tg.keys()
    for n in rg:
        close(f"grad {n}", tg[n], rg[n])
    close("grad x", tx, rx)


def test_residual_mfn_relu_heads():
    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(2, 20, 3, n_scales=3, resolution=32, head_activation="relu")
    _compare(model, torch.rand(61, 2) - 0.5)


def test_residual_mfn_3d_gabor_staged():
    torch.manual_seed(1)
    model = fieldkern.ResidualMFN(3, 33, 1, n_scales=4, resolution=16, filter="gabor", init="bacon")
    model.set_stage(2)
    _compare(model, torch.rand(45, 3) - 0.5, loss=lambda ys: (ys[-1] ** 2).mean())


@pytest.mark.parametrize("filter", ["fourier", "gabor"])
def test_bacon_fair_staged(filter):
    torch.manual_seed(2)
    model = fieldkern.BACON(2, 24, 2, n_scales=4, resolution=32, filter=filter, trainable_frequencies=True)
    model.set_stage(2, fair=True)
    _compare(model, torch.rand(50, 2) - 0.5, loss=lambda ys: model.stage_loss(ys, torch.zeros_like(ys[0])))


def test_mfn_trainable_frequencies():
    torch.manual_seed(3)
    model = fieldkern.MFN(2, 16, 3, n_layers=3, input_scale=32.0, filter="gabor")
    _compare(model, torch.rand(40, 2) - 0.5)
