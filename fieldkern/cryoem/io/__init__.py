"""Cryo-EM files: MRC maps and stacks (mrcfile), RELION STAR particle files (starfile), and
the particle data set read from them.

* :mod:`~fieldkern.cryoem.io.mrc`: :func:`read_mrc` / :func:`write_mrc`, maps ``(D, D, D)``
  in ``[z, y, x]`` order, stacks ``(N, D, D)``, pixel size in A from the header.
* :mod:`~fieldkern.cryoem.io.star`: :func:`write_particles_star` (RELION 3.1) and the
  reading of RELION 3.1 / 3.0 tables by column name.
* :mod:`~fieldkern.cryoem.io.particles`: :class:`ParticleDataset` (images, poses, shifts
  in A, :class:`CTFParams`), with :class:`ImageStack` (memory-mapped) and
  :class:`CroppedImages` (Fourier-cropped as read) image views.
* :mod:`~fieldkern.cryoem.io.load`: :func:`load_particles`, a STAR file and its stacks to a
  checked :class:`ParticleDataset`.

mrcfile, starfile and pandas are imported inside the functions that use them.
"""

from fieldkern.cryoem.io.load import load_particles
from fieldkern.cryoem.io.mrc import read_mrc, write_mrc
from fieldkern.cryoem.io.particles import CroppedImages, CTFParams, ImageStack, ParticleDataset
from fieldkern.cryoem.io.star import (
    CTF_PARTICLE_COLUMNS,
    OPTICS_COLUMNS,
    POSE_COLUMNS,
    STAR_VERSION_LINE,
    write_particles_star,
)

__all__ = [
    "CTF_PARTICLE_COLUMNS",
    "OPTICS_COLUMNS",
    "POSE_COLUMNS",
    "STAR_VERSION_LINE",
    "CTFParams",
    "CroppedImages",
    "ImageStack",
    "ParticleDataset",
    "load_particles",
    "read_mrc",
    "write_mrc",
    "write_particles_star",
]
