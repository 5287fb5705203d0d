"""Density maps from atomic models (PDB / mmCIF via gemmi).

Model: each atom is an isotropic 3D Gaussian carrying its atomic number Z (electrons),
integrated over each voxel (so the map conserves the total Z exactly when the atoms are
well inside the box, and does not alias however narrow the Gaussian), divided by the voxel
volume: values are electrons per A^3.

Width: ``sigma = 0.225 * resolution`` (UCSF Chimera ``molmap``'s default
``sigmaFactor = 1 / (pi sqrt 2)``), widened by an optional global B-factor,
``sigma^2 += B / (8 pi^2)``. The default resolution is ``2 * apix`` (Nyquist), so the map
carries detail up to the box's resolution limit.

Placement: the atoms' Z-weighted centre (or ``center``) goes to voxel ``D//2`` on each
axis; coordinates are not rotated (x -> columns, y -> rows, z -> slices of the
``[z, y, x]`` volume). Hydrogens and waters are dropped by default (``hydrogens=True`` /
``waters=True`` keep them), only the first model and the first alternative conformation
are used. PDB files without element columns (e.g. the CHARMM 4AKE file, whose
left-aligned ``CA`` would read as calcium) get the element of standard polymer residues
from the first letter of the atom name.
"""

from __future__ import annotations

import gzip
import math
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from fieldkern.checks import check_box_size, check_finite, check_finite_number, check_positive

#: Short names of the packaged structures (see fieldkern/data/pdb/README.md).
STRUCTURES = {"4ake": "4ake_chainA_adk_open.pdb", "1ol5": "1ol5.pdb"}

#: molmap: sigma = resolution / (pi * sqrt(2)).
SIGMA_PER_RESOLUTION = 1.0 / (math.pi * math.sqrt(2.0))

# Residue names of force-field variants that gemmi's table does not know as amino acids.
_POLYMER_ALIASES = {"HSD", "HSE", "HSP", "HID", "HIE", "HIP", "CYX", "CYM", "ASH", "GLH", "LYN", "CYS2"}


def structure_path(name: str) -> Path:
    """Path of a packaged structure: ``"4ake"`` or ``"1ol5"`` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in STRUCTURES:
        raise ValueError(f"unknown structure name {name!r}; packaged: {sorted(STRUCTURES)}")
    path = Path(__file__).resolve().parent.parent / "data" / "pdb" / STRUCTURES[key]
    if not path.is_file():
        raise FileNotFoundError(f"packaged structure {path} is missing (broken install?)")
    return path


def _resolve(structure: str | PathLike) -> Path:
    if isinstance(structure, str) and structure.lower() in STRUCTURES:
        return structure_path(structure)
    if not isinstance(structure, (str, PathLike)):
        raise TypeError(f"structure must be a path or a packaged name, got {type(structure).__name__}")
    path = Path(structure)
    if path.is_dir():
        raise IsADirectoryError(f"structure file {str(path)!r} is a directory, not a PDB/mmCIF file")
    if not path.is_file():
        raise FileNotFoundError(
            f"structure file {str(path)!r} not found (packaged names: {sorted(STRUCTURES)})"
        )
    return path


def _pdb_lacks_elements(path: Path) -> bool:
    """True for a PDB-format file whose ATOM/HETATM records all have blank columns 77-78."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if not name.endswith((".pdb", ".ent")):
        return False
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    seen = False
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            if line.startswith(("ATOM  ", "HETATM")):
                seen = True
                if line[76:78].strip():
                    return False
    return seen


