"""Raw Triton kernels and their launchers, one operation per file.

Nothing outside this package imports triton. ``AVAILABLE`` says whether the kernels can be
used at all in this installation; the ops in :mod:`fieldkern.ops` consult it through
:mod:`fieldkern.backend`.

The kernel modules (``filters``, ``multiplicative_layer``, ``mfn_stack``,
``project_volume``) are imported lazily by the ops on first Triton call: ``triton.jit`` decides at decoration time whether a
kernel is compiled or interpreted, so ``TRITON_INTERPRET=1`` must be set before that
import (not merely before ``import triton``).
"""

import importlib.util

try:  # find_spec + import: a broken triton install must not break `import fieldkern`
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed")
    import triton  # noqa: F401

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except Exception as exc:  # pragma: no cover - depends on the installation
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton cannot be imported ({exc})"
