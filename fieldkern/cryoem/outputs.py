"""What a cryo-EM run writes to its output folder, and the rule for reusing one.

During training: the checkpoint (:mod:`fieldkern.cryoem.checkpoint`) and each stage's map as the
stage ends (:class:`StageMapWriter`). At the end (:func:`write_outputs`): the maps, the FSC
curves and figures, the refined poses as a RELION STAR file and ``results.json``, written
last, so that a folder's ``results.json`` always belongs to the files beside it. Maps, the FSC
curves, figures and ``results.json`` are written atomically (a temporary file next to the
target, then renamed over it): a killed run leaves the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fieldkern._files import prepare_output_dir as _prepare_output_dir
from fieldkern._files import write_atomic
from fieldkern.cryoem import figures
from fieldkern.checks import check_finite
from fieldkern.cryoem.data import ExperimentData
from fieldkern.cryoem.evaluation import Evaluation
from fieldkern.cryoem.io import ParticleDataset, write_mrc, write_particles_star
from fieldkern.cryoem.rotations import matrix_to_relion_euler
from fieldkern.train import Callback

#: Everything a run writes to ``--out`` (globs): what ``--overwrite`` deletes first.
OUTPUTS = ("data", "ground_truth.mrc", "reconstruction_scale*.mrc", "half*_scale*.mrc", "stage*_scale*.mrc",
           "fsc.csv", "fsc.png", "slices.png", "poses.star", "results.json", "checkpoint*.pt", ".*.tmp*")
#: What only the end of a run writes (:func:`write_outputs`): what ``--resume`` deletes first.
RESULTS = ("results.json", "ground_truth.mrc", "reconstruction_scale*.mrc", "half[12]_scale*.mrc", "fsc.csv",
           "fsc.png", "slices.png", "poses.star")


def prepare_output_dir(out, *, resume: bool = False, overwrite: bool = False) -> Path:
    """``--out`` checked before any work (:func:`fieldkern._files.prepare_output_dir`): a folder
    holding another run is refused unless ``resume`` (:func:`fieldkern.cryoem.experiment.reconstruct`
    deletes its final results once the checkpoint has loaded) or ``overwrite`` (every file a run
    writes is deleted first)."""
    return _prepare_output_dir(out, OUTPUTS, resume=resume, overwrite=overwrite)


def write_map(path, volume: torch.Tensor, apix: float) -> Path:
    """:func:`fieldkern.cryoem.io.write_mrc` (a ``(D, D, D)`` map, ``apix`` A/voxel) made
    atomic by :func:`fieldkern._files.write_atomic`: a run killed while writing never leaves a
    truncated map (a resumed run does not rewrite the maps of stages that ended before its
    checkpoint). The file is rendered in a temporary folder next to ``path`` first (mrcfile
    writes only to named files). OSError names the path."""
    path = Path(path)
    check_finite("data", volume, where=f"{path}: ")  # here, so that the message names path, not the temporary file
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as tmp:
            data = write_mrc(Path(tmp) / path.name, volume, apix).read_bytes()
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {str(path)!r}: {exc.strerror or exc}") from exc
    return write_atomic(path, data)


class StageMapWriter(Callback):
    """Writes ``{prefix}stage{k}_scale{k}.mrc``, the map of scale ``k`` as its stage ends (in
    the reconstruction's own frame, before any alignment). ``rec``: the
    :class:`~fieldkern.cryoem.reconstruct.Reconstruction` being trained."""

    def __init__(self, rec, out: Path, apix: float, prefix: str = ""):
        self.rec, self.out, self.apix, self.prefix = rec, Path(out), apix, prefix

    def on_stage_end(self, stage: int, step: int) -> None:
        path = self.out / f"{self.prefix}stage{stage}_scale{stage}.mrc"
        with self.rec.dist.agree(f"writing {path}"):  # rank 0 writes; a failure stops every rank
            if self.rec.dist.is_main:
                with torch.no_grad():
                    volume = self.rec.volume().detach().float().cpu()
                write_map(path, volume, self.apix)


@dataclass
class RunOutcome:
    """What a trained run produced (:func:`fieldkern.cryoem.experiment.evaluate_reconstructions`),
    for :func:`write_outputs`.

    Attributes:
        evaluation: FSC resolutions, aligned maps, pose errors.
        volumes: the map of every scale, ``(D, D, D)`` each, in the reconstruction's frame
            (written unless ``evaluation`` holds aligned ones).
        rotations, shifts_A: every particle's pose ``(N, 3, 3)`` and RELION origin ``(N, 2)``
            in A (half 2's moved into half 1's frame).
        losses: the loss per epoch (a list), or one list per half set.
        marching: FSC marching's decisions, one dict per epoch (epoch, stage, band edge, FSC
            there, resolved shell, score, decision, support limit); empty without marching.
    """

    evaluation: Evaluation
    volumes: list
    rotations: torch.Tensor
    shifts_A: torch.Tensor
    losses: list
    marching: list[dict] = field(default_factory=list)


def write_outputs(out: Path, data: ExperimentData, outcome: RunOutcome, settings: dict, *, seconds: float,
                  train_seconds: float | None = None) -> dict:
    """Maps (``.mrc``), ``fsc.csv``/``fsc.png``, ``slices.png``, ``poses.star`` (the outcome's
    poses of every particle) and ``results.json`` in ``out``; returns the results dictionary.
    With half maps, ``half{1,2}_scale{k}.mrc`` are written too (half 2 aligned). ``settings``:
    :func:`cryoem_settings`; ``seconds``: the whole run's time and ``train_seconds`` the
    training's."""
    ev = outcome.evaluation
    ds = data.dataset
    apix, D = ds.apix, ds.box
    maps = ev.aligned_maps or outcome.volumes
    if data.ground_truth is not None:
        write_map(out / "ground_truth.mrc", data.ground_truth.float(), apix)
    for k, v in enumerate(maps):
        write_map(out / f"reconstruction_scale{k}.mrc", v.float(), apix)
    for h, half in enumerate(ev.half_maps, 1):
        for k, v in enumerate(half):
            write_map(out / f"half{h}_scale{k}.mrc", v.float(), apix)
    if ev.fsc:
        _write_fsc(out, ev, apix, D)
    figures.plot_slices(out / "slices.png", maps, data.ground_truth)
    _write_poses(out / "poses.star", ds, outcome.rotations, outcome.shifts_A)
    results = {
        "nyquist_angstrom": 2 * apix,
        "resolution_angstrom": [_json_float(r) for r in ev.resolution_angstrom],
        "fsc_against": ev.fsc_against if ev.fsc else None,
        "fsc_threshold": ev.fsc_threshold if ev.fsc else None,
        "pose_error_deg": ev.pose_error_deg,
        "n_particles": len(ds),
        "box": D,
        "apix": apix,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "alignment": ev.alignment,
        ("loss_per_epoch_halves" if ev.half_maps else "loss_per_epoch"): outcome.losses,
        "settings": settings,
    }
    if ev.half_map_resolution is not None:
        results["half_map_resolution_angstrom"] = [_json_float(r) for r in ev.half_map_resolution]
    if outcome.marching:
        results["marching"] = outcome.marching
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _json_float(x: float):
    return None if x is None or not math.isfinite(x) else x


