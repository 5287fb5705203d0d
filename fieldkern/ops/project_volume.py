"""Batched rotated-grid projection of a volume: ``(D, D, D), (B, 3, 3) -> (B, D, D)``.

``I_b[y, x] = sum_k V(R_b^T (x, y, z_k))`` with ``(x, y, z_k)`` the centred voxel coordinates
(index minus ``D // 2``) of the output pixel and slice ``k``, trilinear interpolation, zero
outside the box; volumes are indexed ``[z, y, x]``, images ``[y, x]``. The Triton path walks
each pixel's ray in registers (:mod:`fieldkern.kernels.project_volume`); the reference
below (:func:`project_volume_reference`, which alone takes block sizes) samples with
``grid_sample`` in blocks of images and slices.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from fieldkern.backend import resolve
from fieldkern.checks import check_chunk, check_rotations, check_volume
from fieldkern.ops._variants import get_variant

#: Default number of sample points (images x slices x D^2) per block of the reference:
#: 2^22 keeps a block's working set (grid, samples, their gradients) near a hundred MB in
#: float32. Measured: the simulation's projections (3000 images at box 40 on a 2-core CPU)
#: took 6.4 s in blocks of 2^22 points against 8.5 s in blocks of 2^24; the images are the
#: same, only the blocks differ.
DEFAULT_MAX_POINTS = 1 << 22


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
    # grid_sample gives zeros for NaN sample positions: a non-finite rotation (a diverged
    # pose) would project to a plausible empty image instead of NaN
    poison = 0.0 * rotations.sum((1, 2))
    return out[0, 0].sum(1).reshape(b, D, D) + poison[:, None, None]


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


# --- Triton path: torch.library custom ops (see fieldkern/ops/mfn_stack.py for why
# custom_op). ``volume_gradient`` is read when the op is called and used by its backward.


@torch.library.custom_op("fieldkern::project_volume", mutates_args=())
def _project_volume_op(volume: torch.Tensor, rotations: torch.Tensor, volume_gradient: str) -> torch.Tensor:
    from fieldkern.kernels.project_volume import project_volume_forward

    return project_volume_forward(volume, rotations)


@_project_volume_op.register_fake
def _(volume, rotations, volume_gradient):
    D = volume.shape[0]
    return volume.new_empty((rotations.shape[0], D, D), dtype=torch.float32)


@torch.library.custom_op("fieldkern::project_volume_backward", mutates_args=())
def _project_volume_backward_op(
    volume: torch.Tensor, rotations: torch.Tensor, grad: torch.Tensor, need_volume: bool, need_rotation: bool,
    volume_gradient: str, deterministic: bool,
) -> list[torch.Tensor]:
    from fieldkern.kernels.project_volume import project_volume_backward

    dv, dr = project_volume_backward(volume, rotations, grad, need_volume=need_volume, need_rotation=need_rotation,
                                     variant=volume_gradient, deterministic=deterministic)
    return [dv if dv is not None else grad.new_empty((0,)), dr if dr is not None else grad.new_empty((0,))]


@_project_volume_backward_op.register_fake
def _(volume, rotations, grad, need_volume, need_rotation, volume_gradient, deterministic):
    D = volume.shape[0]
    return [grad.new_empty((D, D, D) if need_volume else (0,)),
            grad.new_empty((rotations.shape[0], 3, 3) if need_rotation else (0,))]


def _project_volume_setup_context(ctx, inputs, output):
    volume, rotations, ctx.volume_gradient = inputs
    ctx.save_for_backward(volume, rotations)


def _project_volume_autograd_backward(ctx, grad):
    volume, rotations = ctx.saved_tensors
    need_v, need_r = ctx.needs_input_grad[:2]
    # torch.use_deterministic_algorithms(True) when the backward runs selects the gather
    # kernel for the volume gradient under "auto": no atomics, the same bits every run
    dv, dr = torch.ops.fieldkern.project_volume_backward(
        volume, rotations, grad.contiguous(), bool(need_v), bool(need_r), ctx.volume_gradient,
        torch.are_deterministic_algorithms_enabled(),
    )
    return (dv.to(volume.dtype) if need_v else None, dr.to(rotations.dtype) if need_r else None, None)


torch.library.register_autograd("fieldkern::project_volume", _project_volume_autograd_backward,
                                setup_context=_project_volume_setup_context)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def project_volume(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Project a ``(D, D, D)`` volume under ``(B, 3, 3)`` rotations: ``(B, D, D)`` images.

    ``I_b[y, x] = sum_k V(R_b^T (x, y, z_k))``: centred voxel coordinates, trilinear
    interpolation, zero outside the box. Differentiable with respect to the volume and the
    rotations; memory bounded independently of B on both paths.

    Triton path (float32 or bfloat16 volumes; output and gradients accumulate in float32):
    the volume gradient comes from the ``volume_gradient`` variant
    (:mod:`fieldkern.ops._variants`): by default a scatter with float32 atomics, whose last
    bits vary from run to run, or under ``torch.use_deterministic_algorithms(True)`` a
    gather kernel that sums each voxel's samples in a fixed order. Reference path (any
    floating dtype): :func:`project_volume_reference` with its default blocks; call it
    directly to choose them.
    """
    check_volume("volume", volume)
    check_rotations("rotations", rotations)
    if rotations.device != volume.device:
        raise ValueError(
            f"rotations must be on the volume's device {volume.device}, got {rotations.device}"
        )
    if resolve("project_volume", volume) == "triton" and volume.dtype in _KERNEL_DTYPES:
        out = _project_volume_op(volume.contiguous(), rotations.to(torch.float32).contiguous(),
                                 get_variant("volume_gradient"))
        return out if volume.dtype == torch.float32 else out.to(volume.dtype)
    return project_volume_reference(volume, rotations)
