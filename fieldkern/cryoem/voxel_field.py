"""A neural field sampled on the ``D^3`` voxel grid: the map the trainer projects.

The field sees :func:`fieldkern.cryoem.field_coordinates` and its output is divided by ``D``,
so that a projection (a sum of ``D`` voxels) is of the order of one field value. With a
spherical support only the voxels within ``D/2`` of the centre voxel are evaluated (the
others are 0). Data parallel, each rank evaluates a block of z-planes and the blocks are
all-gathered, differentiably, into the volume every rank projects.
"""

from __future__ import annotations

import torch

from fieldkern.cryoem.projection import field_coordinates
from fieldkern.distributed import DistContext

_UNSET = object()


class VoxelField:
    """``model`` (a staged field ``(..., 3) -> [(..., 1)]`` per evaluated scale, with
    ``stage``/``set_stage``) on the voxel grid of a ``D``-voxel box.

    Args:
        support: ``"box"`` (every voxel) or ``"sphere"`` (the sphere inscribed in the box).
        dist: the data-parallel context; every method that gathers must be called on every rank.
    """

    def __init__(self, model: torch.nn.Module, D: int, support: str, dist: DistContext, device):
        self.model, self.D, self.dist, self.device = model, D, dist, torch.device(device)
        self.coords = field_coordinates(D, device=device)
        # Voxels within D/2 of the centre voxel D//2 (the sphere inscribed in the box).
        self.support = (self.coords.square().sum(-1) <= 0.25) if support == "sphere" else None
        self._inside: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._ddp = None
        self._ddp_stage = _UNSET

    def volume(self, all_scales: bool = False, module=None):
        """The field on the whole grid, ``(D, D, D)`` at the active scale (or a list of all
        evaluated scales, coarsest first), from ``module`` (default: the model)."""
        vols = self.planes(0, self.D, self.model if module is None else module)
        return vols if all_scales else vols[-1]

    def planes(self, z0: int, z1: int, module) -> list[torch.Tensor]:
        """The field on z-planes ``z0..z1-1``, ``(z1 - z0, D, D)`` per evaluated scale."""
        if self.support is None:
            return [y[..., 0] / self.D for y in module(self.coords[z0:z1])]
        coords, index = self.inside(z0, z1)
        shape = (z1 - z0, self.D, self.D)
        return [y.new_zeros(shape).flatten().index_copy(0, index, y[:, 0] / self.D).view(shape)
                for y in module(coords)]

    def inside(self, z0: int, z1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The coordinates ``(n, 3)`` of the support's voxels on z-planes ``z0..z1-1`` and
        their flat indices ``(n,)`` in those planes, row-major. Found once per block: a
        boolean mask would be a ``nonzero`` per call, which on a GPU reads its size back to
        the host (a wait per volume step, and no CUDA-graph capture)."""
        if (z0, z1) not in self._inside:
            index = self.support[z0:z1].flatten().nonzero().flatten()
            self._inside[(z0, z1)] = (self.coords[z0:z1].reshape(-1, 3)[index], index)
        return self._inside[(z0, z1)]

    def training_volume(self, module=None) -> torch.Tensor:
        """The field at the active scale on the grid, as volume and pose steps use it.

        On one process, :meth:`volume`. Data parallel, each rank evaluates only its block of
        z-planes (the field is pointwise in its coordinates) and the blocks are gathered, so
        the cost and activation memory of the field are split across ranks; the gather's
        backward sums every rank's volume gradient, so each rank's parameters get the
        gradient of all losses through its own planes, and DDP's average over ranks then
        equals the single-process gradient. Every rank must call it.
        """
        if not self.dist.distributed:
            return self.volume(module=module)
        z0, z1 = self.dist.shard(self.D)
        slab = self.planes(z0, z1, self.model if module is None else module)[-1]
        return self.dist.gather_rows(slab, self.D)

    def module(self) -> torch.nn.Module:
        """The module volume steps differentiate: the model, or its DDP wrapper.

        DDP reduces the gradients of the parameters that required them when it was built,
        and ``set_stage`` freezes and unfreezes parameters, so the wrapper is rebuilt (one
        parameter broadcast) whenever the stage has changed.
        """
        if not self.dist.distributed:
            return self.model
        if self._ddp is None or self._ddp_stage != self.model.stage:
            self._ddp = None  # drop the old wrapper's gradient hooks first
            # The buffers (frozen frequencies) are equal on every rank: no per-step broadcast.
            self._ddp = self.dist.data_parallel(self.model, self.device, sync_buffers=False)
            self._ddp_stage = self.model.stage
        return self._ddp


__all__ = ["VoxelField"]
