"""Raw Triton kernels and their launchers, one operation per file.

Nothing outside this package imports triton. ``AVAILABLE`` says whether the kernels can be
used at all in this installation; the ops in :mod:`fieldkern.ops` consult it through
:mod:`fieldkern.backend`.
"""

AVAILABLE = False
UNAVAILABLE_REASON = "the Triton kernels have not landed in fieldkern yet"
