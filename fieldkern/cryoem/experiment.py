"""The paper's cryo-EM experiment end to end: data, reconstruction, evaluation, outputs.

:func:`prepare_data` simulates a particle set from a structure or map (or reads a RELION
STAR file), :func:`initial_poses` draws the starting pose estimates, :class:`Reconstruction`
trains, :func:`evaluate` aligns each scale's map to the ground truth and measures FSC
resolution and pose errors, and :func:`write_outputs` writes maps, curves, figures, the
refined poses and ``results.json``. ``examples/cryoem.py`` is the command line over these.

Without a ground-truth map (real particles and no ``--reference``) resolution is measured
the field's way: the particles are split in two halves (:func:`split_halves`), each is
reconstructed independently, and :func:`evaluate_half_maps` reports the FSC between the
two maps at 0.143 (the "gold-standard" FSC of RELION and cryoSPARC).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fieldkern._files import prepare_output_dir as _prepare_output_dir
from fieldkern._files import remove_outputs
from fieldkern._files import write_atomic
from fieldkern.cryoem._checks import check_finite
from fieldkern.cryoem.alignment import align_volume
from fieldkern.cryoem.fsc import fourier_shell_correlation, resolution
from fieldkern.cryoem.io import ParticleDataset, load_particles, read_mrc, write_mrc, write_particles_star
from fieldkern.cryoem.projection import transform_volume
from fieldkern.cryoem.reconstruct import Reconstruction, ReconstructionConfig, pose_errors_deg
from fieldkern.cryoem.rotations import jitter_rotations, matrix_to_relion_euler
from fieldkern.distributed import DistContext
from fieldkern.train import Callback

POSE_INITS = ("gt", "refine", "perturbed", "coarse")

#: FSC threshold against a ground-truth map (the paper's criterion).
GROUND_TRUTH_THRESHOLD = 0.5
#: FSC threshold between independently refined half maps (Rosenthal & Henderson 2003; RELION,
#: cryoSPARC): the resolution of the map averaged from both halves.
HALF_MAP_THRESHOLD = 0.143


@dataclass
class Preset:
    """Data-set size and training settings of one named run."""

    name: str
    box: int
    apix: float
    n_particles: int
    snr: float
    recon: ReconstructionConfig
    perturb_deg: float = 20.0  # "perturbed": random-axis rotation of up to this angle
    coarse_deg: tuple[float, float] = (45.0, 90.0)  # "coarse": the paper's [pi/4, pi/2]
    description: str = ""


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "quick", box=32, apix=3.0, n_particles=3000, snr=0.1,
        # Against the paper's steps per batch: batches of 1000 (3 per epoch) with 5 volume steps at
        # 5x the learning rate, 5 pose steps at 4x it, and a spherical support. Measured on the
        # quick data sets (README): better maps and poses than the paper's per-batch steps in
        # a fifth of the time.
        recon=ReconstructionConfig(
            hidden_features=128, epochs=24, stage_epochs=(3, 6), batch_size=1000, volume_steps=5,
            pose_steps=5, volume_lr=5e-3, pose_lr=4e-2, pose_lr_decay=0.8, pose_start_stage=2,
            support="sphere",
        ),
        description="box 32 at 3 A (1OL5: 40 at 2.4 A), 3000 particles: 1-2 minutes on a 2-core CPU",
    ),
    "paper": Preset(
        "paper", box=80, apix=1.25, n_particles=50_000, snr=0.1,
        recon=ReconstructionConfig(),  # the authors' settings (the paper's appendix B)
        description="the paper's data-set size and training schedule (GPU)",
    ),
    "tiny": Preset(
        "tiny", box=16, apix=6.0, n_particles=120, snr=0.1,
        recon=ReconstructionConfig(
            hidden_features=16, epochs=3, stage_epochs=(1, 2), batch_size=60, volume_steps=2,
            pose_steps=2, volume_lr=2e-3,
        ),
        description="smoke tests: seconds",
    ),
}

#: The authors' stage epochs per structure (the paper's appendix B).
PAPER_STAGE_EPOCHS = {"1ol5": (15, 30), "4ake": (25, 50)}

#: (box, apix) of the quick preset where the default box 32 at 3 A is not enough. 1OL5's
#: pose error could not drop 30% at box 32 even against the true map (10.01 -> 6.9 deg with
#: 100 pose steps per particle); 40 pixels of 2.4 A (same field of view, finer sampling)
#: gave 10.01 -> 5.94 deg and 7.70 A (Nyquist 4.8 A) with the quick schedule.
QUICK_GEOMETRY = {"1ol5": (40, 2.4)}


def get_preset(name: str, structure: str | None = None, **overrides) -> Preset:
    """A copy of preset ``name`` with ``overrides`` applied to its fields or its ``recon``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    recon_fields = set(ReconstructionConfig.__dataclass_fields__)
    recon_over = {k: v for k, v in overrides.items() if k in recon_fields and v is not None}
    top_over = {k: v for k, v in overrides.items() if k not in recon_fields and v is not None}
    if name == "paper" and structure in PAPER_STAGE_EPOCHS and "stage_epochs" not in recon_over:
        recon_over["stage_epochs"] = PAPER_STAGE_EPOCHS[structure]
    if name == "quick" and structure in QUICK_GEOMETRY and "box" not in top_over and "apix" not in top_over:
        top_over["box"], top_over["apix"] = QUICK_GEOMETRY[structure]
    recon = replace(preset.recon, **recon_over)
    return replace(preset, recon=recon, **top_over)


