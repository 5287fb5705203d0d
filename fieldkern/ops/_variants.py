"""Named implementation variants of the Triton paths, picked by a fixed rule or by the caller.

Some ops have more than one Triton implementation of the same arithmetic. Which one runs
is never timed at run time: by default (``"auto"``) a fixed rule decides, derived from the
measurements in bench/RESULTS.md; a caller may name a variant instead:

* ``mfn_forward``: ``"fused"`` (one kernel for the whole stack) or ``"layered"`` (one
  launch per layer: filter kernel, multiplicative-layer kernel, heads as GEMMs).
  ``"auto"``: fused. Whatever the setting, the layered forward runs where the fused
  kernel's int32 offsets would wrap (a buffer of ``2^31`` elements or more).
* ``mfn_backward_products``: the float32 backward's products over points on ``"cublas"``
  (IEEE float32 whatever torch's TF32 switch says) or as ``"triton"`` tf32x3 GEMMs.
  ``"auto"``: cublas. Mixed precision has only the Triton bf16 GEMMs: naming ``"cublas"``
  there raises ValueError when the op is called.
* ``volume_gradient`` (``project_volume``'s backward): ``"scatter"`` (float32 atomics,
  each program a run of pixels along a row), ``"scatter_tiled"`` (the same over 8-pixel-wide
  rectangles) or ``"gather"`` (one thread per voxel, no atomics, bitwise repeatable).
  ``"auto"``: scatter_tiled, or gather under ``torch.use_deterministic_algorithms(True)``
  (read when the backward runs); a scatter named explicitly raises RuntimeError there.

Variants are read when an op is called (its forward) and apply to that call's backward
too, like the precision. ``fieldkern.ops.set_variant(mfn_forward="layered")`` sets them
until changed; used as a context manager it restores the previous values on exit;
``get_variants()`` returns them all. The reference path has no variants.

What is still timed: ``@triton.autotune`` times each kernel's candidate tile configs
(block sizes, warps) on its first launch per key and keeps the fastest; it never chooses a
code path. ``FIELDKERN_AUTOTUNE=0`` keeps each kernel's first config.
"""

from __future__ import annotations

#: Each setting's names; "auto" is the fixed rule.
VARIANTS: dict[str, tuple[str, ...]] = {
    "mfn_forward": ("auto", "fused", "layered"),
    "mfn_backward_products": ("auto", "cublas", "triton"),
    "volume_gradient": ("auto", "scatter", "scatter_tiled", "gather"),
}
_current = {name: "auto" for name in VARIANTS}


def get_variants() -> dict[str, str]:
    """The current variant of every setting (a copy), e.g. ``{"mfn_forward": "auto", ...}``."""
    return dict(_current)


def get_variant(name: str) -> str:
    """The current variant of one setting."""
    return _current[_check_name(name)]


def _check_name(name: str) -> str:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant setting {name!r}; the settings are {tuple(VARIANTS)}")
    return name


def check_variant(name: str, value: object) -> str:
    """``value`` if it is one of setting ``name``'s variants, else ValueError."""
    choices = VARIANTS[_check_name(name)]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class set_variant:
    """Name variants, e.g. ``set_variant(mfn_forward="layered", volume_gradient="gather")``:
    until changed again, or for a ``with`` block (the previous values restored on exit, also
    on error). ``"auto"`` restores the fixed rule. Every name and value is checked before
    anything changes."""

    def __init__(self, **variants: str):
        checked = {name: check_variant(name, value) for name, value in variants.items()}
        self._previous = {name: _current[name] for name in checked}
        _current.update(checked)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _current.update(self._previous)

    def __repr__(self) -> str:
        return f"set_variant({', '.join(f'{k}={v!r}' for k, v in get_variants().items())})"
