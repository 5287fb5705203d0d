"""The paper preset's epoch on one GPU: 50,000 particles, box 80 at 1.25 A, batches of 600, 5
volume + 20 pose steps per batch, the finest stage (pose steps on).

Synthetic data, no gemmi: a few Gaussian blobs at box 80 simulated by
:func:`fieldkern.cryoem.simulate` on the GPU (projections and CTFs there; the ``simulate``
case times that), read back as a particle set. Cases, same data, same run:

- ``trainer``: the trainer as it runs on CUDA: each batch's CTFs computed on the device from
  a device copy of the parameters (:func:`fieldkern.cryoem.experiment.batch_ctfs`), the
  losses read back once per epoch, capturable Adam (no host reads in a step);
- ``host_round_trips``: the trainer as it ran before (CTFs computed on the host per batch
  and copied over, each batch's loss read back as it is made);
- ``cuda_graphs``: ``trainer`` with each batch's volume steps and pose steps replayed from
  CUDA graphs (``Reconstruction(..., cuda_graphs=True)``, :mod:`fieldkern.train.graphs`).

The targets (issue 21): <= 4 s per epoch, the whole paper preset (100 epochs) <= 7 minutes,
on one H100/H200. ``extra_info``: particles, seconds per epoch, projected minutes for the
preset's epochs. ``FIELDKERN_BENCH_PARTICLES`` shrinks the data set (e.g. to fit a
session). CUDA only: an epoch of 50,000 particles at box 80 is far beyond a CPU benchmark.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from _bench_utils import CUDA, DEVICE, sync
from epoch_speed import blobs

pytestmark = pytest.mark.skipif(not CUDA, reason="the paper preset's epoch needs a CUDA device")

N_PARTICLES = int(os.environ.get("FIELDKERN_BENCH_PARTICLES", 50_000))


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    from fieldkern.cryoem import load_particles, simulate
    from fieldkern.cryoem.presets import cryoem_preset

    preset = cryoem_preset("paper", "4ake")
    folder = tmp_path_factory.mktemp("paper")
    vol = blobs(preset.box, torch.Generator().manual_seed(0))
    sync()
    start = time.perf_counter()
    sim = simulate(vol, folder, N_PARTICLES, apix=preset.apix, snr=preset.snr, seed=0, device=DEVICE,
                   batch_size=1000, progress=False)
    simulate_seconds = time.perf_counter() - start
    return preset, load_particles(sim.star_path), simulate_seconds


def test_bench_paper_simulate(benchmark, paper_data):
    """The simulation's time, measured once by the fixture (it writes a 1.3 GB stack)."""
    _, ds, seconds = paper_data
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(case="simulate", particles=len(ds), simulate_seconds=seconds)


@pytest.mark.parametrize("case", ["trainer", "host_round_trips", "cuda_graphs"])
def test_bench_paper_epoch(benchmark, paper_data, case):
    from fieldkern.cryoem.experiment import batch_ctfs
    from fieldkern.cryoem.reconstruct import Reconstruction

    preset, ds, _ = paper_data
    config = preset.recon
    ctfs = functools.partial(_host_ctfs, ds) if case == "host_round_trips" else batch_ctfs(ds, None, DEVICE)
    rec = Reconstruction(ds.images, ctfs, ds.rotations, config, device=DEVICE, cuda_graphs=case == "cuda_graphs")
    rec.read_losses_every_batch = case == "host_round_trips"
    last = config.n_scales - 1
    rec.model.set_stage(last)
    first = config.stage_epochs[-1] if config.stage_epochs else 0
    rec.train_epoch(first, last)  # untimed: compilation, autotuning (and the graphs' captures)
    epochs = iter(range(first + 1, first + 100))

    def epoch():
        rec.train_epoch(next(epochs), last)
        sync()

    benchmark.pedantic(epoch, rounds=2, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        case=case, particles=len(ds), seconds_per_epoch=seconds,
        # an upper bound: every epoch costed as the finest stage's (pose steps on)
        projected_minutes=seconds * config.epochs / 60, device=str(DEVICE),
    )


def _host_ctfs(ds, idx):
    return ds.ctf(idx.cpu())