def scale_epochs(preset: Preset, epochs: int) -> Preset:
    """``preset`` trained for ``epochs`` epochs, its stage switches at the same fractions."""
    old = preset.recon.epochs
    switches, last = [], 0
    for e in preset.recon.stage_epochs:
        s = min(max(last + 1, round(e * epochs / old)), epochs - 1)
        switches.append(s)
        last = s
    if any(b <= a for a, b in zip(switches, switches[1:])) or (switches and switches[0] < 1):
        raise ValueError(f"{epochs} epochs are too few for {len(switches) + 1} stages")
    return replace(preset, recon=replace(preset.recon, epochs=epochs, stage_epochs=tuple(switches)))


@dataclass
class ExperimentData:
    """Particles with their CTFs, the true poses and map when known."""

    dataset: ParticleDataset
    ground_truth: torch.Tensor | None
    true_rotations: torch.Tensor | None
    source: str
    simulated: bool
    paths: dict[str, str] = field(default_factory=dict)
    #: Whether rank 0 holds a ground-truth map (``ground_truth`` is None on the other ranks).
    has_ground_truth: bool = False

    def __post_init__(self):
        self.has_ground_truth = self.has_ground_truth or self.ground_truth is not None


def prepare_data(structure: str, out_dir: Path, preset: Preset, seed: int, particles: str | None = None,
                 reference: str | None = None, progress: bool = True, device=None,
                 dist: DistContext | None = None, invert: bool = False,
                 downsample: int | None = None) -> ExperimentData:
    """Simulate a particle set (or read ``particles``) and load it.

    ``structure``: ``"4ake"``, ``"1ol5"``, a PDB/mmCIF path, or an ``.mrc``/``.map`` map to
    simulate from (its header's box and voxel size replace ``preset.box``/``preset.apix``;
    see :func:`check_map_geometry`).
    ``particles``: a RELION STAR file to reconstruct instead; its poses are taken as the
    truth only for reporting pose changes, and ``reference`` (an MRC map) serves as the
    ground truth for FSC if given. Maps holding NaN/inf or without a voxel size in their
    header raise ValueError naming the file. ``invert`` multiplies the particle images by -1
    (RELION extracts white particles; fieldkern's CTF model makes them dark); particles
    whose contrast disagrees with the CTF model (:func:`contrast_score` below -5) raise a
    ValueError that says which way to go. ``downsample`` Fourier-crops the particles (and a
    reference map of the stack's box) to that many pixels (:meth:`ParticleDataset.downsample`).

    With a data-parallel ``dist``, rank 0 simulates (or reads) as above; the other ranks
    then open the same STAR file lazily (memory-mapped: :class:`Reconstruction` reads only
    each rank's block of images) and receive rank 0's true poses, so every rank starts from
    the same numbers. ``out_dir`` (or ``particles``) must be on a file system every node
    sees. Only rank 0 holds the ground-truth map.
    """
    if dist is None or not dist.distributed:
        return _prepare_data(structure, out_dir, preset, seed, particles, reference, progress, device, invert,
                             downsample)
    data = None
    with dist.agree("preparing the particle data"):
        if dist.is_main:
            data = _prepare_data(structure, out_dir, preset, seed, particles, reference, progress, device, invert,
                                 downsample)
    meta = dist.broadcast_object(None if data is None else {
        "star": str(data.dataset.star_path), "true_rotations": data.true_rotations, "source": data.source,
        "simulated": data.simulated, "paths": data.paths, "has_ground_truth": data.has_ground_truth,
    })
    with dist.agree("reading the particle data"):
        if not dist.is_main:
            ds = load_particles(meta["star"], lazy=True, invert=invert and particles is not None)
            if downsample is not None and particles is not None:
                ds = ds.downsample(downsample)
            data = ExperimentData(ds, None, meta["true_rotations"], meta["source"], meta["simulated"], meta["paths"],
                                  meta["has_ground_truth"])
    return data


