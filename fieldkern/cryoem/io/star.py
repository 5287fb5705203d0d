"""RELION STAR particle files (starfile): writing them, and reading their tables by column name.

RELION 3.1 layout: a ``data_optics`` table (``rlnOpticsGroup``, ``rlnVoltage``,
``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnImagePixelSize``,
``rlnImageSize``, ...) and a ``data_particles`` table (``rlnImageName`` as
``000001@particles.mrcs``, 1-based, ``rlnAngleRot/Tilt/Psi`` in degrees, ``rlnDefocusU/V``
in A, ``rlnDefocusAngle`` in degrees, ``rlnOriginX/YAngst``, ...). RELION 3.0 files (one
table, optics columns per particle, ``rlnPixelSize`` or ``rlnDetectorPixelSize`` /
``rlnMagnification``, ``rlnOriginX/Y`` in pixels) are read too: :class:`ParticleTable`
looks an optics-level column up in the particle's row first, then in its optics group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from fieldkern.checks import check_count, check_finite, check_finite_number, check_positive, to_numpy
from fieldkern.cryoem.io.paths import check_is_file

#: RELION 3.1 table version line (RELION writes it before each data block).
STAR_VERSION_LINE = "# version 30001"

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_PARTICLE_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def write_particles_star(
    path: str | PathLike,
    *,
    image_names,
    euler_deg,
    dfu,
    dfv,
    dfang,
    apix: float,
    box: int,
    volt: float = 300.0,
    cs: float = 2.7,
    w: float = 0.1,
    phase_shift=0.0,
    bfactor=0.0,
    shifts_A=None,
    extra_columns: dict | None = None,
) -> Path:
    """Write a RELION 3.1 particle STAR file (one optics group).

    Raises TypeError/ValueError naming the argument for a str (not a list) of image names,
    arrays whose length differs from the number of names, NaN/inf values, ``apix <= 0`` or
    a non-integer ``box``.

    Args:
        image_names: N strings ``"000001@particles.mrcs"`` (paths relative to the STAR file).
        euler_deg: ``(N, 3)`` RELION ``(rot, tilt, psi)`` degrees.
        dfu, dfv, dfang: ``(N,)`` defocus U/V (A) and angle (degrees).
        apix, box: pixel size (A) and image size of the optics group.
        volt, cs, w: kV, mm, amplitude contrast of the optics group.
        phase_shift, bfactor: per particle (scalar or ``(N,)``), degrees and A^2.
        shifts_A: ``(N, 2)`` ``rlnOriginX/YAngst`` (default zeros).
        extra_columns: more ``rln*`` particle columns (name -> N values).

    Floats are written with the shortest exact representation, so they re-read bit-for-bit.
    """
    import starfile

    path = Path(path)
    names = _image_names(image_names)
    n = len(names)
    apix = check_positive("apix", apix)
    box = check_count("box", box)
    eul = _values(euler_deg, "euler_deg", (n, 3))
    sh = np.zeros((n, 2)) if shifts_A is None else _values(shifts_A, "shifts_A", (n, 2))
    volt, cs, w = (check_finite_number(k, v) for k, v in (("volt", volt), ("cs", cs), ("w", w)))
    extra = _extra_columns(extra_columns, n)
    optics = _optics_table(apix, box, volt, cs, w)
    particles = _particles_table(names, eul, sh, dfu=dfu, dfv=dfv, dfang=dfang, phase_shift=phase_shift,
                                 bfactor=bfactor)
    for k, a in extra.items():
        particles[k] = a
    starfile.write({"optics": optics, "particles": particles}, path, float_format=_float_repr)
    # RELION 3.1 writes its table version before each block; add it for fidelity.
    text = path.read_text().replace("\ndata_", f"\n{STAR_VERSION_LINE}\n\ndata_")
    path.write_text(text)
    return path


def _float_repr(x) -> str:
    # Shortest string that round-trips the float64 exactly (STAR values re-read bit-for-bit).
    return repr(float(x))


def _image_names(image_names) -> list[str]:
    """``image_names`` as a list of str; TypeError for a single str or non-str entries."""
    # A str is a sequence too: each character would become an image name.
    if isinstance(image_names, (str, bytes)) or not isinstance(image_names, Iterable):
        raise TypeError(
            f"image_names must be a sequence of str such as ['000001@particles.mrcs', ...], "
            f"got {type(image_names).__name__}"
        )
    names = list(image_names)
    wrong = [s for s in names if not isinstance(s, str)]
    if wrong:
        raise TypeError(f"image_names must hold str, got {type(wrong[0]).__name__} {wrong[0]!r}")
    return names


def _values(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float64 array of ``shape`` (a scalar is repeated), checked before numpy or pandas
    fail on it with messages that do not name the argument."""
    a = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 0 and len(shape) == 1:
        a = np.full(shape, a)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (one row per image name), got {a.shape}")
    try:
        a = a.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must hold numbers, got {a.dtype}") from e
    check_finite(name, a)
    return a


