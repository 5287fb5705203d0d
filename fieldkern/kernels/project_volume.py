"""Batched rotated-grid projection of a volume: forward and backward kernels.

``I_b[y, x] = sum_k V(R_b^T (x, y, z_k))`` with index coordinates centred on ``D // 2``,
trilinear interpolation and zero outside the box (the convention of
:func:`fieldkern.cryoem.project_volume`).

Design: one program per (image, run of ``BLOCK`` consecutive pixels). The program rotates
its pixels' ray origins once and walks the rays along z (sample ``k`` at origin + ``k`` times
the third row of ``R``: three multiply-adds per step); the eight trilinear taps are
gathered from the volume, which for D <= 160 (16 MB in float32) stays resident in an
H100's 50 MB L2 across the whole batch. The sum along the ray lives in registers: extra
memory is the output only, O(B D^2). (Square 16 x 16 tiles were measured 1.3-1.9x slower
than runs of 256 pixels along rows on an H100, bench/RESULTS.md.)

Backward (one kernel, constexpr switches for what is needed) walks the same rays:
- volume gradient: the adjoint, scattering ``w * dI`` to the eight taps with
  relaxed ``tl.atomic_add`` (float32 atomics: the summation order, hence the last bits,
  vary run to run; documented as non-deterministic);
- rotation gradient: ``dL/dR[i, j] = sum dI * dV/dq_j * p_i`` through the spatial gradient of
  the trilinear interpolant; each program reduces its tile to 9 numbers written to a
  ``(B, n_tiles, 9)`` buffer that is summed in a fixed order afterwards (deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 64 if _INTERPRET else 256  # pixels (lanes) per program


@triton.jit
def _tile_pixels(D, BLOCK: tl.constexpr):
    """Flat pixel indices, mask and (x, y) of this program's pixels (program axis 1)."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < D * D, offs % D, offs // D


@triton.jit
def _ray_setup(rot_ptr, b, xi, yi, D):
    """Pixel -> rotated ray origin (index units, centred) and per-step increment."""
    c = D // 2
    px = (xi - c).to(tl.float32)
    py = (yi - c).to(tl.float32)
    r = rot_ptr + b * 9
    r00 = tl.load(r + 0).to(tl.float32)
    r01 = tl.load(r + 1).to(tl.float32)
    r02 = tl.load(r + 2).to(tl.float32)
    r10 = tl.load(r + 3).to(tl.float32)
    r11 = tl.load(r + 4).to(tl.float32)
    r12 = tl.load(r + 5).to(tl.float32)
    r20 = tl.load(r + 6).to(tl.float32)
    r21 = tl.load(r + 7).to(tl.float32)
    r22 = tl.load(r + 8).to(tl.float32)
    # q = R^T p: q_j = sum_i R[i, j] p_i, starting from z = -c, shifted to array indices.
    zc = -c.to(tl.float32)
    qx = r00 * px + r10 * py + r20 * zc + c
    qy = r01 * px + r11 * py + r21 * zc + c
    qz = r02 * px + r12 * py + r22 * zc + c
    return px, py, qx, qy, qz, r20, r21, r22


@triton.jit
def _sample(qx0, qy0, qz0, dx, dy, dz, k):
    """Position of sample ``k`` on each ray: ``q0 + k d`` from the origin every step (adding
    ``d`` step by step accumulated ~k ulps: 30x the reference's error in the images at D = 64)."""
    kf = k * 1.0  # int32 -> float32 (a plain int under the interpreter)
    return qx0 + kf * dx, qy0 + kf * dy, qz0 + kf * dz


@triton.jit
def _cell(qx, qy, qz):
    """Lower corner of the voxel cell holding each sample, and the fractional offsets."""
    x0f = tl.floor(qx)
    y0f = tl.floor(qy)
    z0f = tl.floor(qz)
    return (x0f.to(tl.int32), y0f.to(tl.int32), z0f.to(tl.int32), qx - x0f, qy - y0f, qz - z0f)


@triton.jit
def _tap(ix, iy, iz, pix, D):
    """Flat index of voxel ``(ix, iy, iz)`` of a ``[z, y, x]`` volume and whether it is in the
    box (outside it the volume is zero)."""
    ok = pix & (ix >= 0) & (ix < D) & (iy >= 0) & (iy < D) & (iz >= 0) & (iz < D)
    return (iz * D + iy) * D + ix, ok


