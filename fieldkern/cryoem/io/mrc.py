"""MRC maps and image stacks (mrcfile).

Maps are ``(D, D, D)`` arrays in ``[z, y, x]`` order (MRC sections, rows, columns with the
standard ``mapc, mapr, maps = 1, 2, 3``; other axis orders are permuted on reading); stacks
are ``(N, D, D)`` ``.mrcs`` files flagged as image stacks. The pixel size is the header's
voxel size (A).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import torch

from fieldkern.checks import check_finite, check_positive
from fieldkern.cryoem.io.paths import check_is_file


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


def read_mrc(path: str | PathLike) -> tuple[torch.Tensor, float]:
    """Read an MRC map or stack: ``(tensor float32, apix)``.

    Maps come back ``(D, D, D)`` in ``[z, y, x]`` order whatever the file's axis order; stacks
    ``(N, D, D)``; a single image ``(D, D)``. ``apix`` is the header's x voxel size
    (0.0 if the header has none). The data come back as stored, NaN included: callers that
    need finite maps check. A file mrcfile cannot read raises ValueError naming the path.
    """
    import mrcfile

    path = Path(path)
    check_is_file(path, "MRC file")
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


def stack_shape(path: Path) -> tuple[int, ...]:
    """Shape of the data in an MRC stack, read from its header (memory-mapped, no pixels
    read); a single image reads as a stack of one, ``(1, D, D)``.

    Raises ValueError naming the file if mrcfile cannot map it (truncated or corrupt).
    """
    import mrcfile

    try:
        with mrcfile.mmap(path, mode="r") as mrc:
            shape = mrc.data.shape
    except ValueError as e:  # e.g. numpy's "mmap length is greater than file size"
        raise ValueError(
            f"particle stack {path} could not be read as an MRC stack (truncated or corrupt?): {e}"
        ) from e
    return (1, *shape) if len(shape) == 2 else shape
