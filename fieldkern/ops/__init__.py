"""Differentiable operations, each with a Triton path and a PyTorch reference path.

Which path runs is decided per call by :func:`fieldkern.backend.resolve` from the tensors'
device and the backend setting, so callers never branch on hardware.
"""

from fieldkern.ops.filters import fourier_filter, gabor_filter
from fieldkern.ops.mfn_stack import mfn_stack
from fieldkern.ops.multiplicative_layer import multiplicative_layer

__all__ = ["fourier_filter", "gabor_filter", "mfn_stack", "multiplicative_layer"]
