"""The paper's cryo-EM experiment end to end, as ``examples/cryoem.py`` runs it.

1. :func:`fieldkern.cryoem.presets.cryoem_preset`: the run's sizes and training settings;
   :func:`fieldkern.cryoem.memory.check_memory` refuses a run that cannot fit.
2. :func:`fieldkern.cryoem.data.prepare_data`: simulate a particle set from a structure or
   map, or read a RELION STAR file; :func:`fieldkern.cryoem.poses.initial_poses`: the
   starting pose estimates.
3. :func:`reconstruct`: train one :class:`~fieldkern.cryoem.reconstruct.Reconstruction` of
   every particle, or, without a ground-truth map, one per half set.
4. :func:`evaluate_reconstructions`: align each scale's map to the ground truth (or half 2 to
   half 1) and measure FSC resolution and pose errors (:mod:`fieldkern.cryoem.evaluation`).
5. :func:`fieldkern.cryoem.outputs.write_outputs`: maps, curves, figures, the refined poses
   and ``results.json``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path

import torch

from fieldkern._files import remove_outputs
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.cryoem.ctf import ctf as _ctf
from fieldkern.cryoem.data import ExperimentData
from fieldkern.cryoem.evaluation import (
    evaluate,
    evaluate_half_maps,
    pose_error_summary,
    poses_in_aligned_frame,
    split_halves,
)
from fieldkern.cryoem.io import ParticleDataset
from fieldkern.cryoem.marching import fit_halves
from fieldkern.cryoem.outputs import RESULTS, RunOutcome, StageMapWriter
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.distributed import DistContext


class ImageRows:
    """Rows ``index`` of an image stack (tensor or lazy :class:`ImageStack`), read only when
    sliced: a half set that each rank of a data-parallel run reads its own block of."""

    def __init__(self, images, index: torch.Tensor):
        self.images, self.index = images, torch.as_tensor(index, dtype=torch.long)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *tuple(self.images.shape)[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> torch.Tensor:
        return torch.as_tensor(self.images[self.index[key]])


def reconstruct(data: ExperimentData, initial: torch.Tensor, config: ReconstructionConfig, out: Path, *,
                resume: bool = False, progress: bool = True, device=None, dist: DistContext | None = None,
                time_limit: float | None = None, cuda_graphs: bool = False,
                ) -> list[tuple[torch.Tensor | None, Reconstruction]]:
    """Train on ``data`` from the poses ``initial`` ``(N, 3, 3)``; returns ``(particle indices,
    trained reconstruction)`` pairs: ``[(None, rec)]`` for all particles, or one pair per half set.

    With a ground truth and fixed stages: one reconstruction of every particle
    (``out/checkpoint.pt``, maps ``stage{k}_scale{k}.mrc``). Without one, or with
    ``config.marching == "fsc"``: two, one per half set of
    :func:`~fieldkern.cryoem.evaluation.split_halves` (``checkpoint_half{1,2}.pt``,
    ``half{h}_stage{k}_scale{k}.mrc``) with :func:`half_set_config` (seeds ``config.seed``
    and ``config.seed + 1``; half the batch under marching), trained one after the other, or
    side by side under FSC marching (:func:`fieldkern.cryoem.marching.fit_halves`).
    RELION origins (``data.dataset.shifts_A``) centre the images. ``resume`` continues from
    the checkpoints (half 2 starts afresh if the run stopped before it began); FileNotFoundError
    if the first is missing. ``time_limit`` (seconds, for all of them together): stop after
    the epoch that ends past it with :class:`~fieldkern.train.TimeLimitReached`, every
    checkpoint written; ``resume`` then goes on. ``cuda_graphs``: replay the steps from CUDA
    graphs (:class:`~fieldkern.cryoem.reconstruct.Reconstruction`). Call on every rank.
    """
    start = time.monotonic()
    ds = data.dataset
    one = data.has_ground_truth and config.marching == "fixed"
    halves = [None] if one else list(split_halves(ds, config.seed))
    half_run = functools.partial(_half_run, data, initial=initial, config=config, out=out, device=device, dist=dist,
                                 resume=resume, cuda_graphs=cuda_graphs)
    if config.marching == "fsc":
        runs = [half_run(index, h) for h, index in enumerate(halves, 1)]
        fit_halves([rec for _, rec, _ in runs], [c for _, _, c in runs], progress=progress, time_limit=time_limit,
                   callbacks=[StageMapWriter(rec, out, ds.apix, f"half{h}_") for h, (_, rec, _) in enumerate(runs, 1)])
        return [(index, rec) for index, rec, _ in runs]
    recs = []
    for h, index in enumerate(halves, 1):
        index, rec, checkpoint = half_run(index, h)
        tag = "" if index is None else f"half{h}_"
        left = None if time_limit is None else max(time_limit - (time.monotonic() - start), 1e-3)
        rec.fit(checkpoint, progress=progress, callbacks=[StageMapWriter(rec, out, ds.apix, tag)], time_limit=left)
        recs.append((index, rec))
    return recs


def _half_run(data: ExperimentData, index: torch.Tensor | None, h: int, *, initial: torch.Tensor,
              config: ReconstructionConfig, out: Path, device, dist, resume: bool, cuda_graphs: bool):
    """``(index, reconstruction, checkpoint path)`` of half set ``h`` (rows ``index``; None: all
    particles), loaded from its checkpoint with ``resume``."""
    ds = data.dataset
    ctfs = batch_ctfs(ds, index, device)
    if index is None:
        images, poses, shifts = ds.images, initial, ds.shifts_A
    else:
        images, poses, shifts = ImageRows(ds.images, index), initial[index], ds.shifts_A[index]
    cfg = config if index is None else half_set_config(config, h)
    rec = Reconstruction(images, ctfs, poses, cfg, device=device, dist=dist, shifts=shifts / ds.apix,
                         cuda_graphs=cuda_graphs)
    checkpoint = out / ("checkpoint.pt" if index is None else f"checkpoint_half{h}.pt")
    if resume:
        if checkpoint.is_file():
            rec.load(checkpoint)
        elif h == 1:
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        if h == 1:
            # The run goes on: the old run's final results no longer describe the folder.
            with rec.dist.agree(f"removing the old results in {out}"):
                if rec.dist.is_main:
                    remove_outputs(out, RESULTS)
    return index, rec, checkpoint


def half_set_config(config: ReconstructionConfig, h: int) -> ReconstructionConfig:
    """The settings of half set ``h`` (1 or 2) of a run with ``config``: seed ``config.seed +
    h - 1``; under FSC marching (``config.marching == "fsc"``) also batches of half the size
    (``ceil(batch_size / 2)``).

    Half sets must be independent down to the field's random initial content, which the data
    never fully overwrite at high frequencies: a shared seed inflates their FSC. Under
    marching the two halves train side by side as one run, and with half the batch each
    half's field takes as many Adam steps per epoch as one field on every particle (with the
    full batch, 2/3 of them: 1500 particles in batches of 1000), which the averaged half
    maps need to match one field of all particles (quick 1OL5 data, marching's patience 5:
    7.42 A with the full batch, 7.31 A with half of it, 7.32 A for the fixed run on all
    particles; docs/cryoem.md, "FSC marching"). The fixed schedule's half sets keep the full
    batch: half of it cost the quick 4AKE half maps 7.38 -> 7.56 A and 40% more time.
    """
    if h not in (1, 2):
        raise ValueError(f"a half set is 1 or 2, got {h!r}")
    batch = -(-config.batch_size // 2) if config.marching == "fsc" else config.batch_size
    return replace(config, seed=config.seed + h - 1, batch_size=batch)


def batch_ctfs(ds: ParticleDataset, index: torch.Tensor | None, device=None):
    """``idx -> (n, D, D)`` float32 CTFs of the rows ``idx`` of the particles ``index`` (None:
    all of them). On the CPU (and without a device) from the data set's host parameters; on
    another device from one copy of them there, indexed by the device's ``idx``, so a batch
    needs neither a host read of its indices nor a host-to-device copy of its CTFs."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        if index is None:
            return lambda idx: ds.ctf(idx.cpu())
        return functools.partial(_host_ctfs, ds, index)
    return device_ctfs(ds, index, device)