def _extra_columns(extra_columns: dict | None, n: int) -> dict[str, np.ndarray]:
    extra = {}
    for k, v in (extra_columns or {}).items():
        a = to_numpy(v)
        if a.shape != (n,):
            raise ValueError(f"extra_columns[{k!r}] must have {n} values (one per image name), got shape {a.shape}")
        extra[k] = a
    return extra


def _optics_table(apix: float, box: int, volt: float, cs: float, w: float):
    """The one-row ``data_optics`` table."""
    import pandas as pd

    return pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [float(apix)],
            "rlnVoltage": [volt],
            "rlnSphericalAberration": [cs],
            "rlnAmplitudeContrast": [w],
            "rlnImagePixelSize": [float(apix)],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )


def _particles_table(names: list[str], eul: np.ndarray, sh: np.ndarray, **ctf):
    """The ``data_particles`` table; ``ctf`` holds dfu, dfv, dfang, phase_shift, bfactor
    (scalars or ``(N,)``), checked here in that order."""
    import pandas as pd

    n = len(names)

    def col(name):
        return _values(ctf[name], name, (n,))

    return pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnAngleRot": eul[:, 0].astype(np.float64),
            "rlnAngleTilt": eul[:, 1].astype(np.float64),
            "rlnAnglePsi": eul[:, 2].astype(np.float64),
            "rlnOriginXAngst": sh[:, 0].astype(np.float64),
            "rlnOriginYAngst": sh[:, 1].astype(np.float64),
            "rlnDefocusU": col("dfu"),
            "rlnDefocusV": col("dfv"),
            "rlnDefocusAngle": col("dfang"),
            "rlnPhaseShift": col("phase_shift"),
            "rlnCtfBfactor": col("bfactor"),
        }
    )


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def numbers(column, name: str, star: Path, where: str = "data_particles") -> np.ndarray:
    """A STAR column as float64; pandas' error ("could not convert string to float: 'abc'")
    names neither the file nor the column."""
    try:
        return column.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{star}: column {name} of {where} holds a value that is not a number ({e})") from e


def require_columns(table, names, where: str, star: Path) -> None:
    """ValueError naming the file, the table and every column of ``names`` it lacks."""
    miss = [c for c in names if c not in table.columns]
    if miss:
        raise ValueError(f"{star}: {where} is missing required column(s) {', '.join(miss)}")


@dataclass
class ParticleTable:
    """The particle rows of a STAR file, with the optics values each particle inherits.

    Attributes:
        star: the STAR file (named in every error).
        particles: the ``data_particles`` table (pandas DataFrame), N rows.
        optics: the ``data_optics`` table, or None (RELION 3.0 files).
        optics_by_group: ``optics`` indexed by ``rlnOpticsGroup``; None without optics rows.
        groups: the optics group of each particle ``(N,)``; None without optics rows.
    """

    star: Path
    particles: object
    optics: object
    optics_by_group: object
    groups: np.ndarray | None

    def __len__(self) -> int:
        return len(self.particles)

    def has(self, name: str) -> bool:
        """Whether the particle table has the column ``name``."""
        return name in self.particles.columns

    def column(self, name: str) -> np.ndarray:
        """Particle column ``name`` as float64 ``(N,)`` (ValueError naming a non-number)."""
        return numbers(self.particles[name], name, self.star)

    def per_particle(self, name: str, default=None, required: bool = True) -> np.ndarray | None:
        """Column ``name`` for every particle, float64 ``(N,)``: from the particle table, else
        from each particle's optics group, else ``default`` repeated; if none of these,
        ValueError when ``required``, else None."""
        if name in self.particles.columns:
            return self.column(name)
        table = self.optics_by_group
        if table is not None and name in table.columns:
            return numbers(table.loc[self.groups, name], name, self.star, "data_optics")
        if default is not None:
            return np.full(len(self), float(default))
        if required:
            where = "data_optics or data_particles" if table is not None else "data_particles"
            raise ValueError(f"{self.star}: {where} is missing required column {name}")
        return None

    def pixel_size(self) -> float:
        """The pixel size (A) of all particles: ``rlnImagePixelSize``, ``rlnPixelSize`` or
        ``rlnDetectorPixelSize * 1e4 / rlnMagnification``, in that order of preference.

        Raises ValueError if none is given, or if any is not positive, or if they differ.
        """
        px = self.per_particle("rlnImagePixelSize", required=False)
        if px is None:
            px = self.per_particle("rlnPixelSize", required=False)
        if px is None:
            det = self.per_particle("rlnDetectorPixelSize", required=False)
            mag = self.per_particle("rlnMagnification", required=False)
            if det is not None and mag is not None:
                px = det * 1e4 / mag
        # In the file's words: the command line has no pixel-size option for --particles.
        fix = "set it in the file (the API takes load_particles(..., apix=))"
        star = self.star
        if px is None:
            raise ValueError(
                f"{star}: no pixel size (rlnImagePixelSize in data_optics, or rlnPixelSize, or "
                f"rlnDetectorPixelSize and rlnMagnification); {fix}"
            )
        bad = ~(np.isfinite(px) & (px > 0))
        if bad.any():
            raise ValueError(f"{star}: the pixel size of {int(bad.sum())} particle(s) is "
                             f"{float(px[bad][0]):g} A, not a positive number; {fix}")
        if not np.allclose(px, px[0], rtol=1e-6):
            raise ValueError(
                f"{star}: particles have different pixel sizes {sorted(set(px.tolist()))[:5]}; not supported"
            )
        return float(px[0])