def _write_fsc(out: Path, ev: Evaluation, apix: float, D: int) -> None:
    """``fsc.csv`` (one row per shell, one column per scale) and ``fsc.png``."""
    lines = ["shell,frequency_per_angstrom," + ",".join(f"fsc_scale{k}" for k in range(len(ev.fsc)))]
    for r in range(len(ev.fsc[0])):
        lines.append(f"{r},{r / (D * apix):.6f}," + ",".join(f"{c[r]:.6f}" for c in ev.fsc))
    write_atomic(out / "fsc.csv", "\n".join(lines) + "\n")
    figures.plot_fsc(out / "fsc.png", ev.fsc, ev.resolution_angstrom, apix, D,
                     threshold=ev.fsc_threshold, against=ev.fsc_against)


def _write_poses(path: Path, ds: ParticleDataset, rotations: torch.Tensor, shifts_A: torch.Tensor) -> None:
    """The particle set with the refined poses, its image paths relative to ``path``."""
    names = list(ds.particles["rlnImageName"])
    star_dir = ds.star_path.parent
    rel = []
    for name in names:
        idx, _, file = str(name).partition("@")
        stack = (star_dir / file).resolve()
        rel.append(f"{idx}@{os.path.relpath(stack, path.parent.resolve())}")
    p = ds.ctf_params
    box, apix = ds.stack_geometry or (ds.box, ds.apix)  # the stacks named, not a downsampled view
    write_particles_star(
        path, image_names=rel, euler_deg=matrix_to_relion_euler(rotations.cpu().to(torch.float64)),
        dfu=p.dfu, dfv=p.dfv, dfang=p.dfang, apix=apix, box=box, volt=float(p.volt[0]),
        cs=float(p.cs[0]), w=float(p.w[0]), phase_shift=p.phase_shift, bfactor=p.bfactor,
        shifts_A=shifts_A,
    )


