"""Volume and pose steps replayed from CUDA graphs (:mod:`fieldkern.train.graphs`).

On the CPU the protocol is emulated (``GraphedSteps(capture=False)``: warm-up, static copies
of the inputs, the function stored at the capture): an epoch run that way must be the plain
epoch bit for bit. On a CUDA device the graphs are captured and replayed for real.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_forward_model import batch, config

from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.train.graphs import GraphedSteps


def test_a_slot_warms_up_captures_then_replays():
    steps = GraphedSteps(capture=False)
    calls = []

    def double(x, factor):
        calls.append(factor)
        return x * factor

    x = torch.arange(3.0)
    assert torch.equal(steps("s", 0, functools.partial(double, factor=2.0), x)[0], 2 * x)  # eager warm-up
    assert len(steps) == 0
    out = steps("s", 0, functools.partial(double, factor=2.0), x + 1)[0]  # the capture, then a replay
    assert torch.equal(out, 2 * (x + 1)) and len(steps) == 1
    out.zero_()  # a copy: the static output is untouched
    # a new factor under the same key: the stored function (factor 2) runs: a stale key shows
    assert torch.equal(steps("s", 0, functools.partial(double, factor=3.0), x)[0], 2 * x)
    # a new key drops the graph and warms up again
    assert torch.equal(steps("s", 1, functools.partial(double, factor=3.0), x)[0], 3 * x)
    assert len(steps) == 0
    # so does a new shape
    steps("s", 1, functools.partial(double, factor=3.0), x)
    assert len(steps) == 1
    assert torch.equal(steps("s", 1, functools.partial(double, factor=3.0), torch.ones(5))[0], 3 * torch.ones(5))
    assert len(steps) == 0
    steps.clear()
    assert calls == [2.0, 2.0, 2.0, 3.0, 3.0, 3.0]


def _reconstructions(device="cpu"):
    _, R, spectra, ctf = batch(48)
    images = torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))).real
    # 3 batches, the last one short (a second graph of each kind), pose steps from stage 0
    # with a learning rate that decays every epoch (a new pose key per epoch)
    cfg = config(batch_size=20, epochs=4, stage_epochs=(2,), pose_lr_decay=0.5, support="sphere")
    return [Reconstruction(images, ctf.contiguous().to(device), R, cfg, device=device) for _ in range(2)]


def _train(rec):
    rec.fit(progress=False)
    return [p.detach().cpu() for p in rec.model.parameters()], rec.rotations.cpu(), rec.state.losses


def test_emulated_graphs_train_bit_for_bit_as_plain_steps():
    plain, graphed = _reconstructions()
    graphed.graphs = GraphedSteps(capture=False)
    params, rotations, losses = _train(plain)
    g_params, g_rotations, g_losses = _train(graphed)
    # the last stage's volume graphs (full and short batches) and the full batches' pose graph;
    # the short batch's pose key changes every epoch (the decay) before it can be captured
    assert len(graphed.graphs) == 3
    assert all(torch.equal(a, b) for a, b in zip(params, g_params))
    assert torch.equal(rotations, g_rotations)
    assert losses == g_losses


def test_cuda_graphs_need_one_process_on_cuda():
    _, R, spectra, ctf = batch(8)
    with pytest.raises(ValueError, match="cuda_graphs needs one process on a CUDA device"):
        Reconstruction(spectra.real, ctf.contiguous(), R, config(), cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_train_as_plain_steps():
    """Captured and replayed on the device: the same training as launches from Python, up to
    the order of atomic additions (the taps' adjoint, ``index_add_``), which 4 epochs of
    training amplify; a replay of stale inputs (another batch's poses or targets) would
    differ by far more."""
    plain, graphed = _reconstructions("cuda")
    graphed.graphs = GraphedSteps()
    params, rotations, losses = _train(plain)
    g_params, g_rotations, g_losses = _train(graphed)
    assert len(graphed.graphs) == 3
    for a, b in zip(params, g_params):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(g_rotations, rotations, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(g_losses), torch.tensor(losses), rtol=1e-3, atol=0)
