"""The trainer's epoch reads nothing back from the device but its losses, once per epoch.

On a GPU every host read of a device value (``float(loss)``, ``.item()``, ``int(idx[0])``,
``bool(t.all())``, ``tolist()``, a copy to the host) waits for the queue to drain, so the
next batch's launches start only when the GPU is idle; so do operators whose output's size
depends on the data (``bincount``, ``nonzero``, boolean indexing, ...: CUDA reads the size
back) and tensors made from host data on the device (``torch.tensor([...], device=...)``, a
blocking copy from pageable memory). None of them can be captured in a CUDA graph. The test
runs an epoch on the CPU with the reading rule of CUDA (``read_losses_every_batch = False``)
and the code paths CUDA takes where they differ (:func:`as_on_a_gpu`: no rotation checks,
which CUDA tensors skip; the taps' adjoint of other devices), and records each of these with
the function that made it: host reads (``aten::_local_scalar_dense``, and ``tolist`` /
``numpy``, which no dispatch mode sees), the data-dependent operators by name, and host data
of more than one element. Allowed by name: reads that on CUDA touch no device value (the pose
perturbations' seeds from the epoch's host-side batch order, ``start_perturbations``; a
rank's positions in each batch, found on the host in data-parallel runs,
``owned_positions``; torch's CPU Adam step counts, ``torch/optim``: on CUDA the optimisers
are capturable, :mod:`fieldkern.train.optim`) and the epoch's one read of its losses
(``check_losses``, whose calls the test counts). Anything else fails the test. What runs
only on a GPU (the Triton kernels' launchers, CUDA libraries) is not seen here:
``test_cuda_steps_never_wait_for_the_device`` checks it on a device.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import pytest
import torch
from test_forward_model import batch, config
from torch.utils._python_dispatch import TorchDispatchMode

import fieldkern.checks
from fieldkern.cryoem import reconstruct, slice_taps
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.train.optim import adam

HOST_ONLY = ("start_perturbations", "owned_positions")


#: Operators that wait on a GPU whatever their arguments: their output's size (or value, for
#: ``equal``) is read back to the host.
WAITS_ON_A_GPU = frozenset({"_local_scalar_dense", "bincount", "nonzero", "argwhere", "masked_select",
                            "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
                            "equal", "is_nonzero", "allclose"})


class _HostReads(TorchDispatchMode):
    """Where each wait for a GPU came from: the innermost fieldkern function, or "torch/optim"."""

    def __init__(self):
        super().__init__()
        self.ops = []  # (operator, origin) of each wait

    @property
    def reads(self) -> list[str]:
        """The origin of each wait."""
        return [where for _, where in self.ops]

    def _record(self, name: str) -> None:
        self.ops.append((name, _origin()))

    def __enter__(self):
        # Imported here: fieldkern.kernels imports triton, which must wait for TRITON_INTERPRET
        # (tests/kernels/conftest.py), and this module is collected first.
        from fieldkern.kernels.testing import python_host_reads

        self._python = python_host_reads(self._record)  # tolist, numpy: no dispatch mode sees them
        self._python.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._python.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in WAITS_ON_A_GPU or _mask_index(name, args) or _host_data(name, args) or \
                (name in ("_to_copy", "copy_") and _to_host(args, kwargs)):
            self._record(name)
        return func(*args, **(kwargs or {}))


def _mask_index(name: str, args) -> bool:
    """Indexing by a boolean mask (``t[mask]``, ``t[mask] = v``): a ``nonzero`` inside."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


def _host_data(name: str, args) -> bool:
    """A tensor of Python data (``torch.tensor([...])``): on a GPU, a copy from the host. One
    element is allowed (a scalar operand: torch passes it with the launch)."""
    return name == "lift_fresh" and args[0].numel() > 1


def _to_host(args, kwargs) -> bool:
    src = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
    return src.device.type != "cpu"


def _origin() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if "torch/optim" in path:
            return "torch/optim"
        if "/fieldkern/" in path and not frame.name.startswith("<") \
                and not path.endswith("fieldkern/kernels/testing.py"):  # not a comprehension's, nor the recorder's
            return frame.name
    return "?"


@contextlib.contextmanager
def as_on_a_gpu():
    """The CPU run takes the paths a CUDA run takes where they differ: no rotation checks (CUDA
    tensors skip them) and the taps' adjoint of other devices."""
    check, methods = fieldkern.checks._check_orthonormal, slice_taps.SCATTER_METHODS
    fieldkern.checks._check_orthonormal = lambda *a, **k: None
    slice_taps.SCATTER_METHODS = {}
    try:
        yield
    finally:
        fieldkern.checks._check_orthonormal, slice_taps.SCATTER_METHODS = check, methods