def device_ctfs(ds: ParticleDataset, index: torch.Tensor | None, device):
    """:func:`batch_ctfs` from a copy of the CTF parameters on ``device`` (any device; the
    same values as the host's)."""
    params = ds.ctf_params.to(device)
    rows = None if index is None else index.to(device)

    def ctfs(idx: torch.Tensor) -> torch.Tensor:
        p = params.select(idx if rows is None else rows[idx])
        return _ctf(ds.box, ds.apix, **p, device=device, dtype=torch.float32)
    return ctfs


def _host_ctfs(ds: ParticleDataset, index: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return ds.ctf(index[idx.cpu()])


def evaluate_reconstructions(recs: list[tuple[torch.Tensor | None, Reconstruction]], data: ExperimentData,
                             initial: torch.Tensor) -> RunOutcome:
    """Evaluate what :func:`reconstruct` returned: the maps, every particle's pose and RELION
    origin (half 2's moved into half 1's frame, which the averaged half maps are in), the
    losses per epoch (one list per half set) and the marching decisions. Half sets with a
    ground truth (FSC marching): the averaged half maps are measured against the truth, the
    half-map resolutions kept beside."""
    ds = data.dataset
    marching = recs[0][1].state.marching
    if len(recs) == 1:
        rec = recs[0][1]
        rotations, volumes = rec.rotations.cpu(), rec.volumes()
        ev = evaluate(volumes, data.ground_truth, ds.apix, initial, rotations, data.true_rotations,
                      flip=rec.config.pose_search > 0)
        return RunOutcome(ev, volumes, rotations, ds.shifts_A, rec.state.losses, marching)
    (first, rec1), (second, rec2) = recs
    ev = evaluate_half_maps(rec1.volumes(), rec2.volumes(), ds.apix, global_search=rec1.config.pose_search > 0)
    rotations = initial.clone().to(torch.float64)
    shifts = ds.shifts_A.clone().to(torch.float64)
    rotations[first] = rec1.rotations.cpu()
    rotations[second], shifts[second] = poses_in_aligned_frame(rec2.rotations.cpu(), shifts[second],
                                                               *ev.transform, ds.apix)
    ev.pose_error_deg = pose_error_summary(initial, rotations, data.true_rotations)
    if data.ground_truth is not None:  # half sets with a truth (FSC marching): the average against it
        # in half 1's frame and hand: after a global search that may be the truth's mirror image
        halves = ev
        ev = evaluate(halves.aligned_maps, data.ground_truth, ds.apix, initial, rotations, data.true_rotations,
                      flip=rec1.config.pose_search > 0)
        ev.half_maps, ev.half_map_resolution = halves.half_maps, halves.resolution_angstrom
    return RunOutcome(ev, ev.aligned_maps, rotations, shifts, [rec1.state.losses, rec2.state.losses], marching)


__all__ = ["ImageRows", "evaluate_reconstructions", "half_set_config", "reconstruct"]
