"""Data-parallel reconstruction on CUDA: NCCL across GPUs (or gloo, ranks sharing one GPU).

Skipped without CUDA. Not yet run on a GPU: the tolerance is a guess (Triton kernels and
cuFFT sum in other orders than the CPU; 2e-7 is what 2 CPU processes reach).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[2]
ARGS = ("--preset", "tiny", "--epochs", "6", "--no-progress", "--device", "cuda")
TOL = 1e-4


def _run(out, *launcher, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "4", "FIELDKERN_AUTOTUNE": "0", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / "examples" / "cryoem.py"), *ARGS, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _compare(a, b):
    from fieldkern.cryoem import load_particles, read_mrc

    ra, rb = load_particles(a / "poses.star").rotations, load_particles(b / "poses.star").rotations
    assert (ra - rb).abs().max() < TOL
    for k in range(3):
        x, y = read_mrc(a / f"stage{k}_scale{k}.mrc")[0], read_mrc(b / f"stage{k}_scale{k}.mrc")[0]
        assert float((x - y).abs().max() / x.abs().max()) < TOL


def test_torchrun_on_gpus_matches_one_process(tmp_path):
    _run(tmp_path / "single")
    torchrun = ("-m", "torch.distributed.run", "--standalone")
    if torch.cuda.device_count() >= 2:
        results = _run(tmp_path / "nccl", *torchrun, "--nproc_per_node", "2")
        assert results["settings"]["backend"] == "nccl" and results["settings"]["world_size"] == 2
        _compare(tmp_path / "single", tmp_path / "nccl")
    else:  # one GPU: NCCL with one rank, and two ranks sharing the GPU over gloo
        results = _run(tmp_path / "nccl", *torchrun, "--nproc_per_node", "1")
        assert results["settings"]["backend"] == "nccl"
        _compare(tmp_path / "single", tmp_path / "nccl")
        results = _run(tmp_path / "shared", *torchrun, "--nproc_per_node", "2", env={"FIELDKERN_DIST_BACKEND": "gloo"})
        assert results["settings"]["backend"] == "gloo" and results["settings"]["world_size"] == 2
        _compare(tmp_path / "single", tmp_path / "shared")
