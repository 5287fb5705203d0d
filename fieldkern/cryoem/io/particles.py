"""A particle data set: images (in memory, memory-mapped or cropped as read), poses, shifts
and per-particle CTF parameters, as :func:`fieldkern.cryoem.load_particles` returns it.

Shifts are kept as read (``shifts_A``); the images are returned as stored, and
:class:`fieldkern.cryoem.reconstruct.Reconstruction` (``shifts=``) centres them. RELION's
convention is that the particle centre sits at ``-(rlnOriginXAngst, rlnOriginYAngst)``
from the box centre, i.e. translating the image by ``+origin`` centres it
(``fieldkern.cryoem.fourier_shift(img, shifts_A / apix, 2)``; cryoDRGN's backprojection
translates by ``+origin`` too). Simulated data have zero shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fieldkern.checks import check_box_size
from fieldkern.cryoem.ctf import ctf as _ctf
from fieldkern.cryoem.fourier import fourier_crop


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

    def to(self, device) -> CTFParams:
        """The same parameters on ``device`` (a trainer on a GPU computes each batch's CTFs
        there from its indices, with no host round trip)."""
        return CTFParams(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def _rows(idx, n: int) -> np.ndarray:
    """The row numbers an index (int, slice, list, array or tensor) selects of ``n`` rows, 1-D."""
    return np.atleast_1d(np.arange(n)[idx] if not isinstance(idx, torch.Tensor) else idx.cpu().numpy())


class ImageStack:
    """Lazy, read-only view of particle images spread over MRC stacks (memory-mapped).

    ``stack[i]`` -> ``(D, D)``, ``stack[idx]`` (slice, list, tensor) -> ``(n, D, D)`` float32
    tensors; ``len(stack)``, ``stack.shape``. Images with NaN/inf raise ``ValueError`` on access.

    Args:
        files: the MRC stacks.
        file_index, slice_index: ``(N,)`` int arrays: particle ``i`` is image
            ``slice_index[i]`` (0-based) of ``files[file_index[i]]``.
        D: image size; invert: multiply the images by -1.
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
        """Unmap the stacks; the view cannot be read afterwards."""
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
        if isinstance(idx, (int, np.integer)):
            return fourier_crop(torch.as_tensor(self.images[idx]), self.size, 2)
        sel = torch.from_numpy(_rows(idx, len(self)))
        out = torch.empty((len(sel), self.size, self.size), dtype=torch.float32)
        for i in range(0, len(sel), 1024):
            out[i:i + 1024] = fourier_crop(torch.as_tensor(self.images[sel[i:i + 1024]]).float(), self.size, 2)
        return out


@dataclass
class ParticleDataset:
    """Particles read by :func:`fieldkern.cryoem.load_particles`.

    Attributes:
        images: ``(N, D, D)`` float32 tensor, or an :class:`ImageStack` when loaded lazily
            (a :class:`CroppedImages` after :meth:`downsample`).
        rotations: ``(N, 3, 3)`` float64 (``I_i ~ ctf_i * project(V, R_i)``) or None.
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