def _prepare_data(structure, out_dir, preset, seed, particles, reference, progress, device,
                  invert=False, downsample=None) -> ExperimentData:
    from fieldkern.cryoem.fourier import fourier_crop
    from fieldkern.cryoem.simulate import simulate

    if particles is not None:
        ds = load_particles(particles, invert=invert)
        stack_box = ds.box
        if downsample is not None:
            ds = ds.downsample(downsample)
        check_contrast(ds, invert)
        gt = None
        if reference is not None:
            gt, ref_apix = read_map(reference, "reference map")
            if ds.stack_geometry is not None and tuple(gt.shape) == (stack_box,) * 3:
                # a map of the particles' own box follows them down
                gt, ref_apix = fourier_crop(gt, ds.box, 3), ref_apix * stack_box / ds.box
            if tuple(gt.shape) != (ds.box,) * 3:
                raise ValueError(f"reference map {reference} has shape {tuple(gt.shape)}, the particles box {ds.box}")
            if abs(ref_apix - ds.apix) > 1e-3 * ds.apix:
                raise ValueError(f"reference map {reference} has {ref_apix} A/pixel, the particles {ds.apix}")
        return ExperimentData(ds, gt, ds.rotations, str(particles), False, {"particles": str(particles)})
    data_dir = out_dir / "data"
    source = structure
    if is_map(structure):
        volume, apix = read_map(structure, "map")
        structure_arg, box, apix_arg = volume, None, apix
    else:
        structure_arg, box, apix_arg = structure, preset.box, preset.apix
    sim = simulate(
        structure_arg, data_dir, preset.n_particles, box, apix_arg, snr=preset.snr, seed=seed,
        progress=progress, overwrite=True, device=device,
    )
    ds = load_particles(sim.star_path)
    gt, _ = read_mrc(sim.volume_path)
    return ExperimentData(ds, gt, sim.rotations, str(source), True,
                          {"particles": str(sim.star_path), "ground_truth_input": str(sim.volume_path)})


def contrast_score(ds: ParticleDataset, max_images: int = 2000) -> float:
    """How well the particles' contrast agrees with the CTF model, as a z-score.

    At the lowest frequencies (``0 < |k| <= 2`` Fourier pixels) a centred particle's
    projection is about its total, positive mass, so ``F[I] ~ CTF * mass`` there: the sum of
    ``Re(F[I]) * CTF`` over those frequencies and up to ``max_images`` particles (centred by
    their origins first), divided by its standard error, is large and positive for particles
    in fieldkern's convention and large and negative for contrast-inverted ones (measured:
    +123 on the first 2000 of the quick preset's simulated particles at SNR 0.1, where 99.97%
    of single images score positive). Near zero: no usable signal at those frequencies.
    """
    from fieldkern.cryoem.fourier import fft2_centered, frequency_indices
    from fieldkern.cryoem.reconstruct import shift_phases

    n = min(len(ds), max_images)
    D = ds.box
    spectra = fft2_centered(torch.as_tensor(ds.images[:n]).to(torch.float64))
    spectra = spectra * shift_phases(ds.shifts_A[:n] / ds.apix, D).to(torch.complex128)
    k = frequency_indices(D, dtype=torch.float64)
    r = (k[:, None] ** 2 + k[None, :] ** 2).sqrt()
    low = (r > 0) & (r <= 2)
    terms = (spectra.real * ds.ctf(slice(0, n), dtype=torch.float64))[:, low]
    norm = float(terms.square().sum().sqrt())
    return float(terms.sum()) / norm if norm > 0 else 0.0


