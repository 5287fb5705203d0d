"""MRC maps/stacks (mrcfile) and RELION STAR particle files (starfile).

MRC: maps are ``(D, D, D)`` arrays in ``[z, y, x]`` order (MRC sections, rows, columns with
the standard ``mapc, mapr, maps = 1, 2, 3``; other axis orders are permuted on reading);
stacks are ``(N, D, D)`` ``.mrcs`` files flagged as image stacks. The pixel size is in the
header's voxel size (A).

STAR: RELION 3.1 layout, a ``data_optics`` table (``rlnOpticsGroup``, ``rlnVoltage``,
``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnImagePixelSize``,
``rlnImageSize``, ...) and a ``data_particles`` table (``rlnImageName`` as
``000001@particles.mrcs``, 1-based, ``rlnAngleRot/Tilt/Psi`` in degrees,
``rlnDefocusU/V`` in A, ``rlnDefocusAngle`` in degrees, ``rlnOriginX/YAngst``, ...).
RELION 3.0 files (one table, optics columns per particle, ``rlnPixelSize`` or
``rlnDetectorPixelSize``/``rlnMagnification``, ``rlnOriginX/Y`` in pixels) are read too.
Euler angles map to fieldkern rotation matrices with
:func:`fieldkern.cryoem.relion_euler_to_matrix` (no transpose, see that function).

Shifts are read (``shifts_A``); the images are returned as stored, and
:class:`fieldkern.cryoem.reconstruct.Reconstruction` (``shifts=``) centres them. RELION's
convention is that the particle centre sits at ``-(rlnOriginXAngst, rlnOriginYAngst)``
from the box centre, i.e. translating the image by ``+origin`` centres it
(``fieldkern.cryoem.fourier_shift(img, shifts_A / apix, 2)``; cryoDRGN's backprojection
translates by ``+origin`` too). Simulated data have zero shifts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from fieldkern.cryoem._checks import (
    check_amplitude_contrast,
    check_box_size,
    check_count,
    check_defocus_angstrom,
    check_finite,
    check_finite_number,
    check_positive,
    check_voltage_kv,
    to_numpy,
)
from fieldkern.cryoem.ctf import ctf as _ctf
from fieldkern.cryoem.rotations import relion_euler_to_matrix

#: RELION 3.1 table version line (RELION writes it before each data block).
STAR_VERSION_LINE = "# version 30001"

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_PARTICLE_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


def _float_repr(x) -> str:
    # Shortest string that round-trips the float64 exactly (STAR values re-read bit-for-bit).
    return repr(float(x))


# ---------------------------------------------------------------------------------------
# MRC
# ---------------------------------------------------------------------------------------


def write_mrc(
    path: str | PathLike, data, apix: float, *, stack: bool | None = None, overwrite: bool = True
) -> Path:
    """Write a map ``(D, D, D)`` or image stack ``(N, D, D)`` / image ``(D, D)`` as float32 MRC.

    Args:
        path: output file; ``stack`` defaults to ``path`` ending in ``.mrcs``.
        data: tensor or array, ``[z, y, x]`` (map) or ``[n, y, x]`` (stack).
        apix: voxel/pixel size in A, stored as the header voxel size.
    """
    import mrcfile

    apix = check_positive("apix", apix)
    path = Path(path)
    if isinstance(data, torch.Tensor):
        if not data.dtype.is_floating_point:
            raise TypeError(f"data must be floating point, got {data.dtype}")
        # numpy has no bfloat16; the file holds float32 anyway
        arr = data.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(data)
    if arr.ndim not in (2, 3):
        raise ValueError(f"data must be 2D or 3D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"data must be floating point, got {arr.dtype}")
    # mrcfile only warns, and the NaN map then surfaces far away (as "n/a" resolutions)
    check_finite("data", arr, where=f"{path}: ")
    if stack is None:
        stack = path.suffix.lower() == ".mrcs"
    with mrcfile.new(path, overwrite=overwrite) as mrc:
        mrc.set_data(np.ascontiguousarray(arr, dtype=np.float32))
        if stack and arr.ndim == 3:
            mrc.set_image_stack()
        else:
            mrc.set_volume()
        mrc.voxel_size = apix
    return path


def _zyx_order(mrc) -> tuple[int, int, int] | None:
    """Permutation taking mrcfile's (sections, rows, columns) array to [z, y, x], or None."""
    h = mrc.header
    axes = (int(h.maps), int(h.mapr), int(h.mapc))  # labels (1=x, 2=y, 3=z) of array axes 0, 1, 2
    if axes == (3, 2, 1) or sorted(axes) != [1, 2, 3]:
        return None  # standard (or unset/invalid: trust the standard order)
    return tuple(axes.index(label) for label in (3, 2, 1))