def read_particle_table(star: Path, *, require_poses: bool = True) -> ParticleTable:
    """Parse a particle STAR file (RELION 3.1 or 3.0) into a :class:`ParticleTable`.

    Raises ValueError naming the file for a file starfile cannot parse, no particle table,
    an empty one, missing ``rlnImageName`` / defocus columns (and Euler angles when
    ``require_poses``), and particles of optics groups that ``data_optics`` lacks.
    """
    import starfile

    check_is_file(star, "STAR file")
    try:
        blocks = starfile.read(star, always_dict=True)
    except Exception as e:  # starfile raises assorted parser errors on malformed files
        raise ValueError(f"{star}: could not parse STAR file ({e})") from e
    tables = {k: v for k, v in blocks.items() if hasattr(v, "columns")}
    if "particles" in tables:
        parts = tables["particles"]
    else:
        with_names = [v for v in tables.values() if "rlnImageName" in v.columns]
        if not with_names:
            raise ValueError(f"{star}: no data_particles table (no table has the column rlnImageName)")
        parts = with_names[0]
    optics = tables.get("optics")
    if len(parts) == 0:
        raise ValueError(f"{star}: the particles table is empty")
    required = ["rlnImageName", *CTF_PARTICLE_COLUMNS] + (list(POSE_COLUMNS) if require_poses else [])
    require_columns(parts, required, "data_particles", star)
    return ParticleTable(star, parts, optics, *_optics_groups(parts, optics, star))


def _optics_groups(parts, optics, star: Path) -> tuple[object, np.ndarray | None]:
    """``(optics indexed by rlnOpticsGroup, each particle's group)``, the groups checked
    against ``data_optics`` (group 1 where the particle table has no ``rlnOpticsGroup``);
    ``(None, None)`` without optics rows."""
    if optics is None or not len(optics):
        return None, None
    require_columns(optics, ["rlnOpticsGroup"], "data_optics", star)
    groups = (
        parts["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in parts.columns else np.ones(len(parts), dtype=int)
    )
    table = optics.set_index("rlnOpticsGroup")
    unknown = sorted(set(groups.tolist()) - set(table.index.tolist()))
    if unknown:
        raise ValueError(f"{star}: particles refer to optics group(s) {unknown} not in data_optics")
    return table, groups


def parse_image_name(name: str) -> tuple[int, str]:
    """``"000012@stack.mrcs"`` -> ``(12, "stack.mrcs")`` (1-based); a bare file name is image 1.

    Raises ValueError for a number that is not an integer or below 1.
    """
    s = str(name).strip()
    if "@" in s:
        idx, _, file = s.partition("@")
        try:
            i = int(idx)
        except ValueError:
            raise ValueError(f"rlnImageName {s!r} does not start with an image number") from None
        if i < 1:
            raise ValueError(f"rlnImageName {s!r}: image numbers are 1-based")
        return i, file
    return 1, s