@triton.jit
def project_volume_fwd_kernel(vol_ptr, rot_ptr, out_ptr, D, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs, pix, xi, yi = _tile_pixels(D, BLOCK)
    px, py, qx0, qy0, qz0, dx, dy, dz = _ray_setup(rot_ptr, b, xi, yi, D)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, D):
        qx, qy, qz = _sample(qx0, qy0, qz0, dx, dy, dz, k)
        x0, y0, z0, fx, fy, fz = _cell(qx, qy, qz)
        for corner in tl.static_range(8):
            cx = corner % 2
            cy = (corner // 2) % 2
            cz = corner // 4
            idx, ok = _tap(x0 + cx, y0 + cy, z0 + cz, pix, D)
            w = (fx if cx else 1.0 - fx) * (fy if cy else 1.0 - fy) * (fz if cz else 1.0 - fz)
            v = tl.load(vol_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            acc += w * v
    tl.store(out_ptr + b * D * D + offs, acc, mask=pix)


@triton.jit
def project_volume_bwd_kernel(
    vol_ptr, rot_ptr, grad_out_ptr, grad_vol_ptr, grad_rot_partial_ptr, D, n_tiles,
    NEED_VOLUME: tl.constexpr, NEED_ROTATION: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    offs, pix, xi, yi = _tile_pixels(D, BLOCK)
    px, py, qx0, qy0, qz0, dx, dy, dz = _ray_setup(rot_ptr, b, xi, yi, D)
    g = tl.load(grad_out_ptr + b * D * D + offs, mask=pix, other=0.0).to(tl.float32)
    # Per-lane accumulators of g * dV/dq_j and g * dV/dq_j * z (x and y are constant on a ray).
    sx = tl.zeros((BLOCK,), dtype=tl.float32)
    sy = tl.zeros((BLOCK,), dtype=tl.float32)
    sz = tl.zeros((BLOCK,), dtype=tl.float32)
    tx = tl.zeros((BLOCK,), dtype=tl.float32)
    ty = tl.zeros((BLOCK,), dtype=tl.float32)
    tz = tl.zeros((BLOCK,), dtype=tl.float32)
    c = D // 2
    for k in range(0, D):
        qx, qy, qz = _sample(qx0, qy0, qz0, dx, dy, dz, k)
        x0, y0, z0, fx, fy, fz = _cell(qx, qy, qz)
        gx = tl.zeros((BLOCK,), dtype=tl.float32)
        gy = tl.zeros((BLOCK,), dtype=tl.float32)
        gz = tl.zeros((BLOCK,), dtype=tl.float32)
        for corner in tl.static_range(8):
            cx = corner % 2
            cy = (corner // 2) % 2
            cz = corner // 4
            idx, ok = _tap(x0 + cx, y0 + cy, z0 + cz, pix, D)
            wx = fx if cx else 1.0 - fx
            wy = fy if cy else 1.0 - fy
            wz = fz if cz else 1.0 - fz
            if NEED_VOLUME:
                tl.atomic_add(grad_vol_ptr + idx, wx * wy * wz * g, mask=ok, sem="relaxed")
            if NEED_ROTATION:
                v = tl.load(vol_ptr + idx, mask=ok, other=0.0).to(tl.float32)
                sgx = 1.0 if cx else -1.0
                sgy = 1.0 if cy else -1.0
                sgz = 1.0 if cz else -1.0
                gx += sgx * wy * wz * v
                gy += wx * sgy * wz * v
                gz += wx * wy * sgz * v
        if NEED_ROTATION:
            pz = (k - c).to(tl.float32)
            sx += g * gx
            sy += g * gy
            sz += g * gz
            tx += g * gx * pz
            ty += g * gy * pz
            tz += g * gz * pz
    if NEED_ROTATION:
        # dL/dR[i, j] = sum g * dV/dq_j * p_i with p = (px, py, pz).
        base = grad_rot_partial_ptr + (b * n_tiles + tile) * 9
        tl.store(base + 0, tl.sum(sx * px, axis=0))
        tl.store(base + 1, tl.sum(sy * px, axis=0))
        tl.store(base + 2, tl.sum(sz * px, axis=0))
        tl.store(base + 3, tl.sum(sx * py, axis=0))
        tl.store(base + 4, tl.sum(sy * py, axis=0))
        tl.store(base + 5, tl.sum(sz * py, axis=0))
        tl.store(base + 6, tl.sum(tx, axis=0))
        tl.store(base + 7, tl.sum(ty, axis=0))
        tl.store(base + 8, tl.sum(tz, axis=0))


def project_volume_forward(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``volume (D, D, D)`` (float32 or bfloat16), ``rotations (B, 3, 3)`` -> ``(B, D, D)`` float32."""
    D = volume.shape[0]
    B = rotations.shape[0]
    volume = volume.contiguous()
    rotations = rotations.to(torch.float32).contiguous()
    out = torch.empty(B, D, D, device=volume.device, dtype=torch.float32)
    if B == 0:
        return out
    grid = (B, triton.cdiv(D * D, BLOCK))
    project_volume_fwd_kernel[grid](volume, rotations, out, D, BLOCK=BLOCK)
    return out


def project_volume_backward(
    volume: torch.Tensor, rotations: torch.Tensor, grad_out: torch.Tensor,
    need_volume: bool, need_rotation: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`project_volume_forward` w.r.t. the volume and the rotations (float32)."""
    D = volume.shape[0]
    B = rotations.shape[0]
    volume = volume.contiguous()
    rotations = rotations.to(torch.float32).contiguous()
    grad_out = grad_out.to(torch.float32).contiguous()
    n_tiles = triton.cdiv(D * D, BLOCK)
    grad_volume = torch.zeros(D, D, D, device=volume.device, dtype=torch.float32) if need_volume else None
    partial = (torch.empty(B, n_tiles, 9, device=volume.device, dtype=torch.float32)
               if need_rotation else None)
    if B > 0 and (need_volume or need_rotation):
        dummy = grad_out  # a valid pointer for the buffers a constexpr switch leaves unused
        project_volume_bwd_kernel[(B, n_tiles)](
            volume, rotations, grad_out,
            grad_volume if need_volume else dummy,
            partial if need_rotation else dummy,
            D, n_tiles,
            NEED_VOLUME=need_volume, NEED_ROTATION=need_rotation, BLOCK=BLOCK,
        )
    grad_rotations = partial.sum(1).view(B, 3, 3) if need_rotation else None
    return grad_volume, grad_rotations
