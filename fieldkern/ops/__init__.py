"""Differentiable operations, each with a Triton path and a PyTorch reference path.

Which path runs is decided per call by :func:`fieldkern.backend.resolve` from the tensors'
device and the backend setting, so callers never branch on hardware. The Triton paths are
registered as ``torch.library`` custom ops (``fieldkern::fourier_filter``,
``fieldkern::gabor_filter``, ``fieldkern::multiplicative_layer``, ``fieldkern::mfn_stack``,
``fieldkern::project_volume`` and their ``*_backward``), so ``torch.compile(fullgraph=True)`` treats them as single
opaque nodes. Their arithmetic precision is chosen by :func:`set_precision`; where an op
has more than one Triton implementation, a fixed rule picks it unless :func:`set_variant`
names one (:mod:`fieldkern.ops._variants`).
"""

from fieldkern.ops._precision import PRECISIONS, get_precision, set_precision
from fieldkern.ops._variants import VARIANTS, get_variants, set_variant
from fieldkern.ops.filters import fourier_filter, gabor_filter
from fieldkern.ops.mfn_stack import mfn_stack
from fieldkern.ops.multiplicative_layer import multiplicative_layer
from fieldkern.ops.project_volume import project_volume

__all__ = [
    "PRECISIONS",
    "VARIANTS",
    "fourier_filter",
    "gabor_filter",
    "get_precision",
    "get_variants",
    "mfn_stack",
    "multiplicative_layer",
    "project_volume",
    "set_precision",
    "set_variant",
]