def _check_coordinates(path: Path, st) -> None:
    """ValueError naming the file and line (PDB) or ``atom_site`` row (mmCIF) of the first
    atom whose coordinates are not numbers: gemmi reads a PDB field like ``abc.def`` as 0,
    which moves the atom to the box edge instead of refusing it."""
    import gemmi

    if st.input_format == gemmi.CoorFormat.Pdb:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.startswith(("ATOM  ", "HETATM")):
                    continue
                for axis, lo in (("x", 30), ("y", 38), ("z", 46)):
                    field = line[lo:lo + 8]
                    try:
                        float(field)
                    except ValueError:
                        raise ValueError(f"{path}, line {number}: the {axis} coordinate {field.strip()!r} "
                                         f"(columns {lo + 1}-{lo + 8}) is not a number") from None
    elif st.input_format == gemmi.CoorFormat.Mmcif:
        table = gemmi.cif.read(str(path)).sole_block().find("_atom_site.", ["Cartn_x", "Cartn_y", "Cartn_z"])
        for row in range(len(table)):
            for j, axis in enumerate("xyz"):
                if not math.isfinite(gemmi.cif.as_number(table[row][j])):
                    raise ValueError(f"{path}: the {axis} coordinate {table[row][j]!r} of atom_site row {row + 1} "
                                     "is not a number")