def _check_is_file(path: Path, what: str) -> None:
    """FileNotFoundError for a missing path, IsADirectoryError for a folder (both name it)."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")


def read_mrc(path: str | PathLike) -> tuple[torch.Tensor, float]:
    """Read an MRC map or stack: ``(tensor float32, apix)``.

    Maps come back ``(D, D, D)`` in ``[z, y, x]`` order whatever the file's axis order; stacks
    ``(N, D, D)``; a single image ``(D, D)``. ``apix`` is the header's x voxel size
    (0.0 if the header has none). The data come back as stored, NaN included: callers that
    need finite maps check. A file mrcfile cannot read raises ValueError naming the path.
    """
    import mrcfile

    path = Path(path)
    _check_is_file(path, "MRC file")
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            data = np.array(mrc.data, dtype=np.float32)
            perm = _zyx_order(mrc) if data.ndim == 3 and mrc.is_volume() else None
            apix = float(mrc.voxel_size.x)
    except ValueError as e:  # mrcfile's messages ("Map ID string not found", ...) leave out the file
        raise ValueError(f"{path}: not a readable MRC file, truncated or corrupt? ({e})") from e
    if perm is not None:
        data = np.ascontiguousarray(data.transpose(perm))
    return torch.from_numpy(data), apix


# ---------------------------------------------------------------------------------------
# STAR writing
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
    import pandas as pd
    import starfile

    path = Path(path)
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
    n = len(names)
    apix = check_positive("apix", apix)
    box = check_count("box", box)

    def values(x, name, shape):
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

    def col(x, name):
        return values(x, name, (n,))

    eul = values(euler_deg, "euler_deg", (n, 3))
    sh = np.zeros((n, 2)) if shifts_A is None else values(shifts_A, "shifts_A", (n, 2))
    volt, cs, w = (check_finite_number(k, v) for k, v in (("volt", volt), ("cs", cs), ("w", w)))
    extra = {}
    for k, v in (extra_columns or {}).items():
        a = to_numpy(v)
        if a.shape != (n,):
            raise ValueError(f"extra_columns[{k!r}] must have {n} values (one per image name), got shape {a.shape}")
        extra[k] = a
    optics = pd.DataFrame(
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
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnAngleRot": eul[:, 0].astype(np.float64),
            "rlnAngleTilt": eul[:, 1].astype(np.float64),
            "rlnAnglePsi": eul[:, 2].astype(np.float64),
            "rlnOriginXAngst": sh[:, 0].astype(np.float64),
            "rlnOriginYAngst": sh[:, 1].astype(np.float64),
            "rlnDefocusU": col(dfu, "dfu"),
            "rlnDefocusV": col(dfv, "dfv"),
            "rlnDefocusAngle": col(dfang, "dfang"),
            "rlnPhaseShift": col(phase_shift, "phase_shift"),
            "rlnCtfBfactor": col(bfactor, "bfactor"),
        }
    )
    for k, a in extra.items():
        particles[k] = a
    starfile.write({"optics": optics, "particles": particles}, path, float_format=_float_repr)
    # RELION 3.1 writes its table version before each block; add it for fidelity.
    text = path.read_text().replace("\ndata_", f"\n{STAR_VERSION_LINE}\n\ndata_")
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# Reading particles
# ---------------------------------------------------------------------------------------


@dataclass
class CTFParams:
    """Per-particle CTF parameters, float64 ``(N,)`` tensors, units as in :func:`fieldkern.cryoem.ctf`."""

    dfu: torch.Tensor
    dfv: torch.Tensor
    dfang: torch.Tensor
    volt: torch.Tensor
    cs: torch.Tensor
    w: torch.Tensor
    phase_shift: torch.Tensor
    bfactor: torch.Tensor

    def select(self, indices) -> dict:
        """Keyword arguments for :func:`fieldkern.cryoem.ctf` for the given particle indices."""
        return {k: getattr(self, k)[indices] for k in self.__dataclass_fields__}


def _rows(idx, n: int) -> np.ndarray:
    """The row numbers an index (int, slice, list, array or tensor) selects of ``n`` rows, 1-D."""
    return np.atleast_1d(np.arange(n)[idx] if not isinstance(idx, torch.Tensor) else idx.cpu().numpy())


class ImageStack:
    """Lazy, read-only view of particle images spread over MRC stacks (memory-mapped).

    ``stack[i]`` -> ``(D, D)``, ``stack[idx]`` (slice, list, tensor) -> ``(n, D, D)`` float32
    tensors; ``len(stack)``, ``stack.shape``. Images with NaN/inf raise ``ValueError`` on access.
    """

    def __init__(
        self, files: list[Path], file_index: np.ndarray, slice_index: np.ndarray, D: int, invert: bool
    ):
        import mrcfile

        self._mrcs = [mrcfile.mmap(p, mode="r") for p in files]
        self._file_index = file_index
        self._slice_index = slice_index
        self._D = D
        self._sign = -1.0 if invert else 1.0

    def __len__(self) -> int:
        return len(self._file_index)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self._D, self._D)

    def _data(self, f: int) -> np.ndarray:
        d = self._mrcs[f].data
        return d[None] if d.ndim == 2 else d

    def __getitem__(self, idx) -> torch.Tensor:
        single = isinstance(idx, (int, np.integer))
        sel = _rows(idx, len(self))
        out = np.empty((len(sel), self._D, self._D), dtype=np.float32)
        for f in np.unique(self._file_index[sel]):
            m = self._file_index[sel] == f
            out[m] = self._data(int(f))[self._slice_index[sel[m]]]
        if not np.isfinite(out).all():
            bad = sel[~np.isfinite(out).all(axis=(1, 2))]
            raise ValueError(f"particle images {bad[:10].tolist()} contain NaN or inf values")
        t = torch.from_numpy(out) * self._sign
        return t[0] if single else t

    def close(self) -> None:
        for m in self._mrcs:
            m.close()


class CroppedImages:
    """Fourier-cropped view of particle images (a tensor or :class:`ImageStack`):
    ``(N, size, size)``, each read cropped by :func:`fieldkern.cryoem.fourier_crop` in
    blocks of 1024 images, so a large stack is never held at its full size."""

    def __init__(self, images, size: int):
        self.images, self.size = images, int(size)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.size, self.size)

    def __getitem__(self, idx) -> torch.Tensor:
        from fieldkern.cryoem.fourier import fourier_crop

        if isinstance(idx, (int, np.integer)):
            return fourier_crop(torch.as_tensor(self.images[idx]), self.size, 2)
        sel = torch.from_numpy(_rows(idx, len(self)))
        out = torch.empty((len(sel), self.size, self.size), dtype=torch.float32)
        for i in range(0, len(sel), 1024):
            out[i:i + 1024] = fourier_crop(torch.as_tensor(self.images[sel[i:i + 1024]]).float(), self.size, 2)
        return out


@dataclass
class ParticleDataset:
    """Particles read by :func:`load_particles`.

    Attributes:
        images: ``(N, D, D)`` float32 tensor, or an :class:`ImageStack` when loaded lazily.
        rotations: ``(N, 3, 3)`` float64 (``I_i ~ ctf_i * project_volume(V, R_i)``) or None.
        euler_deg: ``(N, 3)`` RELION ``(rot, tilt, psi)`` degrees, float64, or None.
        shifts_A: ``(N, 2)`` ``(rlnOriginXAngst, rlnOriginYAngst)``, float64 (the images are
            not shifted; pass ``shifts_A / apix`` to
            :class:`fieldkern.cryoem.reconstruct.Reconstruction`).
        ctf_params: per-particle :class:`CTFParams`.
        apix: pixel size (A); box: image size D.
        star_path: the STAR file; stack_paths: the resolved MRC stacks.
        optics, particles: the raw STAR tables (pandas DataFrames).
    """

    images: torch.Tensor | ImageStack
    rotations: torch.Tensor | None
    euler_deg: torch.Tensor | None
    shifts_A: torch.Tensor
    ctf_params: CTFParams
    apix: float
    box: int
    star_path: Path
    stack_paths: list[Path]
    optics: object = field(default=None, repr=False)
    particles: object = field(default=None, repr=False)
    #: ``(box, apix)`` of the images as stored, where :meth:`downsample` changed them.
    stack_geometry: tuple[int, float] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def downsample(self, size: int) -> ParticleDataset:
        """The same particles Fourier-cropped to ``size`` pixels (even, <= ``box``): the pixel
        size grows by ``box / size``, the CTFs follow (same frequencies in 1/A), origins stay
        in A. Images are cropped as they are read (:class:`CroppedImages`)."""
        from dataclasses import replace

        size = check_box_size("size", size)
        if size > self.box:
            raise ValueError(f"cannot downsample {self.box}-pixel particles to {size} pixels (must be <= {self.box})")
        if size == self.box:
            return self
        return replace(self, images=CroppedImages(self.images, size), apix=self.apix * self.box / size, box=size,
                       stack_geometry=self.stack_geometry or (self.box, self.apix))

    def get_images(self, indices) -> torch.Tensor:
        """Images ``(n, D, D)`` float32 for an index (slice, list, or tensor)."""
        return self.images[indices]

    def ctf(
        self, indices=slice(None), size: int | None = None, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        """Centred CTFs ``(n, size, size)`` of the given particles at this data set's pixel size.

        ``size`` defaults to the box; use ``2 * box`` (or whatever the data were made with)
        for padded application with :func:`fieldkern.cryoem.apply_ctf`.
        """
        size = self.box if size is None else size
        p = self.ctf_params.select(indices)
        return _ctf(size, self.apix, **p, device=device, dtype=dtype)


def _image_name(name: str) -> tuple[int, str]:
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


def _resolve_stack(file: str, star_dir: Path, data_dir: Path | None) -> Path:
    p = Path(file)
    if p.is_absolute():
        cands = [p]
    elif data_dir is not None:
        cands = [data_dir / p]
    else:
        # RELION resolves relative to its project directory (the cwd of the job); STAR
        # files moved with their stacks resolve relative to their own folder. Try both.
        cands = [star_dir / p, Path.cwd() / p]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"particle stack {file!r} not found (tried {', '.join(map(str, cands))})")


def _numbers(column, name: str, star: Path, where: str = "data_particles") -> np.ndarray:
    """A STAR column as float64; pandas' error ("could not convert string to float: 'abc'")
    names neither the file nor the column."""
    try:
        return column.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{star}: column {name} of {where} holds a value that is not a number ({e})") from e


def _missing(table, names, where: str, star: Path) -> None:
    miss = [c for c in names if c not in table.columns]
    if miss:
        raise ValueError(f"{star}: {where} is missing required column(s) {', '.join(miss)}")


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
            ``ctf * project_volume(V, R)`` with a positive ``V``.
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
    import mrcfile
    import starfile

    star = Path(star_path)
    _check_is_file(star, "STAR file")
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
    n = len(parts)
    if n == 0:
        raise ValueError(f"{star}: the particles table is empty")

    required = ["rlnImageName", *CTF_PARTICLE_COLUMNS] + (list(POSE_COLUMNS) if require_poses else [])
    _missing(parts, required, "data_particles", star)

    # Optics-level values: per particle if present there, else from the particle's optics group.
    if optics is not None and len(optics):
        _missing(optics, ["rlnOpticsGroup"], "data_optics", star)
        groups = (
            parts["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in parts.columns else np.ones(n, dtype=int)
        )
        table = optics.set_index("rlnOpticsGroup")
        unknown = sorted(set(groups.tolist()) - set(table.index.tolist()))
        if unknown:
            raise ValueError(f"{star}: particles refer to optics group(s) {unknown} not in data_optics")
    else:
        table, groups = None, None

    def per_particle(name: str, default=None, required: bool = True) -> np.ndarray | None:
        if name in parts.columns:
            return _numbers(parts[name], name, star)
        if table is not None and name in table.columns:
            return _numbers(table.loc[groups, name], name, star, "data_optics")
        if default is not None:
            return np.full(n, float(default))
        if required:
            where = "data_optics or data_particles" if table is not None else "data_particles"
            raise ValueError(f"{star}: {where} is missing required column {name}")
        return None

    volt = per_particle("rlnVoltage")
    cs = per_particle("rlnSphericalAberration")
    w = per_particle("rlnAmplitudeContrast")
    phase = per_particle("rlnPhaseShift", default=0.0)
    bfac = per_particle("rlnCtfBfactor", default=0.0)

    if apix is None:
        px = per_particle("rlnImagePixelSize", required=False)
        if px is None:
            px = per_particle("rlnPixelSize", required=False)
        if px is None:
            det = per_particle("rlnDetectorPixelSize", required=False)
            mag = per_particle("rlnMagnification", required=False)
            if det is not None and mag is not None:
                px = det * 1e4 / mag
        # In the file's words: the command line has no pixel-size option for --particles.
        fix = "set it in the file (the API takes load_particles(..., apix=))"
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
        apix = float(px[0])
    apix = check_positive("apix", apix)
    star_box = per_particle("rlnImageSize", required=False)

    # Image files.
    parsed = [_image_name(s) for s in parts["rlnImageName"].tolist()]
    star_dir = star.resolve().parent
    ddir = Path(data_dir) if data_dir is not None else None
    files: dict[str, Path] = {}
    for _, f in parsed:
        if f not in files:
            files[f] = _resolve_stack(f, star_dir, ddir)
    order = list(files)
    file_index = np.array([order.index(f) for _, f in parsed], dtype=np.int64)
    slice_index = np.array([i - 1 for i, _ in parsed], dtype=np.int64)

    D = None
    for k, f in enumerate(order):
        try:
            with mrcfile.mmap(files[f], mode="r") as mrc:
                shape = mrc.data.shape
        except ValueError as e:  # e.g. numpy's "mmap length is greater than file size"
            raise ValueError(
                f"particle stack {files[f]} could not be read as an MRC stack (truncated or corrupt?): {e}"
            ) from e
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise ValueError(f"stack {files[f]} must hold 2D images, got data of shape {shape}")
        if shape[1] != shape[2]:
            raise ValueError(f"stack {files[f]} holds non-square images {shape[1]}x{shape[2]}")
        if D is None:
            D = shape[1]
        elif shape[1] != D:
            raise ValueError(
                f"stack {files[f]} holds {shape[1]}-pixel images, but other stacks hold {D}-pixel images"
            )
        used = slice_index[file_index == k]
        if used.max() >= shape[0]:
            raise ValueError(
                f"stack {files[f]} has {shape[0]} images but the STAR file references image {used.max() + 1}"
            )
    if D % 2:
        raise ValueError(f"images must have an even size, got D = {D}")
    if star_box is not None and not np.all(star_box == D):
        raise ValueError(
            f"{star}: rlnImageSize {sorted(set(star_box.astype(int).tolist()))} does not match "
            f"the stack image size {D}"
        )

    if all(c in parts.columns for c in POSE_COLUMNS):
        euler = torch.from_numpy(np.stack([_numbers(parts[c], c, star) for c in POSE_COLUMNS], 1))
        rotations = relion_euler_to_matrix(euler)
    else:
        euler, rotations = None, None
    if "rlnOriginXAngst" in parts.columns or "rlnOriginYAngst" in parts.columns:
        shifts = np.stack([per_particle("rlnOriginXAngst", 0.0), per_particle("rlnOriginYAngst", 0.0)], 1)
    elif "rlnOriginX" in parts.columns or "rlnOriginY" in parts.columns:
        shifts = np.stack([per_particle("rlnOriginX", 0.0), per_particle("rlnOriginY", 0.0)], 1) * apix
    else:
        shifts = np.zeros((n, 2))

    dfu, dfv, dfang = (_numbers(parts[c], c, star) for c in CTF_PARTICLE_COLUMNS)
    for name, a in (
        ("rlnDefocusU", dfu),
        ("rlnDefocusV", dfv),
        ("rlnDefocusAngle", dfang),
        ("rlnVoltage", volt),
        ("rlnSphericalAberration", cs),
        ("rlnAmplitudeContrast", w),
        ("rlnAngleRot/Tilt/Psi", euler if euler is not None else np.zeros(1)),
        ("rlnOrigin", shifts),
    ):
        # starfile fills the fields of a row cut short with NaN
        check_finite(name, a, where=f"{star}: ", hint=" (or empty fields: is the file cut short?)")
    # Checked here, naming the file, not at the first ds.ctf() of a training run; the
    # unit checks catch values that would still give a plausible but wrong CTF.
    where = f"{star}: "
    check_voltage_kv("rlnVoltage", volt, where)
    check_amplitude_contrast("rlnAmplitudeContrast", w, where)
    check_defocus_angstrom("rlnDefocusU", dfu, where)
    check_defocus_angstrom("rlnDefocusV", dfv, where)

    stack = ImageStack([files[f] for f in order], file_index, slice_index, D, invert)
    if lazy:
        images = stack
    else:
        try:
            images = stack[:]
        finally:
            stack.close()

    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731  (a writable copy)
    params = CTFParams(
        dfu=t(dfu),
        dfv=t(dfv),
        dfang=t(dfang),
        volt=t(volt),
        cs=t(cs),
        w=t(w),
        phase_shift=t(phase),
        bfactor=t(bfac),
    )
    return ParticleDataset(
        images=images,
        rotations=rotations,
        euler_deg=euler,
        shifts_A=t(shifts),
        ctf_params=params,
        apix=apix,
        box=int(D),
        star_path=star,
        stack_paths=[files[f] for f in order],
        optics=optics,
        particles=parts,
    )
