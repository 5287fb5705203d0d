"""The lent-GPU scripts of bench/, here on the CPU: they parse, and ``bench/paper_run.sh``
carries a run across calls (stopped by its time limit, its folder carried, resumed)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["run_gpu.sh", "paper_run.sh", "device_env.sh", "gpu_wheels.sh"])
def test_device_scripts_parse(name):
    subprocess.run(["bash", "-n", str(ROOT / "bench" / name)], check=True)


def _paper_run(tmp_path, out, carried, minutes):
    env = {**os.environ, "OUT": str(out), "CARRIED": str(carried), "TMPDIR": str(tmp_path), "PRESET": "tiny",
           "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           # the script's `python` is this interpreter
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    args = ["bash", str(ROOT / "bench" / "paper_run.sh"), "4ake", minutes, "--epochs", "4", "--n-particles", "60"]
    return subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=300)


def test_paper_run_goes_on_from_the_carried_folder(tmp_path):
    """Call 1 stops after an epoch (exit 3) and leaves its checkpoint in $OUT, not the data
    set; call 2 finds that folder carried back, resumes (a --resume without a checkpoint
    fails) and finishes with every result in $OUT."""
    pytest.importorskip("gemmi")  # the script simulates 4AKE's particles
    first = _paper_run(tmp_path, tmp_path / "out1", tmp_path / "carried", "0.0001")
    assert first.returncode == 3, first.stdout + first.stderr
    dest = tmp_path / "out1" / "paper_4ake"
    assert (dest / "checkpoint.pt").exists() and not (dest / "results.json").exists()
    assert not (dest / "data").exists() and not list(dest.glob("*.mrcs"))  # the stack stays behind
    shutil.copytree(dest, tmp_path / "carried")
    second = _paper_run(tmp_path, tmp_path / "out2", tmp_path / "carried", "5")
    log = (tmp_path / "out2" / "paper_4ake" / "log.txt").read_text()
    assert second.returncode == 0, log
    command = next(line for line in log.splitlines() if line.startswith("python examples/cryoem.py"))
    assert command.endswith("--resume") and "exit status 0" in log
    results = json.loads((tmp_path / "out2" / "paper_4ake" / "results.json").read_text())
    assert len(results["loss_per_epoch"]) == 4
