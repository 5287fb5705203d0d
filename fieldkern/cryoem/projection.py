"""Projection of a volume under rotations (the cryo-EM forward model without CTF).

Conventions (pinned by tests/cryoem/test_cryoem_projection.py)
-------------------------------------------------------------
* A volume is ``(D, D, D)`` indexed ``[z, y, x]`` (MRC order), an image ``(D, D)`` indexed
  ``[y, x]``, D even. Index ``i`` of an axis sits at ``(i - D//2)`` voxels, i.e.
  ``(i - D//2) * apix`` Angstrom: rotations are about index ``D//2`` (RELION/cryoDRGN centre).
* ``I[y, x] = sum_k V(R^T (x, y, z_k))`` with ``(x, y, z_k)`` the centred voxel coordinates
  of the output pixel and slice ``k = 0..D-1``, ``V`` sampled by trilinear interpolation
  and zero outside the box. The result is a plain sum over slices (multiply by ``apix``
  for a line integral in A).
* The neural field sees the coordinates ``(i - D//2) / D`` in [-0.5, 0.5)
  (:func:`field_coordinates`). Note this is not :func:`fieldkern.grid_coordinates`, which
  puts samples at voxel centres ``-0.5 + (j + 0.5) / N`` (half a voxel apart).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from fieldkern.cryoem._checks import check_box_size, check_chunk, check_rotations, check_volume

#: Default number of sample points (images x slices x D^2) per chunk: ~ 2^24 points keeps
#: the per-chunk working set (grid, samples, their gradients) at a few hundred MB in float32.
DEFAULT_MAX_POINTS = 1 << 24


def field_coordinates(D: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Neural-field coordinates of a ``D^3`` volume: ``(D, D, D, 3)`` holding ``(x, y, z)``.

    Entry ``[k, j, i]`` is ``((i - D//2) / D, (j - D//2) / D, (k - D//2) / D)``, in [-0.5, 0.5),
    so ``field(field_coordinates(D))[..., 0]`` is a volume in ``[z, y, x]`` order whose
    centre voxel ``D//2`` is the field's origin.
    """
    D = check_box_size("D", D)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    c = (torch.arange(D, device=device, dtype=dtype) - D // 2) / D
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def _centred_grid(D: int, z_lo: int, z_hi: int, device, dtype) -> torch.Tensor:
    """``(nz, D*D, 3)`` centred voxel coordinates ``(x, y, z)`` of slices z_lo..z_hi-1."""
    c = torch.arange(D, device=device, dtype=dtype) - D // 2
    z, y, x = torch.meshgrid(c[z_lo:z_hi], c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1).reshape(z_hi - z_lo, D * D, 3)


def _rotate_points(pts: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Row vectors times M, i.e. ``M^T`` applied to column vectors: ``(1, P, 3), (n, 3, 3) -> (n, P, 3)``."""
    if pts.shape[1] * M.shape[0] >= 1 << 20:
        return torch.matmul(pts, M)  # BLAS wins for large batches
    # Small problems: elementwise, avoiding a threaded BLAS call whose synchronisation
    # cost (milliseconds on a busy CPU) would dominate.
    return (
        pts[..., 0:1] * M[:, None, 0, :] + pts[..., 1:2] * M[:, None, 1, :] + pts[..., 2:3] * M[:, None, 2, :]
    )


def _project_block(volume: torch.Tensor, rotations: torch.Tensor, z_lo: int, z_hi: int) -> torch.Tensor:
    """Partial projection over slices z_lo..z_hi-1 for a chunk of rotations: ``(b, D, D)``."""
    D = volume.shape[-1]
    b = rotations.shape[0]
    nz = z_hi - z_lo
    pts = _centred_grid(D, z_lo, z_hi, volume.device, volume.dtype).reshape(1, nz * D * D, 3)
    # Row vector times R is R^T applied to the column vector (x, y, z).
    src = _rotate_points(pts, rotations)
    # grid_sample, align_corners=False: normalised g maps to index ((g + 1) D - 1) / 2, so
    # index src + D/2 needs g = (2 src + 1) / D. For power-of-two D and integer src this is
    # exact, which makes axis-aligned rotations exact permutations.
    grid = src.mul(2).add_(1).div_(D)
    # One volume, b * nz * D^2 sample points: the volume is never copied per image.
    out = torch.nn.functional.grid_sample(
        volume[None, None],
        grid.reshape(1, b, nz, D * D, 3),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (1, 1, b, nz, D*D)
    return out[0, 0].sum(1).reshape(b, D, D)


def _block_sizes(D: int, B: int, chunk_size: int | None, slice_chunk: int | None, max_points: int):
    if slice_chunk is None:
        slice_chunk = D if chunk_size is not None else max(1, min(D, max_points // (D * D)))
    slice_chunk = min(slice_chunk, D)
    if chunk_size is None:
        chunk_size = max(1, max_points // (slice_chunk * D * D))
    return max(1, min(chunk_size, max(B, 1))), slice_chunk


def project_volume_reference(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    *,
    chunk_size: int | None = None,
    slice_chunk: int | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    use_checkpoint: bool | None = None,
) -> torch.Tensor:
    """Plain-PyTorch projector: ``(D, D, D)`` volume, ``(B, 3, 3)`` rotations -> ``(B, D, D)``.

    ``I_b[y, x] = sum_k V(R_b^T (x, y, z_k))`` (trilinear, zero outside the box; see the
    module docstring for the coordinate convention). Differentiable with respect to
    ``volume`` and ``rotations`` (any floating dtype; rotations are cast to the volume's).

    Memory is bounded independently of B: coordinates are rotated, never the volume, and
    the work is split into blocks of ``chunk_size`` images x ``slice_chunk`` slices (by
    default sized so that a block has at most ``max_points`` sample points). When autograd
    is recording, each block runs under ``torch.utils.checkpoint``, so the backward pass
    keeps only each block's inputs (a slice of the rotations) and recomputes the block's
    sampling grid, instead of holding every block's ``b x nz x D^2 x 3`` grid until
    backward. Peak extra memory is then O(block), plus the ``(B, D, D)`` output.

    Args:
        volume: ``(D, D, D)``, indexed ``[z, y, x]``, D even.
        rotations: ``(B, 3, 3)`` matrices acting on column vectors ``(x, y, z)``.
        chunk_size: images per block (None: from ``max_points``).
        slice_chunk: z-slices per block (None: all D slices unless one image exceeds
            ``max_points``).
        max_points: sample-point budget per block when sizes are not given.
        use_checkpoint: force checkpointing on/off (None: on when autograd records).
    """
    D = check_volume("volume", volume)
    B = check_rotations("rotations", rotations)
    chunk_size = check_chunk("chunk_size", chunk_size)
    slice_chunk = check_chunk("slice_chunk", slice_chunk)
    if rotations.device != volume.device:
        raise ValueError(f"rotations must be on the volume's device {volume.device}, got {rotations.device}")
    rotations = rotations.to(volume.dtype)
    if B == 0:
        return volume.new_zeros(0, D, D)
    b_chunk, z_chunk = _block_sizes(D, B, chunk_size, slice_chunk, int(max_points))
    if use_checkpoint is None:
        use_checkpoint = torch.is_grad_enabled() and (volume.requires_grad or rotations.requires_grad)

    outputs = []
    for b0 in range(0, B, b_chunk):
        rot = rotations[b0 : b0 + b_chunk]
        acc = None
        for z0 in range(0, D, z_chunk):
            z1 = min(D, z0 + z_chunk)
            if use_checkpoint:
                part = checkpoint(_project_block, volume, rot, z0, z1, use_reentrant=False)
            else:
                part = _project_block(volume, rot, z0, z1)
            acc = part if acc is None else acc + part
        outputs.append(acc)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)


def project_volume(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    *,
    chunk_size: int | None = None,
    slice_chunk: int | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> torch.Tensor:
    """Project a ``(D, D, D)`` volume under ``(B, 3, 3)`` rotations: ``(B, D, D)`` images.

    ``I_b[y, x] = sum_k V(R_b^T (x, y, z_k))``, centred voxel coordinates, trilinear
    interpolation, zero outside the box. Batched, differentiable with respect to the volume
    and the rotations, memory bounded independently of B. This is the public entry point;
    it currently runs :func:`project_volume_reference` (the Triton projector of a later
    issue will be dispatched from here).
    """
    return project_volume_reference(
        volume, rotations, chunk_size=chunk_size, slice_chunk=slice_chunk, max_points=max_points
    )


def transform_volume(
    volume: torch.Tensor,
    matrix: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample ``volume`` under rigid (or improper) transforms: ``out(r) = V(M^T (r - t))``.

    Args:
        volume: ``(D, D, D)``.
        matrix: orthogonal ``(3, 3)`` or ``(n, 3, 3)`` (det = -1 allowed, e.g. a handedness
            flip ``diag(1, 1, -1)``), acting on ``(x, y, z)`` about the centre voxel D//2.
        shift: ``(3,)`` or ``(n, 3)`` translation ``t`` in voxels, ``(x, y, z)`` order.

    Returns:
        ``(D, D, D)`` or ``(n, D, D, D)``: so ``project_volume(transform_volume(V, R), I)``
        equals ``project_volume(V, R)``. Trilinear, zero outside the box; differentiable.
    """
    D = check_volume("volume", volume)
    single = matrix.dim() == 2
    M = matrix[None] if single else matrix
    check_rotations("matrix", M)
    M = M.to(volume)
    n = M.shape[0]
    pts = _centred_grid(D, 0, D, volume.device, volume.dtype).reshape(1, D * D * D, 3)
    if shift is not None:
        t = torch.as_tensor(shift, dtype=volume.dtype, device=volume.device).reshape(-1, 3)
        pts = pts - t[:, None, :]
    src = _rotate_points(pts, M) if pts.shape[0] == 1 else torch.matmul(pts, M)
    grid = ((2 * src + 1) / D).reshape(1, n, D * D, D, 3)
    out = torch.nn.functional.grid_sample(
        volume[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0, 0].reshape(n, D, D, D)
    return out[0] if single else out