def epoch_waits(rec: Reconstruction, epoch: int, stage: int) -> tuple[float, list[tuple[str, str]]]:
    """One epoch of ``rec`` under CUDA's reading rule, as on a GPU: its loss and the
    ``(operator, origin)`` of each wait for the device that is not allowed by name."""
    rec.read_losses_every_batch = False
    mode = _HostReads()
    with as_on_a_gpu(), mode:
        loss = rec.train_epoch(epoch, stage)
    # check_losses: the epoch's one read of its losses (the callers count its calls)
    allowed = HOST_ONLY + ("torch/optim", "check_losses")
    return loss, [(op, where) for op, where in mode.ops if where not in allowed]


def _reconstruction(**kw):
    _, R, spectra, ctf = batch(48)
    images = torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))).real
    return Reconstruction(images, ctf.contiguous(), R, config(batch_size=16, **kw))


@pytest.mark.parametrize(("projector", "support"), [("fourier", "box"), ("grid_sample", "box"), ("real", "box"),
                                                     ("fourier", "sphere")])
def test_an_epoch_reads_its_losses_once(monkeypatch, projector, support):
    """With ``support="sphere"`` (the quick preset's) the field is evaluated on the sphere's
    voxels only: found once, not by a boolean mask per step."""
    rec = _reconstruction(projector=projector, support=support)
    rec.train_epoch(0, 0)  # first epoch: whatever is built once stays out
    checked = []
    real_check = reconstruct.check_losses
    monkeypatch.setattr(reconstruct, "check_losses", lambda losses, *a, **k: checked.append(len(losses))
                        or real_check(losses, *a, **k))
    loss, waits = epoch_waits(rec, 1, 1)
    assert loss > 0
    assert waits == []
    assert checked == [3]  # 3 batches, their losses read together (``tolist``) at the end


def test_the_recorder_sees_a_float_of_a_loss():
    """The check can fail: ``float(loss)`` (what the trainer did per batch) is a host read."""
    mode = _HostReads()
    with mode:
        float(torch.ones(2).sum())
    assert len(mode.reads) == 1


@pytest.mark.parametrize("block", [
    lambda: torch.bincount(torch.tensor([0, 2, 2]), minlength=4),
    lambda: torch.arange(4)[torch.arange(4) > 1],
    lambda: torch.zeros(3) + torch.tensor([1.0, 2.0, 3.0]),
    lambda: torch.ones(3).sum().tolist(),
    lambda: torch.ones(3).numpy(),
])
def test_the_recorder_sees_what_waits_on_a_gpu(block):
    """The check can fail: a data-dependent size (bincount, a boolean mask), host data, or a
    read that bypasses the dispatcher (tolist, numpy)."""
    mode = _HostReads()
    with mode:
        block()
    assert mode.reads, mode.ops


def test_the_recorder_lets_scalars_and_device_indexing_pass():
    mode = _HostReads()
    with mode:
        t = torch.arange(5.0)
        t[torch.arange(2)] = t[torch.arange(3, 5)] * 2.0 + torch.tensor(1.0)
    assert mode.reads == [], mode.ops


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


def _never_synchronizing(step):
    """``step`` run under ``torch.cuda.set_sync_debug_mode("error")``: any call that waits for
    the device (a host read, a blocking copy, an operator sized by the data) raises."""
    def run(*args, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("projector", "support"), [("fourier", "box"), ("grid_sample", "box"), ("real", "box"),
                                                     ("fourier", "sphere")])
def test_cuda_steps_never_wait_for_the_device(projector, support):
    """On a GPU the volume and pose steps of an epoch never synchronize (what the CPU test
    above cannot see: the launchers, cuBLAS/cuSPARSE and torch's own CUDA operators); the
    first epoch runs unguarded (autotuning, what is cached)."""
    _, R, spectra, ctf = batch(48)
    images = torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))).real
    rec = Reconstruction(images, ctf.contiguous().cuda(), R,
                         config(batch_size=16, projector=projector, support=support), device="cuda")
    assert not rec.read_losses_every_batch
    rec.train_epoch(0, 0)
    rec._volume_steps = _never_synchronizing(rec._volume_steps)
    rec._pose_steps = _never_synchronizing(rec._pose_steps)
    assert rec.train_epoch(1, 1) > 0


@pytest.mark.parametrize("temperature", [0.0, 10.0])
def test_a_pose_search_waits_once_for_its_frequencies(temperature):
    """The search turns its frequency mask into indices once (one ``nonzero``) and moves the
    poses with ``where``: no boolean-mask indexing per use."""
    from fieldkern.cryoem.fourier_slice import volume_spectrum
    from fieldkern.cryoem.poses import search_poses
    from fieldkern.cryoem.rotations import super_fibonacci_rotations

    vol, R, spectra, ctf = batch(6)
    spectrum = volume_spectrum(vol)
    D = vol.shape[-1]
    k = torch.arange(D) - D // 2
    mask = k[:, None] ** 2 + k[None, :] ** 2 < (D // 4) ** 2
    uniforms = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = super_fibonacci_rotations(64)
    mode = _HostReads()
    with mode:
        search_poses(spectrum, R.double(), spectra, ctf, grid, mask, temperature, uniforms)
    assert mode.ops == [("nonzero", "search_poses")]
