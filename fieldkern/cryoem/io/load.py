""":func:`load_particles`: a RELION particle STAR file and its MRC stacks to a checked
:class:`~fieldkern.cryoem.io.particles.ParticleDataset`.

Euler angles map to fieldkern rotation matrices with
:func:`fieldkern.cryoem.relion_euler_to_matrix` (no transpose, see that function). Every
value is checked here, naming the file and column, so that a bad file fails on loading
rather than at the first ``ds.ctf()`` of a training run.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from fieldkern.checks import check_finite, check_positive
from fieldkern.cryoem._checks import check_amplitude_contrast, check_defocus_angstrom, check_voltage_kv
from fieldkern.cryoem.io.mrc import stack_shape
from fieldkern.cryoem.io.particles import CTFParams, ImageStack, ParticleDataset
from fieldkern.cryoem.io.paths import resolve_stack
from fieldkern.cryoem.io.star import (
    CTF_PARTICLE_COLUMNS,
    POSE_COLUMNS,
    ParticleTable,
    parse_image_name,
    read_particle_table,
)
from fieldkern.cryoem.rotations import relion_euler_to_matrix


def load_particles(
    star_path: str | PathLike,
    *,
    lazy: bool = False,
    invert: bool = False,
    data_dir: str | PathLike | None = None,
    apix: float | None = None,
    require_poses: bool = True,
) -> ParticleDataset:
    """Read a RELION particle STAR file and its MRC stack(s).

    Args:
        star_path: RELION 3.1 (optics + particles) or 3.0 (single table) STAR file.
        lazy: memory-map the stacks (``images`` is an :class:`ImageStack`) instead of
            reading everything into one tensor.
        invert: multiply images by -1. fieldkern's CTF is ``-w`` at the origin (cryoDRGN's
            sign, which makes simulated particles dark); RELION-extracted particles are
            usually white, so real RELION data need ``invert=True`` to match
            ``ctf * project(V, R)`` with a positive ``V``.
        data_dir: folder that image paths are relative to (default: the STAR file's
            folder, then the current directory).
        apix: override the pixel size (A) from the STAR file.
        require_poses: raise if the Euler angles are missing (else ``rotations=None``).

    Raises ValueError (naming the problem) for missing columns, unknown optics groups,
    optics groups with different pixel or image sizes, image numbers beyond a stack's
    length, stacks whose image size differs from the STAR's ``rlnImageSize`` or from each
    other, non-square or odd-sized images, NaN/inf pixels, stacks mrcfile cannot read
    (truncated, corrupt), non-numeric or NaN/inf values (naming the column), voltages
    outside (0, 1000] kV, amplitude contrast outside [0, 1] and defocus values that look
    like micrometres (0 < |defocus| < 100 A).
    """
    # The steps run in this order, which fixes the error reported for a file with several faults.
    table = read_particle_table(Path(star_path), require_poses=require_poses)
    ctf_values = read_optics_values(table)
    apix = check_positive("apix", table.pixel_size() if apix is None else apix)
    star_box = table.per_particle("rlnImageSize", required=False)
    stacks = locate_stacks(table, data_dir)
    box = check_stacks(stacks, star_box, table.star)
    euler, rotations = read_poses(table)
    shifts = read_shifts(table, apix)
    ctf_values.update(read_defocus(table))
    check_particle_values(table.star, ctf_values, euler, shifts)
    return ParticleDataset(
        images=read_images(stacks, box, invert=invert, lazy=lazy),
        rotations=rotations,
        euler_deg=euler,
        shifts_A=_float64(shifts),
        ctf_params=CTFParams(**{k: _float64(v) for k, v in ctf_values.items()}),
        apix=apix,
        box=box,
        star_path=table.star,
        stack_paths=stacks.files,
        optics=table.optics,
        particles=table.particles,
    )


def _float64(a) -> torch.Tensor:
    """A writable float64 tensor copy of ``a``."""
    return torch.from_numpy(np.array(a, dtype=np.float64))


def read_optics_values(table: ParticleTable) -> dict[str, np.ndarray]:
    """The optics-level CTF values of every particle, float64 ``(N,)``: ``volt`` (kV),
    ``cs`` (mm), ``w``, and ``phase_shift`` (degrees) and ``bfactor`` (A^2), 0 where absent."""
    return {
        "volt": table.per_particle("rlnVoltage"),
        "cs": table.per_particle("rlnSphericalAberration"),
        "w": table.per_particle("rlnAmplitudeContrast"),
        "phase_shift": table.per_particle("rlnPhaseShift", default=0.0),
        "bfactor": table.per_particle("rlnCtfBfactor", default=0.0),
    }


def read_defocus(table: ParticleTable) -> dict[str, np.ndarray]:
    """``dfu``, ``dfv`` (A) and ``dfang`` (degrees) of every particle, float64 ``(N,)``."""
    return dict(zip(("dfu", "dfv", "dfang"), (table.column(c) for c in CTF_PARTICLE_COLUMNS)))


@dataclass
class StackIndex:
    """Where each particle's image is: image ``slice_index[i]`` (0-based) of
    ``files[file_index[i]]``; ``files`` in order of first mention in the STAR file."""

    files: list[Path]
    file_index: np.ndarray
    slice_index: np.ndarray


def locate_stacks(table: ParticleTable, data_dir: str | PathLike | None) -> StackIndex:
    """Parse every ``rlnImageName`` and find its stack (:func:`~fieldkern.cryoem.io.paths.resolve_stack`:
    relative to ``data_dir``, else to the STAR file's folder, then the current directory)."""
    parsed = [parse_image_name(s) for s in table.particles["rlnImageName"].tolist()]
    star_dir = table.star.resolve().parent
    ddir = Path(data_dir) if data_dir is not None else None
    files: dict[str, Path] = {}
    for _, f in parsed:
        if f not in files:
            files[f] = resolve_stack(f, star_dir, ddir)
    order = list(files)
    return StackIndex(
        files=[files[f] for f in order],
        file_index=np.array([order.index(f) for _, f in parsed], dtype=np.int64),
        slice_index=np.array([i - 1 for i, _ in parsed], dtype=np.int64),
    )


def check_stacks(stacks: StackIndex, star_box: np.ndarray | None, star: Path) -> int:
    """The image size D shared by all stacks, read from their headers.

    Raises ValueError for a stack mrcfile cannot map, one that holds no 2D images,
    non-square images, stacks of different image sizes, an image number beyond a stack's
    length, an odd D, and a D other than the STAR's ``rlnImageSize`` (``star_box``).
    """
    D = None
    for k, path in enumerate(stacks.files):
        shape = stack_shape(path)
        if len(shape) != 3:
            raise ValueError(f"stack {path} must hold 2D images, got data of shape {shape}")
        if shape[1] != shape[2]:
            raise ValueError(f"stack {path} holds non-square images {shape[1]}x{shape[2]}")
        if D is None:
            D = shape[1]
        elif shape[1] != D:
            raise ValueError(f"stack {path} holds {shape[1]}-pixel images, but other stacks hold {D}-pixel images")
        used = stacks.slice_index[stacks.file_index == k]
        if used.max() >= shape[0]:
            raise ValueError(
                f"stack {path} has {shape[0]} images but the STAR file references image {used.max() + 1}"
            )
    if D % 2:
        raise ValueError(f"images must have an even size, got D = {D}")
    if star_box is not None and not np.all(star_box == D):
        raise ValueError(
            f"{star}: rlnImageSize {sorted(set(star_box.astype(int).tolist()))} does not match "
            f"the stack image size {D}"
        )
    return int(D)


def read_poses(table: ParticleTable) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(euler_deg (N, 3) float64, rotations (N, 3, 3) float64)``, or ``(None, None)``
    where the file lacks any of the Euler-angle columns."""
    if not all(table.has(c) for c in POSE_COLUMNS):
        return None, None
    euler = torch.from_numpy(np.stack([table.column(c) for c in POSE_COLUMNS], 1))
    return euler, relion_euler_to_matrix(euler)


def read_shifts(table: ParticleTable, apix: float) -> np.ndarray:
    """``(N, 2)`` origins in A: ``rlnOriginX/YAngst`` (RELION 3.1), else ``rlnOriginX/Y``
    in pixels times ``apix`` (RELION 3.0), else zeros; a missing one of a pair is 0."""
    if table.has("rlnOriginXAngst") or table.has("rlnOriginYAngst"):
        return np.stack([table.per_particle("rlnOriginXAngst", 0.0), table.per_particle("rlnOriginYAngst", 0.0)], 1)
    if table.has("rlnOriginX") or table.has("rlnOriginY"):
        return np.stack([table.per_particle("rlnOriginX", 0.0), table.per_particle("rlnOriginY", 0.0)], 1) * apix
    return np.zeros((len(table), 2))


def check_particle_values(star: Path, ctf_values: dict, euler: torch.Tensor | None, shifts: np.ndarray) -> None:
    """ValueError naming the file and column for NaN/inf values, and for CTF values in
    the wrong units (volts, micrometres) or out of range."""
    for name, a in (
        ("rlnDefocusU", ctf_values["dfu"]),
        ("rlnDefocusV", ctf_values["dfv"]),
        ("rlnDefocusAngle", ctf_values["dfang"]),
        ("rlnVoltage", ctf_values["volt"]),
        ("rlnSphericalAberration", ctf_values["cs"]),
        ("rlnAmplitudeContrast", ctf_values["w"]),
        ("rlnAngleRot/Tilt/Psi", euler if euler is not None else np.zeros(1)),
        ("rlnOrigin", shifts),
    ):
        # starfile fills the fields of a row cut short with NaN
        check_finite(name, a, where=f"{star}: ", hint=" (or empty fields: is the file cut short?)")
    # The unit checks catch values that would still give a plausible but wrong CTF.
    where = f"{star}: "
    check_voltage_kv("rlnVoltage", ctf_values["volt"], where)
    check_amplitude_contrast("rlnAmplitudeContrast", ctf_values["w"], where)
    check_defocus_angstrom("rlnDefocusU", ctf_values["dfu"], where)
    check_defocus_angstrom("rlnDefocusV", ctf_values["dfv"], where)


def read_images(stacks: StackIndex, box: int, *, invert: bool, lazy: bool) -> torch.Tensor | ImageStack:
    """The particle images ``(N, box, box)``: an :class:`ImageStack` view when ``lazy``, else
    one float32 tensor (ValueError for NaN/inf pixels)."""
    stack = ImageStack(stacks.files, stacks.file_index, stacks.slice_index, box, invert)
    if lazy:
        return stack
    try:
        return stack[:]
    finally:
        stack.close()