def check_contrast(ds: ParticleDataset, inverted: bool) -> None:
    """ValueError when :func:`contrast_score` says the particles are of the opposite contrast
    to the CTF model: the reconstruction (ReLU heads: a non-negative density) would fail."""
    z = contrast_score(ds)
    if z < -5:
        hint = ("they were inverted (--invert / invert=True): leave that out" if inverted
                else "RELION extracts white particles: pass --invert (load_particles(..., invert=True))")
        raise ValueError(f"{ds.star_path}: the particles' contrast is opposite to the CTF model's (score {z:.1f}); "
                         f"{hint}")


#: File endings read as MRC maps (EMDB distributes ``.map``); anything else goes to gemmi.
MAP_SUFFIXES = (".mrc", ".map")


def is_map(structure) -> bool:
    """Whether ``structure`` names an MRC map (by its ending, any case) rather than a model."""
    return str(structure).lower().endswith(MAP_SUFFIXES)


def read_map(path, what: str = "map") -> tuple[torch.Tensor, float]:
    """:func:`read_mrc` for a map that must be usable as a volume: a voxel size in the header,
    finite values that are not all the same (a constant map has no structure to compare with
    or simulate from), and not empty. ``what`` names the map's role in the messages."""
    volume, apix = read_mrc(path)
    if not apix > 0:
        raise ValueError(
            f"{what} {path}: the header has no voxel size ({apix:g} A); set it in the file "
            f"(e.g. mrcfile: mrc.voxel_size = 1.25)"
        )
    if volume.numel() == 0:
        raise ValueError(f"{what} {path} is empty (shape {tuple(volume.shape)})")
    check_finite(f"{what} {path}", volume)
    if bool((volume == volume.reshape(-1)[0]).all()):
        raise ValueError(f"{what} {path} holds one value everywhere ({float(volume.reshape(-1)[0]):g}): "
                         "it has no structure")
    return volume, apix


def check_map_geometry(path, box: int | None = None, apix: float | None = None) -> None:
    """Refuse a ``box``/``apix`` that differs from the header of the map ``path``: a map
    brings its own box and voxel size, and silently replacing what the user asked for
    (``--box``/``--apix``) would reconstruct something else. Reads only the header; a file
    that cannot be read is left for :func:`prepare_data` to report."""
    import mrcfile

    if box is None and apix is None:
        return
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
            h_box, h_apix = int(mrc.header.nx), float(mrc.voxel_size.x)
    except (OSError, ValueError):
        return
    if not h_apix > 0:
        raise ValueError(f"map {path}: the header has no voxel size ({h_apix:g} A)"
                         f"{', and --apix cannot replace it' if apix is not None else ''}; "
                         f"set it in the file (e.g. mrcfile: mrc.voxel_size = 1.25)")
    if (box is not None and box != h_box) or (apix is not None and abs(apix - h_apix) > 1e-4 * h_apix):
        given = ", ".join(f"{k} {v:g}" for k, v in (("--box", box), ("--apix", apix)) if v is not None)
        raise ValueError(
            f"{given}: with a map as --structure the box and pixel size come from the map's "
            f"header ({path}: box {h_box}, {h_apix:g} A/pixel); leave them out or give those values"
        )


