"""The trainer's epoch reads nothing back from the device but its losses, once per epoch.

On a GPU every host read of a device value (``float(loss)``, ``.item()``, ``int(idx[0])``,
``bool(t.all())``, a copy to the host) waits for the queue to drain, so the next batch's
launches start only when the GPU is idle. The test runs an epoch on the CPU with the
reading rule of CUDA (``read_losses_every_batch = False``) and records every host read
(``aten::_local_scalar_dense``) with the function that made it. Reads that on CUDA touch no
device value are allowed by name: the pose perturbations' seeds from the epoch's host-side
batch order (``start_perturbations``), torch's CPU Adam step counts (``torch/optim``; on
CUDA the optimisers are capturable, :mod:`fieldkern.train.optim`) and the rotation checks
(``_check_orthonormal``, which CUDA tensors skip). Anything else fails the test.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from test_forward_model import batch, config
from torch.utils._python_dispatch import TorchDispatchMode

import fieldkern.checks
from fieldkern.cryoem import reconstruct
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.train.optim import adam

HOST_ONLY = ("start_perturbations",)


class _HostReads(TorchDispatchMode):
    """Where each host read came from: the innermost fieldkern function, or "torch/optim"."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "_to_copy", "copy_") and \
                (func.overloadpacket.__name__ == "_local_scalar_dense" or _to_host(args, kwargs)):
            self.reads.append(_origin())
        return func(*args, **(kwargs or {}))


def _to_host(args, kwargs) -> bool:
    src = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
    return src.device.type != "cpu"


def _origin() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if "torch/optim" in path:
            return "torch/optim"
        if "/fieldkern/" in path and not frame.name.startswith("<"):  # not a comprehension's frame
            return frame.name
    return "?"


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
    real_check = reconstruct.check_losses
    monkeypatch.setattr(reconstruct, "check_losses", lambda losses, *a, **k: checked.append(len(losses))
                        or real_check(losses, *a, **k))
    mode = _HostReads()
    with mode:
        loss = rec.train_epoch(1, 1)
    assert loss > 0
    assert [r for r in mode.reads if r not in HOST_ONLY + ("torch/optim",)] == [], mode.reads
    assert checked == [3]  # 3 batches, their losses read together (``tolist``) at the end


def test_the_recorder_sees_a_float_of_a_loss():
    """The check can fail: ``float(loss)`` (what the trainer did per batch) is a host read."""
    mode = _HostReads()
    with mode:
        float(torch.ones(2).sum())
    assert len(mode.reads) == 1


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
