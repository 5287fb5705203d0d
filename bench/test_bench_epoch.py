"""One epoch of the quick default (``python examples/cryoem.py``) in each stage, on the CPU.

The data are the quick default's own: 3000 simulated 4AKE particles (box 32, 3 A, SNR 0.1,
seed 0), simulated once per session into a temporary folder (a few seconds; needs gemmi).
The model and settings are ``presets.cryoem_preset("quick", "4ake")``; poses start 10
degrees off (``--pose-init perturbed``), as in the default run.

Implementations (same data, same settings, same run):

- ``taps``: the trainer as it runs (``projector="fourier"``: central slices from
  precomputed trilinear taps on half of each plane, a sparse product forward and a
  scatter-add adjoint; :mod:`fieldkern.cryoem.slice_taps`);
- ``grid_sample``: the same epoch with ``projector="grid_sample"``, the slices taken by the
  reference :func:`fieldkern.cryoem.fourier_slice.central_slices` (3D ``grid_sample`` over
  the full ``D x D`` plane, differentiated by autograd), the trainer's forward model before
  the taps. Stage 2 only (the stage that holds 18 of the 24 epochs).

``torch.compile`` is not a case: an epoch is a Python loop over batches and optimiser steps
around sparse products, not one graph to compile.

The process keeps freed memory for reuse (:func:`fieldkern.host_memory.reuse_freed_memory`),
as ``examples/cryoem.py`` does; for the rest of the session, since that cannot be undone.

Timing: the stage's first epoch untimed, then ``benchmark.pedantic`` over 3 epochs (training
goes on between rounds; the cost of an epoch does not depend on the weights).
``extra_info``: implementation, stage, particles, particles_per_s, threads, device.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from _bench_utils import CUDA
from fieldkern.cryoem import data, poses, presets
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.host_memory import reuse_freed_memory

pytestmark = pytest.mark.skipif(CUDA, reason="the CPU figure of the quick default; GPU epochs: bench/epoch_speed.py")


@pytest.fixture(scope="session")
def quick_data(tmp_path_factory):
    pytest.importorskip("gemmi")
    reuse_freed_memory()  # as examples/cryoem.py does
    preset = presets.cryoem_preset("quick", "4ake")
    prepared = data.prepare_data("4ake", tmp_path_factory.mktemp("quick"), preset, seed=0, progress=False)
    start = poses.initial_poses(prepared.true_rotations, "perturbed", preset, seed=0)
    return preset, prepared.dataset, start


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("impl", ["taps", "grid_sample"])
def test_bench_quick_epoch(benchmark, quick_data, impl, stage):
    if impl == "grid_sample" and stage != 2:
        pytest.skip("the reference slices are timed at the finest stage only")
    preset, ds, start = quick_data
    config = replace(preset.recon, projector={"taps": "fourier", "grid_sample": "grid_sample"}[impl])
    rec = Reconstruction(ds.images, functools.partial(_ctfs, ds), start, config)
    first = (0, *preset.recon.stage_epochs)[stage]
    rec.model.set_stage(stage)
    rec.train_epoch(first, stage)  # untimed
    epochs = iter(range(first + 1, first + 100))
    benchmark.pedantic(lambda: rec.train_epoch(next(epochs), stage), rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        implementation=impl, stage=stage, particles=rec.n_particles,
        particles_per_s=rec.n_particles / benchmark.stats.stats.mean,
        threads=torch.get_num_threads(), device="cpu",
    )


def _ctfs(ds, idx):
    return ds.ctf(idx.cpu())