def load_atoms(
    structure: str | PathLike, *, hydrogens: bool = False, waters: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Atom positions and atomic numbers of a PDB/mmCIF file or packaged name.

    Returns ``(xyz, Z)``: float64 ``(N, 3)`` in A (x, y, z) and int ``(N,)``. First model,
    first alternative conformation; hydrogens/waters dropped unless asked for.
    """
    import gemmi  # heavy, optional dependency: import on use

    path = _resolve(structure)
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as e:  # gemmi's messages leave out the file
        raise ValueError(f"{path}: could not be read as a PDB/mmCIF structure ({e})") from e
    # gemmi reads text without records (or binary junk) as an empty structure: say so,
    # rather than blame the hydrogen/water filters below
    if len(st) == 0 or not any(len(res) for chain in st[0] for res in chain):
        raise ValueError(f"{path}: could not be read as a structure (no atom records found; "
                         f"is it a PDB or mmCIF file?)")
    _check_coordinates(path, st)
    st.remove_alternative_conformations()
    infer = _pdb_lacks_elements(path)
    xyz, zs = [], []
    for chain in st[0]:
        for res in chain:
            if res.is_water() and not waters:
                continue
            polymer = False
            if infer:
                info = gemmi.find_tabulated_residue(res.name)
                polymer = res.name in _POLYMER_ALIASES or (
                    info is not None and (info.is_amino_acid() or info.is_nucleic_acid())
                )
            for atom in res:
                el = atom.element
                if polymer:
                    letters = atom.name.lstrip("0123456789")[:1].upper()
                    el = gemmi.Element("H" if letters == "D" else letters)
                if el.name == "X" or el.atomic_number == 0:
                    raise ValueError(
                        f"{path}: cannot tell the element of atom {atom.name!r} in residue "
                        f"{res.name} {res.seqid}; add element columns (77-78) to the file"
                    )
                if el.atomic_number == 1 and not hydrogens:
                    continue
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                zs.append(el.atomic_number)
    if not xyz:
        raise ValueError(f"{path} holds no atoms after filtering (hydrogens={hydrogens}, waters={waters})")
    return np.asarray(xyz, dtype=np.float64), np.asarray(zs, dtype=np.int64)


def _voxel_profiles(c: torch.Tensor, D: int, apix: float, sigma: float) -> torch.Tensor:
    """Fraction of a 1D Gaussian (centres ``c`` in voxels, width ``sigma`` A) in each voxel: ``(N, D)``."""
    edges = (torch.arange(D + 1, dtype=torch.float64) - D // 2 - 0.5) * apix
    cdf = torch.erf((edges[None, :] - c[:, None] * apix) / (math.sqrt(2.0) * sigma))
    return 0.5 * (cdf[:, 1:] - cdf[:, :-1])


def density_from_structure(
    structure: str | PathLike,
    box: int,
    apix: float,
    *,
    resolution: float | None = None,
    bfactor: float = 0.0,
    hydrogens: bool = False,
    waters: bool = False,
    center=None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Density map ``(box, box, box)`` ``[z, y, x]`` of an atomic model, in electrons / A^3.

    Args:
        structure: PDB/mmCIF path, or a packaged name (``"4ake"``, ``"1ol5"``).
        box: D (even); ``apix``: voxel size in A.
        resolution: A; Gaussian ``sigma = 0.225 * resolution`` per atom (default ``2 * apix``).
        bfactor: extra global B-factor in A^2 (``sigma^2 += B / (8 pi^2)``).
        hydrogens, waters: keep hydrogens / water molecules (default: dropped).
        center: ``(x, y, z)`` in A to put at voxel D//2 (default: Z-weighted atom centre).

    Raises ValueError when an atom lies outside the sphere of radius ``(D/2 - 1) * apix``
    around the centre: such a map would be clipped by the box in some projection directions.
    """
    D = check_box_size("box", box)
    apix = check_positive("apix", apix)
    resolution = 2.0 * apix if resolution is None else check_positive("resolution", resolution)
    bfactor = check_finite_number("bfactor", bfactor)
    if bfactor < 0:
        raise ValueError(f"bfactor must be >= 0, got {bfactor}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    xyz, z = load_atoms(structure, hydrogens=hydrogens, waters=waters)
    w = torch.from_numpy(z).to(torch.float64)
    rel = _centred(torch.from_numpy(xyz), w, center)
    _check_fits(rel, D, apix)
    sigma = math.sqrt((SIGMA_PER_RESOLUTION * resolution) ** 2 + bfactor / (8 * math.pi**2))
    vol = _gaussian_sum(rel / apix, w, D, apix, sigma)  # positions in voxels from the centre voxel
    return vol.to(dtype=dtype, device=device)


def _centred(xyz: torch.Tensor, w: torch.Tensor, center) -> torch.Tensor:
    """Atom positions ``(N, 3)`` relative to ``center`` (A), by default the ``w``-weighted centre."""
    if center is None:
        c0 = (xyz * w[:, None]).sum(0) / w.sum()
    else:
        c0 = torch.as_tensor(center, dtype=torch.float64).reshape(-1)
        if c0.numel() != 3:
            raise ValueError(f"center must be (x, y, z) in A, got {center!r}")
        check_finite("center", c0)
    return xyz - c0


def _check_fits(rel: torch.Tensor, D: int, apix: float) -> None:
    """ValueError, with the box size that would do, for atoms (``rel``, A from the centre)
    outside the sphere of radius ``(D/2 - 1) * apix``."""
    r_max = float(rel.norm(dim=1).max())
    limit = (D // 2 - 1) * apix
    if r_max > limit:
        need = 2 * math.ceil(r_max / apix + 1)
        raise ValueError(
            f"structure does not fit in the box: atoms reach {r_max:.1f} A from the centre, "
            f"but a {D}-voxel box at {apix} A/voxel only holds a sphere of radius "
            f"(D/2 - 1) * apix = {limit:.1f} A; use box >= {need + need % 2} at this apix "
            f"or a larger apix"
        )


def _gaussian_sum(pos: torch.Tensor, w: torch.Tensor, D: int, apix: float, sigma: float) -> torch.Tensor:
    """``sum_a w_a G_a`` over a ``(D, D, D)`` ``[z, y, x]`` grid, float64, per A^3: each atom a
    Gaussian of width ``sigma`` A integrated over each voxel, ``pos`` ``(N, 3)`` (x, y, z)
    in voxels from voxel D//2."""
    vol = torch.zeros(D * D, D, dtype=torch.float64)
    # Separable Gaussians: V = sum_a Z_a gz_a (x) gy_a (x) gx_a, as a (D^2 x N) @ (N x D)
    # product per chunk of atoms (exact, no truncation radius; ~0.1 s for 3341 atoms at D=64).
    chunk = max(1, (1 << 23) // (D * D))
    for a0 in range(0, pos.shape[0], chunk):
        p = pos[a0 : a0 + chunk]
        gx = _voxel_profiles(p[:, 0], D, apix, sigma)
        gy = _voxel_profiles(p[:, 1], D, apix, sigma)
        gz = _voxel_profiles(p[:, 2], D, apix, sigma) * w[a0 : a0 + chunk, None]
        zy = (gz[:, :, None] * gy[:, None, :]).reshape(p.shape[0], D * D)
        vol += zy.T @ gx
    return vol.reshape(D, D, D) / apix**3