def cryoem_settings(preset, args: dict) -> dict:
    """The ``settings`` of ``results.json``: the :class:`~fieldkern.cryoem.presets.CryoEMPreset`
    used, the software and machine, and ``args`` (the command line's choices)."""
    return {
        "preset": preset.name,
        "description": preset.description,
        "reconstruction": asdict(preset.recon),
        "snr": preset.snr,
        "perturb_deg": preset.perturb_deg,
        "coarse_deg": list(preset.coarse_deg),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        **args,
    }


def summary_lines(results: dict) -> list[str]:
    """Short human-readable summary of ``results.json``."""
    lines = [f"particles {results['n_particles']}, box {results['box']}, {results['apix']} A/pixel, "
             f"Nyquist {results['nyquist_angstrom']:.2f} A"]
    res = results["resolution_angstrom"]
    for k, r in enumerate(res):
        # A coarse scale's ReLU head clips its band-limited field at zero; the clipping edges,
        # the same in both halves, correlate far beyond the band (measured: FSC 0.3-0.5 up to
        # Nyquist between half maps of scale 1 where its FSC against the truth was ~0).
        coarse_half = results["fsc_against"] == "half maps" and k < len(res) - 1
        caveat = " (coarse scale: not a resolution estimate)" if coarse_half else ""
        lines.append(f"scale {k}: resolution at FSC {results['fsc_threshold']:g} vs {results['fsc_against']} = "
                     f"{'n/a' if r is None else f'{r:.2f} A'}{caveat}")
    pe = results["pose_error_deg"]
    if pe:
        # A real particle set's poses are estimates themselves: the angle is a change, not an error.
        what = "pose change from the file's poses" if results["settings"].get("particles") else "pose error"
        mirrored = (results.get("alignment") or {}).get("flipped")
        lines.append(f"{what} (deg): mean {pe['initial']['mean']:.2f} -> {pe['final']['mean']:.2f}, "
                     f"median {pe['initial']['median']:.2f} -> {pe['final']['median']:.2f}")
        aligned = pe.get("final_aligned")
        if mirrored:  # a mirrored map's poses are those of the mirror image
            lines[-1] += " (the map came out mirrored: these poses belong to its mirror image)"
        if aligned and (mirrored or results["settings"].get("pose_init") in ("uniform", "random")):
            lines.append(f"{what} in the truth's frame (after the map's alignment{', mirrored' if mirrored else ''}): "
                         f"mean {aligned['mean']:.2f}, median {aligned['median']:.2f}")
    half = results.get("half_map_resolution_angstrom")
    if half and half[-1] is not None:
        lines.append(f"half maps: resolution at FSC 0.143 = {half[-1]:.2f} A (finest scale)")
    if results.get("marching"):
        steps = results["marching"]
        switches = [s["epoch"] + 1 for s in steps if s["decision"] == "next"]
        limits = [s for s in steps if s["decision"] == "limit"]
        limited = f", band limited to shell {limits[0]['support_limit']:g}" if limits else ""
        lines.append(f"FSC marching: {len(steps)} epochs, next stage after epochs {switches or 'none'}, "
                     f"ended by {steps[-1]['decision']!r}{limited}")
    lines.append(f"time {results['seconds']:.0f} s")
    return lines


__all__ = [
    "OUTPUTS",
    "RESULTS",
    "RunOutcome",
    "StageMapWriter",
    "cryoem_settings",
    "prepare_output_dir",
    "summary_lines",
    "write_map",
    "write_outputs",
]
