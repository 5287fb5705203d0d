"""fieldkern: Triton kernels and PyTorch models for multiscale neural fields.

Importing fieldkern is light: the domain packages (:mod:`fieldkern.cryoem`,
:mod:`fieldkern.image`, :mod:`fieldkern.train`) and their dependencies load on first use.
"""

import importlib

from fieldkern.backend import get_backend, set_backend
from fieldkern.coords import grid_coordinates
from fieldkern.nn import BACON, MFN, FourierFilter, GaborFilter, ResidualMFN

__version__ = "0.1.0"

__all__ = [
    "BACON",
    "MFN",
    "FourierFilter",
    "GaborFilter",
    "ResidualMFN",
    "get_backend",
    "grid_coordinates",
    "set_backend",
]

_SUBPACKAGES = ("cryoem", "image", "train", "ops", "kernels")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fieldkern.{name}")
    raise AttributeError(f"module 'fieldkern' has no attribute {name!r}")
