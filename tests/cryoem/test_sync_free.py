"""The trainer's epoch reads nothing back from the device but its losses, once per epoch.

On a GPU every host read of a device value (``float(loss)``, ``.item()``, ``int(idx[0])``,
``bool(t.all())``, a copy to the host) waits for the queue to drain, so the next batch's
launches start only when the GPU is idle. The test runs an epoch on the CPU with the
reading rule of CUDA (``read_losses_every_batch = False``) and records every host read
(:func:`fieldkern.kernels.testing.count_launches`) with the function that made it. Reads that on CUDA touch no
device value are allowed by name: the pose perturbations' seeds from the epoch's host-side
batch order (``_start_perturbations``), torch's CPU Adam step counts (``torch/optim``; on
CUDA the optimisers are capturable, :mod:`fieldkern.train.optim`) and the rotation checks
(``_check_orthonormal``, which CUDA tensors skip). Anything else fails the test.
"""

from __future__ import annotations

import pytest
import torch
from test_forward_model import batch, config

import fieldkern.checks
from fieldkern.cryoem import reconstruct
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.kernels.testing import count_launches
from fieldkern.train.optim import adam

HOST_ONLY = ("_start_perturbations",)


def _reconstruction(**kw):
    _, R, spectra, ctf = batch(48)
    images = torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))).real
    return Reconstruction(images, ctf.contiguous(), R, config(batch_size=16, **kw))


@pytest.mark.parametrize("projector", ["fourier", "grid_sample", "real"])
def test_an_epoch_reads_its_losses_once(monkeypatch, projector):
    rec = _reconstruction(projector=projector)
    rec.train_epoch(0, 0)  # first epoch: whatever is built once stays out
    rec.read_losses_every_batch = False  # CUDA's rule
    monkeypatch.setattr(fieldkern.checks, "_check_orthonormal", lambda *a, **k: None)  # as for CUDA tensors
    checked = []
    real_check = reconstruct._check_losses
    monkeypatch.setattr(reconstruct, "_check_losses", lambda losses, *a, **k: checked.append(len(losses))
                        or real_check(losses, *a, **k))
    with count_launches() as count:
        loss = rec.train_epoch(1, 1)
    assert loss > 0
    assert [r for r in count.sync_origins if r not in HOST_ONLY + ("torch/optim",)] == [], count.sync_origins
    assert checked == [3]  # 3 batches, their losses read together (``tolist``) at the end


def test_the_recorder_sees_a_float_of_a_loss():
    """The check can fail: ``float(loss)`` (what the trainer did per batch) is a host read."""
    with count_launches() as count:
        float(torch.ones(2).sum())
    assert count.syncs == ["_local_scalar_dense"] and count.sync_origins == ["?"]


def test_the_cpu_rule_reads_each_batch_and_stops_at_a_diverged_one(monkeypatch):
    """The CPU reads each batch's loss as it is made, so a NaN stops the epoch at that batch."""
    rec = _reconstruction()
    assert rec.read_losses_every_batch
    calls = []
    real = rec._volume_steps

    def steps(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(rec, "_volume_steps", steps)
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 0, batch 1 \(stage 0\)"):
        rec.train_epoch(0, 0)
    assert len(calls) == 2
    calls.clear()
    rec.read_losses_every_batch = False  # CUDA's rule: the whole epoch runs, the batch is named
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 0, batch 1 \(stage 0\)"):
        rec.train_epoch(0, 0)
    assert len(calls) == 3


def test_optimisers_are_torch_defaults_on_the_cpu():
    """CPU numbers unchanged: capturable (device step counts) only for CUDA parameters."""
    p = torch.nn.Parameter(torch.zeros(3))
    assert adam([p], lr=1e-3).defaults["capturable"] is False


def test_device_ctfs_are_the_host_ctfs(tmp_path):
    """The per-batch CTFs from a device copy of the parameters (the CUDA trainer's) equal the
    host's, for all particles and for a half set's rows; run here with the CPU as the device."""
    import fieldkern.cryoem as cem
    from fieldkern.cryoem.experiment import _host_ctfs, batch_ctfs, device_ctfs

    g = torch.Generator().manual_seed(0)
    vol = torch.rand(16, 16, 16, generator=g)
    sim = cem.simulate(vol, tmp_path, n_particles=12, apix=2.0, snr=None, seed=3, progress=False)
    ds = cem.load_particles(sim.star_path)
    idx = torch.tensor([5, 0, 11, 3])
    torch.testing.assert_close(device_ctfs(ds, None, "cpu")(idx), batch_ctfs(ds, None)(idx), rtol=0, atol=0)
    half = torch.tensor([1, 3, 5, 7, 9, 11])
    rows = torch.tensor([2, 0, 5])
    torch.testing.assert_close(device_ctfs(ds, half, "cpu")(rows), _host_ctfs(ds, half, rows), rtol=0, atol=0)
    assert not torch.equal(device_ctfs(ds, None, "cpu")(idx[:1]), device_ctfs(ds, None, "cpu")(idx[1:2]))
