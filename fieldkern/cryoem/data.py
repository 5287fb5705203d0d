"""The experiment's particle data: a simulated set, or a RELION particle set with an optional
reference map, checked before any training.

:func:`prepare_data` simulates particles from a structure or map (or reads a STAR file) and
loads them as an :class:`ExperimentData`. Maps must be usable as volumes (:func:`read_map`),
a map given as the structure brings its own box and pixel size (:func:`check_map_geometry`),
and real particles must have the contrast of fieldkern's CTF model (:func:`check_contrast`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fieldkern.checks import check_finite
from fieldkern.cryoem.fourier import fft2_centered, fourier_crop, frequency_indices, shift_phases
from fieldkern.cryoem.io import ParticleDataset, load_particles, read_mrc
from fieldkern.cryoem.simulate import simulate
from fieldkern.distributed import DistContext

#: File endings read as MRC maps (EMDB distributes ``.map``); anything else goes to gemmi.
MAP_SUFFIXES = (".mrc", ".map")


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


def prepare_data(structure: str, out_dir: Path, preset, seed: int, *, particles: str | None = None,
                 reference: str | None = None, progress: bool = True, device=None,
                 dist: DistContext | None = None, invert: bool = False,
                 downsample: int | None = None) -> ExperimentData:
    """Simulate a particle set (or read ``particles``) and load it.

    ``structure``: ``"4ake"``, ``"1ol5"``, a PDB/mmCIF path, or an ``.mrc``/``.map`` map to
    simulate from (its header's box and voxel size replace ``preset.box``/``preset.apix``;
    see :func:`check_map_geometry`); ``preset``: a
    :class:`~fieldkern.cryoem.presets.CryoEMPreset` (box, pixel size, count and SNR of the
    simulation). The simulation is written to ``out_dir / "data"``.
    ``particles``: a RELION STAR file to reconstruct instead; its poses are taken as the
    truth only for reporting pose changes, and ``reference`` (an MRC map) serves as the
    ground truth for FSC if given. Maps holding NaN/inf or without a voxel size in their
    header raise ValueError naming the file. ``invert`` multiplies the particle images by -1
    (RELION extracts white particles; fieldkern's CTF model makes them dark); particles
    whose contrast disagrees with the CTF model (:func:`contrast_score` below -5) raise a
    ValueError that says which way to go. ``downsample`` Fourier-crops the particles (and a
    reference map of the stack's box) to that many pixels (:meth:`ParticleDataset.downsample`).

    With a data-parallel ``dist``, rank 0 simulates (or reads) as above; the other ranks
    then open the same STAR file and receive rank 0's true poses, so every rank starts from
    the same numbers. Every rank's stack is memory-mapped (the trainer reads only each
    rank's block of images), as is a downsampled one. ``out_dir`` (or ``particles``) must
    be on a file system every node sees. Only rank 0 holds the ground-truth map.
    """
    # Memory-mapped under data parallelism (each rank, rank 0 included, reads only its block)
    # and when cropping (a stack is never held at its stored size).
    lazy = dist is not None and dist.distributed

    def load() -> ExperimentData:
        if particles is not None:
            return _read_particles(particles, reference, invert, downsample, lazy or downsample is not None)
        return _simulate(structure, out_dir / "data", preset, seed, progress=progress, device=device, lazy=lazy)

    if dist is None or not dist.distributed:
        return load()
    data = None
    with dist.agree("preparing the particle data"):
        if dist.is_main:
            data = load()
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


def _read_particles(particles, reference, invert: bool, downsample: int | None, lazy: bool = False) -> ExperimentData:
    """A RELION particle set, its contrast checked, with ``reference`` as the ground truth
    (``lazy``: the stacks memory-mapped, :func:`~fieldkern.cryoem.load_particles`)."""
    ds = load_particles(particles, invert=invert, require_poses=False, lazy=lazy)  # no poses: ab initio only
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


def _simulate(structure, data_dir: Path, preset, seed: int, *, progress: bool, device, lazy: bool = False) -> ExperimentData:
    """The preset's particle set simulated from ``structure`` into ``data_dir``, and loaded."""
    if is_map(structure):
        volume, apix = read_map(structure, "map")
        structure_arg, box, apix_arg = volume, None, apix
    else:
        structure_arg, box, apix_arg = structure, preset.box, preset.apix
    sim = simulate(
        structure_arg, data_dir, preset.n_particles, box, apix_arg, snr=preset.snr, seed=seed,
        progress=progress, overwrite=True, device=device,
    )
    ds = load_particles(sim.star_path, lazy=lazy)
    gt, _ = read_mrc(sim.volume_path)
    return ExperimentData(ds, gt, sim.rotations, str(structure), True,
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


__all__ = [
    "MAP_SUFFIXES",
    "ExperimentData",
    "check_contrast",
    "check_map_geometry",
    "contrast_score",
    "is_map",
    "prepare_data",
    "read_map",
]