def memory_needs(config: ReconstructionConfig, box: int, n_particles: int, simulate: bool = False,
                 world_size: int = 1) -> dict[str, int]:
    """Bytes the largest allocations of a run take, by what they are for (a lower bound: the
    terms that grow with the settings, not every temporary). ``n_particles`` over
    ``world_size`` ranks; ``simulate``: the data set is simulated first."""
    D, N = int(box), int(n_particles)
    points = D**3 * (0.53 if config.support == "sphere" else 1.0)
    Q = 2 * D + 4  # the oversampled spectrum's tap table, per axis
    plane = D * D // 2 + D
    needs = {
        # what autograd keeps per layer and point, and the output (the Triton stack keeps
        # (L - 1) x points x hidden floats: the least of any path)
        "the field's activations on the voxel grid": int(points * (config.hidden_features * config.n_scales + 1) * 4),
        "the volume's oversampled spectrum and its gradient": int(Q**3 * 8 * 4 * 3),
        "the particle images and spectra": int(-(-N // world_size) * D * D * 12),
        "a batch's slice taps": int(min(config.batch_size, N) * plane * 8 * 20),
    }
    if simulate:
        needs["the simulated density map"] = int(D**3 * 4 * 4)
    if config.pose_search:
        G = int(config.pose_search)
        needs[f"the pose search's {G} grid slices"] = int(G * (D * D * 16 + 1024 * 12 + 72))
    return needs


def check_memory(needs: dict[str, int], device, what: str) -> None:
    """ValueError before any work when the run cannot fit: the sum of ``needs``
    (:func:`memory_needs`) beyond the free memory of ``device`` (host: MemAvailable; CUDA:
    free device memory). ``what`` names the settings in the message. Unknown free memory
    (not Linux) checks nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return
    total = sum(needs.values())
    if total > free:
        largest = max(needs, key=needs.get)
        raise ValueError(f"{what}: the run needs at least {total / 2**30:.1f} GiB ({largest}: "
                         f"{needs[largest] / 2**30:.1f} GiB), and {free / 2**30:.1f} GiB are free on {device}")


def initial_poses(true_rotations: torch.Tensor, mode: str, preset: Preset, seed: int) -> torch.Tensor:
    """Starting pose estimates: the truth (``gt``, kept fixed in training; ``refine``, refined:
    a real particle set's poses), the truth rotated about a random axis by up to
    ``preset.perturb_deg`` (``perturbed``), or by ``preset.coarse_deg`` (``coarse``)."""
    if mode not in POSE_INITS:
        raise ValueError(f"pose init must be one of {POSE_INITS}, got {mode!r}")
    if mode in ("gt", "refine"):
        return true_rotations.clone()
    gen = torch.Generator().manual_seed(seed + 17)
    lo, hi = (0.0, preset.perturb_deg) if mode == "perturbed" else preset.coarse_deg
    return jitter_rotations(true_rotations.to(torch.float64), lo, hi, generator=gen)


class StageMapWriter(Callback):
    """Writes ``{prefix}stage{k}_scale{k}.mrc``, the map of scale ``k`` as its stage ends (in
    the reconstruction's own frame, before any alignment)."""

    def __init__(self, rec: Reconstruction, out: Path, apix: float, prefix: str = ""):
        self.rec, self.out, self.apix, self.prefix = rec, Path(out), apix, prefix

    def on_stage_end(self, stage: int, step: int) -> None:
        path = self.out / f"{self.prefix}stage{stage}_scale{stage}.mrc"
        with self.rec.dist.agree(f"writing {path}"):  # rank 0 writes; a failure stops every rank
            if self.rec.dist.is_main:
                with torch.no_grad():
                    volume = self.rec.volume().detach().float().cpu()
                write_mrc_atomic(path, volume, self.apix)


def write_mrc_atomic(path: Path, volume: torch.Tensor, apix: float) -> Path:
    """:func:`write_mrc` to a temporary file next to ``path``, then renamed over it: a run
    killed while writing never leaves a truncated map (a resumed run does not rewrite the
    maps of stages that ended before its checkpoint). OSError names the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write_mrc(tmp, volume, apix)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"could not write {str(path)!r}: {exc.strerror or exc}") from exc
    return path


@dataclass
class Evaluation:
    """FSC resolution per scale (``fsc_threshold`` against ``fsc_against``: ``"ground truth"``
    or ``"half maps"``), the rigid alignment applied, pose errors, and the maps to write
    (aligned to the ground truth, or averaged from the aligned half maps)."""

    resolution_angstrom: list[float]
    fsc: list[list[float]]
    alignment: dict
    pose_error_deg: dict | None
    aligned_maps: list[torch.Tensor] = field(repr=False, default_factory=list)
    fsc_against: str = "ground truth"
    fsc_threshold: float = GROUND_TRUTH_THRESHOLD
    half_maps: list[list[torch.Tensor]] = field(repr=False, default_factory=list)
    #: The alignment's transform (``transform_volume``'s matrix and shift), None without one.
    transform: tuple[torch.Tensor, torch.Tensor] | None = field(repr=False, default=None)


def pose_error_summary(initial: torch.Tensor, final: torch.Tensor, truth: torch.Tensor | None) -> dict | None:
    """Mean and median angle (degrees) of the initial and final poses from ``truth``."""
    if truth is None:
        return None
    before, after = pose_errors_deg(initial, truth), pose_errors_deg(final, truth)
    return {
        "initial": {"mean": float(before.mean()), "median": float(before.median())},
        "final": {"mean": float(after.mean()), "median": float(after.median())},
    }


def _alignment_dict(al) -> dict:
    eye = torch.eye(3, dtype=torch.float64)[None]
    return {
        "rotation_deg": float(pose_errors_deg(al.rotation[None], eye)[0]),
        "flipped": bool(al.flipped),
        "shift_voxels": [float(s) for s in al.shift],
        "score": float(al.score),
    }


def _aligned_fsc(maps: list[torch.Tensor], references: list[torch.Tensor], apix: float, threshold: float,
                 **align):
    """Align the finest of ``maps`` to the finest reference (``align_volume(**align)``), move
    every scale by that one transform (the scales share a frame) and measure each against its
    reference: ``(alignment result, moved maps, FSC curves, resolutions at threshold)``."""
    al = align_volume(maps[-1].to(torch.float64), references[-1], **align)
    moved, curves, res = [], [], []
    for v, ref in zip(maps, references):
        va = transform_volume(v.to(torch.float64), al.matrix, al.shift)
        _, f = fourier_shell_correlation(va, ref)
        moved.append(va)
        curves.append([float(x) for x in f])
        res.append(resolution(f, apix, threshold))
    return al, moved, curves, res


def evaluate(volumes: list[torch.Tensor], ground_truth: torch.Tensor | None, apix: float,
             initial: torch.Tensor, final: torch.Tensor, truth: torch.Tensor | None,
             flip: bool = False) -> Evaluation:
    """FSC resolution (0.5 criterion) of every scale against the ground truth, after one
    rigid alignment of the finest map (applied to all scales: they share a frame), and pose
    errors before/after refinement. ``flip``: the alignment may mirror the map, for
    reconstructions whose hand the data did not fix (a global pose search: projections
    determine a map only up to its mirror image)."""
    poses = pose_error_summary(initial, final, truth)
    if ground_truth is None:
        return Evaluation([], [], {}, poses, [v.clone() for v in volumes])
    gt = ground_truth.to(torch.float64)
    al, aligned, curves, res = _aligned_fsc(volumes, [gt] * len(volumes), apix, GROUND_TRUTH_THRESHOLD, flip=flip)
    # alignment: how far the reconstruction's frame drifted from the ground truth's.
    return Evaluation(res, curves, _alignment_dict(al), poses, aligned, transform=(al.matrix, al.shift))


def split_halves(ds: ParticleDataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Particle indices of the two half sets for a gold-standard FSC, each sorted.

    RELION's ``rlnRandomSubset`` column (1 or 2) when the STAR file has one, so the halves
    are those of the refinement that made the poses; otherwise a random split (seeded by
    ``seed``) into halves of ``ceil(N/2)`` and ``floor(N/2)`` particles.
    Raises ValueError for fewer than two particles or a subset column with other values or
    an empty half.
    """
    n = len(ds)
    if n < 2:
        raise ValueError(f"{ds.star_path}: half maps need at least 2 particles, got {n}")
    parts = ds.particles
    if parts is not None and "rlnRandomSubset" in parts.columns:
        subset = torch.as_tensor(parts["rlnRandomSubset"].to_numpy(dtype="float64"))
        halves = tuple(torch.nonzero(subset == h).flatten() for h in (1, 2))
        if len(halves[0]) + len(halves[1]) != n or not (len(halves[0]) and len(halves[1])):
            values = sorted({float(v) for v in subset.tolist()})[:5]
            raise ValueError(f"{ds.star_path}: rlnRandomSubset must be 1 or 2 with both halves non-empty, "
                             f"got values {values}")
        return halves
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 31))
    first = order[: (n + 1) // 2].sort().values
    second = order[(n + 1) // 2:].sort().values
    return first, second


def evaluate_half_maps(half1: list[torch.Tensor], half2: list[torch.Tensor], apix: float) -> Evaluation:
    """Gold-standard FSC of two independent reconstructions (lists of per-scale maps).

    Half 2's finest map is rigidly aligned to half 1's by a local refinement from the identity
    (the halves start from the same poses' frame but refine them independently, so the frames
    may drift apart by a degree or two; a global search could lock onto noise) and the same transform
    is applied to each of its scales; per scale, the FSC between the halves and the
    resolution at :data:`HALF_MAP_THRESHOLD`. The maps to write are the averages of half 1
    and aligned half 2. ``pose_error_deg`` is left None (see :func:`pose_error_summary`).
    """
    if len(half1) != len(half2):
        raise ValueError(f"half maps must have the same number of scales, got {len(half1)} and {len(half2)}")
    a = [v.to(torch.float64) for v in half1]
    al, b, curves, res = _aligned_fsc(half2, a, apix, HALF_MAP_THRESHOLD, local=True)
    alignment = {**_alignment_dict(al), "matrix": al.matrix.tolist()}
    return Evaluation(res, curves, alignment, None, [(v1 + v2) / 2 for v1, v2 in zip(a, b)],
                      fsc_against="half maps", fsc_threshold=HALF_MAP_THRESHOLD, half_maps=[a, b],
                      transform=(al.matrix, al.shift))


def poses_in_aligned_frame(rotations: torch.Tensor, shifts_A: torch.Tensor, matrix: torch.Tensor,
                           shift: torch.Tensor, apix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses ``(N, 3, 3)`` and RELION origins ``(N, 2)`` (A) that explain the same images with
    the map moved by ``transform_volume(V, matrix, shift)`` (``shift`` in voxels, x y z).

    ``project_volume(transform_volume(V, M, t), R M^T)`` is ``project_volume(V, R)`` moved by
    ``(R M^T t)_xy``, so the pose becomes ``R M^T`` and the origin (which centres the image
    when added) grows by that in-plane shift.
    """
    M = matrix.to(torch.float64)
    R = rotations.to(torch.float64) @ M.T
    moved = (R @ shift.to(torch.float64))[:, :2]
    return R, shifts_A.to(torch.float64) + moved * apix


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
                resume: bool = False, progress: bool = True, device=None,
                dist: DistContext | None = None) -> list[tuple[torch.Tensor | None, Reconstruction]]:
    """Train on ``data`` from the poses ``initial``; returns ``(particle indices, trained
    reconstruction)`` pairs: ``[(None, rec)]`` for all particles, or one pair per half set.

    With a ground truth: one reconstruction of every particle (``out/checkpoint.pt``, maps
    ``stage{k}_scale{k}.mrc``). Without one: two, one per half set of :func:`split_halves`,
    trained one after the other (``checkpoint_half{1,2}.pt``, ``half{h}_stage{k}_scale{k}.mrc``)
    from different seeds (``config.seed`` and ``config.seed + 1``).
    RELION origins (``data.dataset.shifts_A``) centre the images. ``resume`` continues from
    the checkpoints (half 2 starts afresh if the run stopped before it began); FileNotFoundError
    if the first is missing. Call on every rank.
    """
    ds = data.dataset
    halves = [None] if data.has_ground_truth else list(split_halves(ds, config.seed))
    recs = []
    for h, index in enumerate(halves, 1):
        if index is None:
            images, ctfs, poses, shifts, tag = ds.images, (lambda idx: ds.ctf(idx.cpu())), initial, ds.shifts_A, ""
        else:
            images, poses, shifts, tag = ImageRows(ds.images, index), initial[index], ds.shifts_A[index], f"half{h}_"
            ctfs = functools.partial(_half_ctfs, ds, index)
        # Half sets must be independent down to the field's random initial content, which the
        # data never fully overwrite at high frequencies: a shared seed inflates their FSC.
        cfg = config if index is None else replace(config, seed=config.seed + h - 1)
        rec = Reconstruction(images, ctfs, poses, cfg, device=device, dist=dist, shifts=shifts / ds.apix)
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
        rec.fit(checkpoint, progress=progress, callbacks=[StageMapWriter(rec, out, ds.apix, tag)])
        recs.append((index, rec))
    return recs


def _half_ctfs(ds: ParticleDataset, index: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return ds.ctf(index[idx.cpu()])


def evaluate_reconstructions(recs: list[tuple[torch.Tensor | None, Reconstruction]], data: ExperimentData,
                             initial: torch.Tensor):
    """Evaluate what :func:`reconstruct` returned: ``(evaluation, maps, rotations, origins_A,
    losses)`` with every particle's pose and RELION origin (half 2's moved into half 1's frame,
    which the averaged half maps are in) and the losses per epoch (one list per half set)."""
    ds = data.dataset
    if len(recs) == 1:
        rec = recs[0][1]
        rotations, volumes = rec.rotations.cpu(), rec.volumes()
        ev = evaluate(volumes, data.ground_truth, ds.apix, initial, rotations, data.true_rotations,
                      flip=rec.config.pose_search > 0)
        return ev, volumes, rotations, ds.shifts_A, rec.state.losses
    (first, rec1), (second, rec2) = recs
    ev = evaluate_half_maps(rec1.volumes(), rec2.volumes(), ds.apix)
    rotations = initial.clone().to(torch.float64)
    shifts = ds.shifts_A.clone().to(torch.float64)
    rotations[first] = rec1.rotations.cpu()
    rotations[second], shifts[second] = poses_in_aligned_frame(rec2.rotations.cpu(), shifts[second],
                                                               *ev.transform, ds.apix)
    ev.pose_error_deg = pose_error_summary(initial, rotations, data.true_rotations)
    return ev, ev.aligned_maps, rotations, shifts, [rec1.state.losses, rec2.state.losses]


def _json_float(x: float):
    return None if x is None or not math.isfinite(x) else x


#: Everything a run writes to ``--out`` (globs): what ``--overwrite`` deletes first.
OUTPUTS = ("data", "ground_truth.mrc", "reconstruction_scale*.mrc", "half*_scale*.mrc", "stage*_scale*.mrc",
           "fsc.csv", "fsc.png", "slices.png", "poses.star", "results.json", "checkpoint*.pt", ".*.tmp*")
#: What only the end of a run writes (:func:`write_outputs`): what ``--resume`` deletes first.
RESULTS = ("results.json", "ground_truth.mrc", "reconstruction_scale*.mrc", "half[12]_scale*.mrc", "fsc.csv",
           "fsc.png", "slices.png", "poses.star")


def prepare_output_dir(out, *, resume: bool = False, overwrite: bool = False) -> Path:
    """``--out`` checked before any work (:func:`fieldkern._files.prepare_output_dir`): a folder
    holding another run is refused unless ``resume`` (:func:`reconstruct` deletes its final
    results once the checkpoint has loaded) or ``overwrite`` (every file a run writes is
    deleted first)."""
    return _prepare_output_dir(out, OUTPUTS, resume=resume, overwrite=overwrite)


def write_outputs(out: Path, data: ExperimentData, rotations: torch.Tensor, shifts_A: torch.Tensor, losses,
                  volumes, ev: Evaluation, preset: Preset, settings: dict, seconds: float,
                  train_seconds: float | None = None) -> dict:
    """Maps (``.mrc``), ``fsc.csv``/``fsc.png``, ``slices.png``, ``poses.star`` (``rotations``
    and RELION origins ``shifts_A`` of every particle) and ``results.json`` in ``out``;
    returns the results dictionary. ``losses``: the loss per epoch (a list), or one list per
    half set; with half maps, ``half{1,2}_scale{k}.mrc`` are written too (half 2 aligned)."""
    from fieldkern.cryoem import figures

    ds = data.dataset
    apix, D = ds.apix, ds.box
    maps = ev.aligned_maps or volumes
    paths = {}
    if data.ground_truth is not None:
        paths["ground_truth"] = write_mrc_atomic(out / "ground_truth.mrc", data.ground_truth.float(), apix)
    for k, v in enumerate(maps):
        paths[f"scale{k}"] = write_mrc_atomic(out / f"reconstruction_scale{k}.mrc", v.float(), apix)
    for h, half in enumerate(ev.half_maps, 1):
        for k, v in enumerate(half):
            paths[f"half{h}_scale{k}"] = write_mrc_atomic(out / f"half{h}_scale{k}.mrc", v.float(), apix)
    if ev.fsc:
        lines = ["shell,frequency_per_angstrom," + ",".join(f"fsc_scale{k}" for k in range(len(ev.fsc)))]
        for r in range(len(ev.fsc[0])):
            lines.append(f"{r},{r / (D * apix):.6f}," + ",".join(f"{c[r]:.6f}" for c in ev.fsc))
        (out / "fsc.csv").write_text("\n".join(lines) + "\n")
        figures.plot_fsc(out / "fsc.png", ev.fsc, ev.resolution_angstrom, apix, D,
                         threshold=ev.fsc_threshold, against=ev.fsc_against)
    figures.plot_slices(out / "slices.png", maps, data.ground_truth)
    _write_poses(out / "poses.star", ds, rotations, shifts_A)
    nyquist = 2 * apix
    results = {
        "nyquist_angstrom": nyquist,
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
        ("loss_per_epoch_halves" if ev.half_maps else "loss_per_epoch"): losses,
        "settings": settings,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _write_poses(path: Path, ds: ParticleDataset, rotations: torch.Tensor, shifts_A: torch.Tensor) -> None:
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


def settings_dict(preset: Preset, args: dict) -> dict:
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
        if mirrored:  # a mirrored map's poses are those of the mirror image
            lines[-1] += " (the map came out mirrored: these poses belong to its mirror image)"
    lines.append(f"time {results['seconds']:.0f} s")
    return lines
