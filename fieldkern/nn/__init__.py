"""Neural-field modules built from :mod:`fieldkern.ops`."""

from fieldkern.nn.filters import FourierFilter, GaborFilter
from fieldkern.nn.models import BACON, MFN, ResidualMFN

__all__ = ["BACON", "MFN", "FourierFilter", "GaborFilter", "ResidualMFN"]
