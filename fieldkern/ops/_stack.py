"""The parameter bundles :mod:`fieldkern.ops.mfn_stack` hands to
:mod:`fieldkern.kernels.mfn_stack`: the stacked parameter tensors and the network's spec.

Plain data, no triton: the op module imports it at load time. The ``torch.library``
custom ops take tensors and scalars only, so the bundles are flattened into their
arguments and rebuilt inside them (``fieldkern.ops.mfn_stack``, in one place).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


class StackParams(NamedTuple):
    """An L-layer stack's parameters, stacked per layer (float32, contiguous). Also the
    shape of its gradients (None where the parameter is absent)."""

    w: torch.Tensor  #: (L, H, D) filter frequencies W_i
    b: torch.Tensor  #: (L, H) filter phases b_i
    a: torch.Tensor  #: (L-1, H, H) linear weights A_i of layers 1..L-1 ((0, H, H) for L = 1)
    c: torch.Tensor | None  #: (L-1, H) linear biases c_i, or None
    u: torch.Tensor  #: (L, O, H) head weights U_i (rows of layers without a head unused)
    d: torch.Tensor  #: (L, O) head biases d_i (likewise)
    gamma: torch.Tensor | None  #: (L, H) Gabor envelope precisions, or None (Fourier)
    mu: torch.Tensor | None  #: (L, H, D) Gabor envelope centres, or None


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """What the network computes besides its parameters, and how the kernels compute it.

    The fields, in this order, are the custom ops' scalar arguments."""

    head_mask: int  #: bit i set: layer i has a head
    residual: bool  #: outputs are running sums over the heads
    relu: bool  #: ReLU on each head
    detach_heads_below: int  #: heads of layers i < this pass no gradient to the trunk
    precision: str  #: "float32" or "mixed" (:mod:`fieldkern.ops._precision`)
    forward: str = "auto"  #: ``mfn_forward`` variant (:mod:`fieldkern.ops._variants`)
    products: str = "auto"  #: ``mfn_backward_products`` variant

    @property
    def mixed(self) -> bool:
        return self.precision == "mixed"

    def has_head(self, i: int) -> bool:
        return bool((self.head_mask >> i) & 1)

    def fields(self) -> tuple:
        """The field values in order: the custom ops' scalar arguments."""
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)
