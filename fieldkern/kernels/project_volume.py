"""Batched rotated-grid projection of a volume: forward and backward kernels.

``I_b[y, x] = sum_k V(R_b^T (x, y, z_k))`` with index coordinates centred on ``D // 2``,
trilinear interpolation and zero outside the box (the convention of
:func:`fieldkern.cryoem.project_volume`).

Design: one program per (image, run of ``BLOCK`` consecutive pixels, or in the forward a
``TILE_W``-wide rectangle of them, chosen by autotuning). The program rotates
its pixels' ray origins once and walks the rays along z (sample ``k`` at origin + ``k`` times
the third row of ``R``: three multiply-adds per step); the eight trilinear taps are
gathered from the volume, whose paired copy (below) for D <= 160 (34 MB in float32) stays
resident in an H100's 50 MB L2 across the whole batch. The sum along the ray lives in registers: extra
memory is the output and one padded copy of the volume, O(B D^2 + D^3). (Square 16 x 16
tiles were measured 1.3-1.9x slower than runs of 256 pixels along rows on an H100, in a
version with per-tap masks and no ray clipping, bench/RESULTS.md; the rectangles are back
as candidates because the model below favours them; ray clipping also walks 5% fewer
steps on 8 x 32 rectangles than on row runs at D = 128, numpy estimate.)

Cheap taps: the launcher copies the volume once per call into a ``(D + 2)^3`` array with a
one-voxel zero border, and the kernels work in its index coordinates. Each sample is
clamped into the padded box, so every tap is a valid address: one flat index per sample
plus constant corner offsets (D + 2, (D + 2)^2), no per-tap bounds masks (the previous
version spent ~6 compares per tap on them). Where a coordinate lies outside the box the
clamp puts the sample on the border with all weight on zero voxels, so the value is 0
exactly as with the masks. Clamping does not zero the interpolant's *derivative* there
(the clamped sample sits on the kink between border and interior), so the backward
switches each whole sample off when it is outside the box (three interval tests).

Paired taps: in that copy every voxel sits next to its +x neighbour (``(D + 2)^3 x 2``,
``_paired``), so a sample's eight taps are four aligned 8-byte loads (``ld.global.v2``;
4-byte loads in bf16) instead of eight 4-byte gathers, and the backward's scatter four
8-byte atomics. Why: the forward ran at ~75 SM cycles per warp and ray step on an H200
(D = 64 and 128 alike), 3.6x its instruction-issue floor (sm_90 SASS: 168 instructions per
loop iteration of two samples), so memory access bounds it; a warp's 32 lanes hit ~24
distinct 128-byte lines per gather. ``bench/gather_model.py`` (a numpy model, not a
measurement) counts per warp and step, D = 64: 181 line lookups summed over the gathers
and 64 distinct 32-byte sectors with eight scalar loads, 91 and 62 with pairs. So pairs
halve the L1 lookups and the load instructions (143 SASS instructions per iteration now)
at about the same L2 traffic. The pairs were not timed against single taps alone; with
them the forward took 1.02 ms at D = 64 and 8.3 ms at D = 128, B = 600, on an H100
(bench/RESULTS.md, sixth session). Extra memory of the forward: the output plus
8 (D + 2)^3 bytes, 54 MiB at D = 128, B = 600 in float32.

Ray clipping: each program walks only the steps ``k`` between the earliest entry and the
latest exit, over its lanes, of the rays into the padded box (slab method, with half a
voxel of slack against rounding); lanes outside their own interval sample zeros (forward)
or are switched off (backward). For random rotations and runs of 256 pixels along rows this
skips only ~1-3% of the steps (a row spans the whole image, so some lane is always inside;
the cube-inside-rotated-cube fraction per lane is ~81%, simulated with numpy); it matters
for rotations that leave whole rows outside the box.

The forward's ``BLOCK``/``num_warps``/``TILE_W`` are autotuned per ``D`` (one config under
the interpreter, where a test forces the rectangles; ``FIELDKERN_AUTOTUNE=0`` keeps the
first, the previous fixed 256 pixels / 4 warps). Padding, clipping and tuning together took the D = 128, B = 600 forward from 13.9
to 11.0 ms on an H200 (bench/RESULTS.md).

Backward (one kernel, constexpr switches for what is needed, fixed ``BLOCK``: the rotation
gradient's partial buffer is sized by it) walks the same rays:
- volume gradient, one of ``VOLUME_GRADIENT_METHODS`` (``choose_volume_gradient``):
  ``scatter`` is the adjoint, scattering ``w * dI`` to the eight taps of the in-box
  samples with relaxed ``tl.atomic_add`` into an x-paired padded float32 buffer (four
  8-byte atomics per sample), whose two slots per voxel are added afterwards (float32
  atomics: the summation order, hence the last bits, vary run to run), each program
  walking a run of pixels along a row; ``scatter_tiled`` the same over 8-pixel-wide
  rectangles (fewer distinct sectors per warp-wide atomic, ``bench/gather_model.py``);
  ``gather`` a separate kernel (``project_volume_bwd_gather_kernel``): one thread per voxel
  walks the images in order and sums the samples within one voxel of it (64 candidates
  per image, ~8 with weight), bitwise repeatable, about 8x the arithmetic of the scatter
  and no atomics. On an H100 (D = 64 and 128, B = 600, bench/RESULTS.md, sixth session)
  ``scatter_tiled`` was the fastest and the gather cost 1.5-1.7x its fwd+bwd time;
- rotation gradient: ``dL/dR[i, j] = sum dI * dV/dq_j * p_i`` through the spatial gradient of
  the trilinear interpolant; each program reduces its tile to 9 numbers written to a
  ``(B, n_tiles, 9)`` buffer that is summed in a fixed order afterwards (deterministic).
  It walks the volume gradient's tiles when the scatter runs (the same launch), else row
  runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldkern.kernels._common import configs, interpreting, on_input_device, or_dummy
from fieldkern.ops._variants import VARIANTS, check_variant

BLOCK = 64 if interpreting() else 256  # pixels (lanes) per program of the backward

# First entry = the previous fixed launch (kept by FIELDKERN_AUTOTUNE=0). More lanes per
# thread give each thread more independent gathers in flight; fewer lanes per program give
# tighter per-program ray clipping. ``TILE_W`` > 0: the program's pixels form a rectangle
# ``TILE_W`` wide (``BLOCK / TILE_W`` rows), so a warp's 32 lanes cover e.g. 4 rows x 8
# instead of 32 pixels of one row: ``bench/gather_model.py`` counts 38% fewer distinct
# sectors per warp and step for that (a model; measured on a GPU by autotuning, as square
# tiles were slower in an earlier, masked version of the kernel on an H100).
FWD_CANDIDATES = [triton.Config({"BLOCK": bl, "TILE_W": tw}, num_warps=w)
                  for bl, w, tw in ((256, 4, 0), (128, 4, 0), (256, 8, 0), (512, 4, 0), (512, 8, 0),
                                    (256, 4, 8), (256, 4, 16), (128, 4, 8))]
_FWD_CONFIGS = configs(FWD_CANDIDATES, triton.Config({"BLOCK": 64, "TILE_W": 0}, num_warps=4))


@triton.jit
def _tile_pixels(D, BLOCK: tl.constexpr, TILE_W: tl.constexpr):
    """Flat pixel indices, mask and (x, y) of this program's pixels (program axis 1): a run
    of ``BLOCK`` consecutive pixels in row-major order, or (``TILE_W`` > 0) a ``TILE_W`` x
    ``BLOCK / TILE_W`` rectangle of the image's grid of such tiles."""
    if TILE_W == 0:
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        pix = offs < D * D
        xi = offs % D
        yi = offs // D
    else:
        tile = tl.program_id(1)
        n_x = tl.cdiv(D, TILE_W)
        lane = tl.arange(0, BLOCK)
        xi = (tile % n_x) * TILE_W + lane % TILE_W
        yi = (tile // n_x) * (BLOCK // TILE_W) + lane // TILE_W
        pix = (xi < D) & (yi < D)
        offs = yi * D + xi
    return offs, pix, xi, yi


@triton.jit
def _rotation(rot_ptr, b):
    """The nine entries of rotation ``b`` of a ``(B, 3, 3)`` array, row-major, float32."""
    r = rot_ptr + b * 9
    return (tl.load(r + 0).to(tl.float32), tl.load(r + 1).to(tl.float32), tl.load(r + 2).to(tl.float32),
            tl.load(r + 3).to(tl.float32), tl.load(r + 4).to(tl.float32), tl.load(r + 5).to(tl.float32),
            tl.load(r + 6).to(tl.float32), tl.load(r + 7).to(tl.float32), tl.load(r + 8).to(tl.float32))


@triton.jit
def _ray_setup(rot_ptr, b, xi, yi, D):
    """Pixel -> rotated ray origin (index units of the padded volume) and per-step increment."""
    c = D // 2
    px = (xi - c).to(tl.float32)
    py = (yi - c).to(tl.float32)
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = _rotation(rot_ptr, b)
    # q = R^T p: q_j = sum_i R[i, j] p_i, starting from z = -c, shifted to array indices of
    # the padded volume (+1 for the border) in the same final add, so no extra rounding.
    zc = -c.to(tl.float32)
    cp = c + 1
    qx = r00 * px + r10 * py + r20 * zc + cp
    qy = r01 * px + r11 * py + r21 * zc + cp
    qz = r02 * px + r12 * py + r22 * zc + cp
    return px, py, qx, qy, qz, r20, r21, r22


@triton.jit
def _slab(q0, d, D):
    """Real interval of ``k`` where ``q0 + k d`` lies in the padded box widened by half a voxel
    (the slack covers the rounding of both this division and the samples' q0 + k d)."""
    lo_b = -0.5
    hi_b = D + 1.5
    flat = d == 0.0  # exact axis-aligned rotations: no crossing, inside for all k or none
    ds = tl.where(flat, 1.0, d)
    t1 = (lo_b - q0) / ds
    t2 = (hi_b - q0) / ds
    inside = (q0 >= lo_b) & (q0 <= hi_b)
    t_in = tl.where(flat, tl.where(inside, -1e30, 1e30), tl.minimum(t1, t2))
    t_out = tl.where(flat, tl.where(inside, 1e30, -1e30), tl.maximum(t1, t2))
    return t_in, t_out


@triton.jit
def _k_range(qx0, qy0, qz0, dx, dy, dz, pix, D):
    """Steps ``k_start <= k < k_end`` that hold every in-box sample of this program's rays."""
    ax, bx = _slab(qx0, dx, D)
    ay, by = _slab(qy0, dy, D)
    az, bz = _slab(qz0, dz, D)
    lo = tl.maximum(tl.maximum(ax, ay), tl.maximum(az, 0.0))
    hi = tl.minimum(tl.minimum(bx, by), tl.minimum(bz, D - 1.0))
    keep = pix & (lo <= hi)
    lo = tl.where(keep, lo, 1e30)
    hi = tl.where(keep, hi, -1e30)
    # floor(lo) and floor(hi) + 1 both included: integers at the interval's ends survive
    # the division's rounding. Values are clamped to [0, D] before the float -> int cast.
    k_start = tl.minimum(tl.floor(tl.min(lo, axis=0)), D * 1.0).to(tl.int32)
    k_end = tl.minimum(tl.maximum(tl.floor(tl.max(hi, axis=0)) + 2.0, 0.0), D * 1.0).to(tl.int32)
    return k_start, k_end


@triton.jit
def _sample(qx0, qy0, qz0, dx, dy, dz, k):
    """Position of sample ``k`` on each ray: ``q0 + k d`` from the origin every step (adding
    ``d`` step by step accumulated ~k ulps: 30x the reference's error in the images at D = 64)."""
    kf = k * 1.0  # int32 -> float32 (a plain int under the interpreter)
    return qx0 + kf * dx, qy0 + kf * dy, qz0 + kf * dz


@triton.jit
def _axis(q, D):
    """Clamp one padded coordinate into [0, D + 1]; lower tap index in [0, D] (so the upper
    tap, +1, is still in the array) and the fractional offset. A coordinate clamped to
    D + 1 gets index D and offset 1: all weight on the zero border, like one clamped to 0."""
    qc = tl.minimum(tl.maximum(q, 0.0), D + 1.0)
    i0 = tl.minimum(tl.floor(qc), D * 1.0)
    return i0.to(tl.int32), qc - i0


@triton.jit
def _cell(qx, qy, qz, D):
    """Flat padded-volume index of the lower corner of each sample's cell, and the offsets."""
    x0, fx = _axis(qx, D)
    y0, fy = _axis(qy, D)
    z0, fz = _axis(qz, D)
    Dp = D + 2
    return (z0 * Dp + y0) * Dp + x0, fx, fy, fz


@triton.jit
def _tap_pair(pair_ptr, idx):
    """Voxels ``idx`` and ``idx + 1`` (along x) of the padded volume, float32, as one
    8-byte (4 in bf16) load from the x-paired copy (``_paired``)."""
    two = tl.arange(0, 2)
    v = tl.load(pair_ptr + (idx * 2)[:, None] + two[None, :]).to(tl.float32)
    return tl.split(v)


@triton.jit
def _scatter_pair(pair_ptr, idx, v0, v1, mask):
    """Add ``v0`` / ``v1`` to voxels ``idx`` / ``idx + 1`` of an x-paired buffer: one 8-byte
    float32 atomic (``red.global.add.v2.f32`` on sm_90) instead of two."""
    two = tl.arange(0, 2)
    tl.atomic_add(pair_ptr + (idx * 2)[:, None] + two[None, :], tl.join(v0, v1),
                  mask=mask[:, None] & (two[None, :] < 2), sem="relaxed")


@triton.jit
def _in_box(qx, qy, qz, D):
    """Samples whose taps reach the interior, [0, D + 1) per padded coordinate: q = -1 has a
    one-sided derivative (weight 0 on the first voxel, slope from it), q = D neither."""
    top = D + 1.0
    return (qx >= 0.0) & (qx < top) & (qy >= 0.0) & (qy < top) & (qz >= 0.0) & (qz < top)


@triton.autotune(configs=_FWD_CONFIGS, key=["D"])
@triton.jit
def project_volume_fwd_kernel(vol_ptr, rot_ptr, out_ptr, D, BLOCK: tl.constexpr, TILE_W: tl.constexpr):
    """``vol_ptr``: the x-paired zero-bordered volume (``_paired``)."""
    b = tl.program_id(0)
    offs, pix, xi, yi = _tile_pixels(D, BLOCK, TILE_W)
    px, py, qx0, qy0, qz0, dx, dy, dz = _ray_setup(rot_ptr, b, xi, yi, D)
    k_start, k_end = _k_range(qx0, qy0, qz0, dx, dy, dz, pix, D)
    Dp = D + 2
    plane = Dp * Dp
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(k_start, k_end):
        qx, qy, qz = _sample(qx0, qy0, qz0, dx, dy, dz, k)
        base, fx, fy, fz = _cell(qx, qy, qz, D)
        for corner in tl.static_range(4):
            cy = corner % 2
            cz = corner // 2
            v0, v1 = _tap_pair(vol_ptr, base + (cz * plane + cy * Dp))
            wyz = (fy if cy else 1.0 - fy) * (fz if cz else 1.0 - fz)
            acc += ((1.0 - fx) * wyz) * v0 + (fx * wyz) * v1
    # A NaN or inf in the rotation (a diverged pose) makes the image NaN, as in the
    # reference: its samples are clamped into the box and would give a plausible image.
    # The ray origins hold all nine entries.
    acc += 0.0 * (qx0 + qy0 + qz0)
    tl.store(out_ptr + b * D * D + offs, acc, mask=pix)


@triton.jit
def _store_rotation_partial(out_ptr, sx, sy, sz, tx, ty, tz, px, py):
    """This tile's 9 entries of dL/dR[i, j] = sum g * dV/dq_j * p_i, p = (px, py, pz): the
    lanes' ``s_j = sum_k g dV/dq_j`` times px and py, and ``t_j = sum_k g dV/dq_j p_z``."""
    tl.store(out_ptr + 0, tl.sum(sx * px, axis=0))
    tl.store(out_ptr + 1, tl.sum(sy * px, axis=0))
    tl.store(out_ptr + 2, tl.sum(sz * px, axis=0))
    tl.store(out_ptr + 3, tl.sum(sx * py, axis=0))
    tl.store(out_ptr + 4, tl.sum(sy * py, axis=0))
    tl.store(out_ptr + 5, tl.sum(sz * py, axis=0))
    tl.store(out_ptr + 6, tl.sum(tx, axis=0))
    tl.store(out_ptr + 7, tl.sum(ty, axis=0))
    tl.store(out_ptr + 8, tl.sum(tz, axis=0))


@triton.jit
def project_volume_bwd_kernel(
    vol_ptr, rot_ptr, grad_out_ptr, grad_vol_ptr, grad_rot_partial_ptr, D, n_tiles,
    NEED_VOLUME: tl.constexpr, NEED_ROTATION: tl.constexpr, BLOCK: tl.constexpr, TILE_W: tl.constexpr,
):
    """``vol_ptr``: the x-paired zero-bordered volume (``_paired``); ``grad_vol_ptr``: an
    x-paired ``(D + 2)^3 x 2`` buffer of the same layout (its border collects the weights of taps outside the box and is discarded)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    offs, pix, xi, yi = _tile_pixels(D, BLOCK, TILE_W)
    px, py, qx0, qy0, qz0, dx, dy, dz = _ray_setup(rot_ptr, b, xi, yi, D)
    k_start, k_end = _k_range(qx0, qy0, qz0, dx, dy, dz, pix, D)
    g = tl.load(grad_out_ptr + b * D * D + offs, mask=pix, other=0.0).to(tl.float32)
    Dp = D + 2
    plane = Dp * Dp
    # Per-lane accumulators of g * dV/dq_j and g * dV/dq_j * z (x and y are constant on a ray).
    sx = tl.zeros((BLOCK,), dtype=tl.float32)
    sy = tl.zeros((BLOCK,), dtype=tl.float32)
    sz = tl.zeros((BLOCK,), dtype=tl.float32)
    tx = tl.zeros((BLOCK,), dtype=tl.float32)
    ty = tl.zeros((BLOCK,), dtype=tl.float32)
    tz = tl.zeros((BLOCK,), dtype=tl.float32)
    c = D // 2
    for k in range(k_start, k_end):
        qx, qy, qz = _sample(qx0, qy0, qz0, dx, dy, dz, k)
        ok = pix & _in_box(qx, qy, qz, D)
        base, fx, fy, fz = _cell(qx, qy, qz, D)
        gx = tl.zeros((BLOCK,), dtype=tl.float32)
        gy = tl.zeros((BLOCK,), dtype=tl.float32)
        gz = tl.zeros((BLOCK,), dtype=tl.float32)
        for corner in tl.static_range(4):
            cy = corner % 2
            cz = corner // 2
            off = base + (cz * plane + cy * Dp)
            wy = fy if cy else 1.0 - fy
            wz = fz if cz else 1.0 - fz
            if NEED_VOLUME:
                wg = wy * wz * g
                _scatter_pair(grad_vol_ptr, off, (1.0 - fx) * wg, fx * wg, ok)
            if NEED_ROTATION:
                v0, v1 = _tap_pair(vol_ptr, off)
                sgy = 1.0 if cy else -1.0
                sgz = 1.0 if cz else -1.0
                vx = (1.0 - fx) * v0 + fx * v1  # interpolated along x
                gx += wy * wz * (v1 - v0)
                gy += sgy * wz * vx
                gz += wy * sgz * vx
        if NEED_ROTATION:
            # Out of the box the clamped sample sits on a kink of the interpolant: its
            # slope is not the zero-padded volume's (0), so the whole sample is dropped.
            gs = tl.where(ok, g, 0.0)
            pz = (k - c).to(tl.float32)
            sx += gs * gx
            sy += gs * gy
            sz += gs * gz
            tx += gs * gx * pz
            ty += gs * gy * pz
            tz += gs * gz * pz
    if NEED_ROTATION:
        _store_rotation_partial(grad_rot_partial_ptr + (b * n_tiles + tile) * 9, sx, sy, sz, tx, ty, tz, px, py)

# voxels per program of the gather backward: one per thread at 4 warps (ptxas sm_90: 128
# registers, 1133 SASS instructions per image; 93 and 1460 before the candidates' positions
# were stepped from the first one)
BLOCK_VOXELS = 64 if interpreting() else 128


@triton.jit
def project_volume_bwd_gather_kernel(grad_out_ptr, rot_ptr, grad_vol_ptr, D, B,
                                     BLOCK_V: tl.constexpr, REACH: tl.constexpr = 1.733):
    """Deterministic volume gradient (the adjoint without atomics): for each voxel v, the sum
    over images, in order, of ``dI[y, x] * tri(q - v)`` over the samples ``(x, y, k)`` whose
    position ``q = R^T ((x, y, k) - c) + c`` lies within one voxel of v. Those lie in a box
    of half-width sqrt(3) around ``R (v - c) + c`` in the image frame (``REACH``, widened
    against rounding; the box stays under 4 wide): 4 x 4 pixel columns of 4 slices each,
    ~8 of the 64 with nonzero weight. ``grad_vol_ptr``: ``(D, D, D)``."""
    offs = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    live = offs < D * D * D
    c = D // 2
    cf = c * 1.0
    vx = (offs % D) * 1.0
    vy = ((offs // D) % D) * 1.0
    vz = (offs // (D * D)) * 1.0
    ex = vx - cf
    ey = vy - cf
    ez = vz - cf
    top = D - 1.0
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for b in range(0, B):
        r00, r01, r02, r10, r11, r12, r20, r21, r22 = _rotation(rot_ptr, b)
        # first candidate sample index per axis: ceil(u + c - reach), u = R (v - c)
        sx0 = -tl.floor(-(r00 * ex + r01 * ey + r02 * ez + (cf - REACH)))
        sy0 = -tl.floor(-(r10 * ex + r11 * ey + r12 * ez + (cf - REACH)))
        sz0 = -tl.floor(-(r20 * ex + r21 * ey + r22 * ez + (cf - REACH)))
        # the first candidate's position in the volume minus the voxel's; the others step
        # from it by whole rows of R (one add per coordinate instead of three multiply-adds;
        # the weights are continuous in the position, so the rounding of the steps only
        # moves them by ulps)
        px0 = sx0 - cf
        py0 = sy0 - cf
        pz0 = sz0 - cf
        ex0 = r00 * px0 + r10 * py0 + r20 * pz0 + cf - vx
        ey0 = r01 * px0 + r11 * py0 + r21 * pz0 + cf - vy
        ez0 = r02 * px0 + r12 * py0 + r22 * pz0 + cf - vz
        for col in tl.static_range(16):
            sx = sx0 + (col % 4)
            sy = sy0 + (col // 4)
            pix = live & (sx >= 0.0) & (sx <= top) & (sy >= 0.0) & (sy <= top)
            g = tl.load(grad_out_ptr + b * D * D + sy.to(tl.int32) * D + sx.to(tl.int32), mask=pix,
                        other=0.0)
            cx = ex0 + ((col % 4) * r00 + (col // 4) * r10)
            cy = ey0 + ((col % 4) * r01 + (col // 4) * r11)
            cz = ez0 + ((col % 4) * r02 + (col // 4) * r12)
            w = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for oz in tl.static_range(4):
                sz = sz0 + oz
                dx = cx + oz * r20
                dy = cy + oz * r21
                dz = cz + oz * r22
                wz = (tl.maximum(1.0 - tl.abs(dx), 0.0) * tl.maximum(1.0 - tl.abs(dy), 0.0)
                      * tl.maximum(1.0 - tl.abs(dz), 0.0))
                w += tl.where((sz >= 0.0) & (sz <= top), wz, 0.0)
            acc += w * g
    tl.store(grad_vol_ptr + offs, acc, mask=live)


def _paired(volume: torch.Tensor) -> torch.Tensor:
    """``(D + 2, D + 2, D + 2, 2)`` copy, same dtype: the volume with a one-voxel zero border,
    each voxel next to its +x neighbour (``[..., x, 1] = [..., x + 1, 0]``), so the kernels
    fetch the two x-taps of a sample in one aligned 8-byte load. One 2 D^3 copy per call,
    against B D^3 samples that then need no bounds tests and half the load instructions."""
    D = volume.shape[0]
    pairs = volume.new_zeros((D + 2, D + 2, D + 2, 2))  # one buffer, no padded temporaries
    pairs[1:-1, 1:-1, 1:-1, 0] = volume
    pairs[1:-1, 1:-1, :-2, 1] = volume
    return pairs


def _n_programs(D: int, block: int, tile_w: int) -> int:
    """Programs per image for ``_tile_pixels``."""
    if tile_w == 0:
        return triton.cdiv(D * D, block)
    return triton.cdiv(D, tile_w) * triton.cdiv(D, block // tile_w)


@on_input_device
def project_volume_forward(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``volume (D, D, D)`` (float32 or bfloat16), ``rotations (B, 3, 3)`` -> ``(B, D, D)`` float32."""
    D = volume.shape[0]
    B = rotations.shape[0]
    rotations = rotations.to(torch.float32).contiguous()
    out = torch.empty(B, D, D, device=volume.device, dtype=torch.float32)
    if B == 0:
        return out
    grid = lambda meta: (B, _n_programs(D, meta["BLOCK"], meta["TILE_W"]))  # noqa: E731
    project_volume_fwd_kernel[grid](_paired(volume), rotations, out, D)
    return out


#: How the backward may make the volume gradient (``fieldkern.ops.set_variant``'s
#: ``volume_gradient``): the scatter walking runs of a row or 8-pixel-wide rectangles (as
#: the forward's ``TILE_W`` candidates), or the gather kernel.
VOLUME_GRADIENT_METHODS = VARIANTS["volume_gradient"][1:]
assert VOLUME_GRADIENT_METHODS == ("scatter", "scatter_tiled", "gather")


def choose_volume_gradient(requested: str, *, deterministic: bool) -> str:
    """The volume gradient's method: "auto" takes ``scatter_tiled``, the fastest on an H100
    at D = 64 and 128, B = 600 (bench/RESULTS.md, sixth session), or under ``deterministic``
    (``torch.use_deterministic_algorithms(True)``) ``gather``, the only bitwise-repeatable
    one. A named method runs as named; a scatter under ``deterministic`` raises
    RuntimeError (its float32 atomics vary run to run)."""
    check_variant("volume_gradient", requested)
    if requested == "auto":
        return "gather" if deterministic else "scatter_tiled"
    if deterministic and requested != "gather":
        raise RuntimeError(
            f"fieldkern: volume_gradient={requested!r} sums with float32 atomics, which vary run to run, "
            "but torch.use_deterministic_algorithms(True) is set: use 'gather' or 'auto'")
    return requested


@on_input_device
def project_volume_backward(
    volume: torch.Tensor, rotations: torch.Tensor, grad_out: torch.Tensor, *,
    need_volume: bool, need_rotation: bool, variant: str = "auto", deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`project_volume_forward` w.r.t. the volume and the rotations
    (float32). The volume gradient is made as ``choose_volume_gradient(variant,
    deterministic=...)`` says: the scatter kernel with float32 atomics, or the gather
    kernel (no atomics, bitwise repeatable)."""
    # without a volume gradient nothing is summed by atomics: no conflict with determinism
    method = choose_volume_gradient(variant, deterministic=deterministic and need_volume)
    D = volume.shape[0]
    B = rotations.shape[0]
    rotations = rotations.to(torch.float32).contiguous()
    grad_out = grad_out.to(torch.float32).contiguous()
    scatter = need_volume and method != "gather"
    tile_w = 8 if scatter and method == "scatter_tiled" else 0
    n_tiles = _n_programs(D, BLOCK, tile_w)
    dev = volume.device
    grad_pairs = torch.zeros(D + 2, D + 2, D + 2, 2, device=dev, dtype=torch.float32) if scatter else None
    partial = torch.empty(B, n_tiles, 9, device=dev, dtype=torch.float32) if need_rotation else None
    if B > 0 and (scatter or need_rotation):
        dummy = grad_out  # a valid pointer for the buffers a constexpr switch leaves unused
        project_volume_bwd_kernel[(B, n_tiles)](
            _paired(volume) if need_rotation else dummy, rotations, grad_out,
            or_dummy(grad_pairs, dummy), or_dummy(partial, dummy),
            D, n_tiles,
            NEED_VOLUME=scatter, NEED_ROTATION=need_rotation, BLOCK=BLOCK, TILE_W=tile_w,
        )
    grad_volume = None
    if scatter:
        # voxel x collects its own slot and the +x slot of voxel x - 1
        grad_volume = grad_pairs[1:-1, 1:-1, 1:-1, 0] + grad_pairs[1:-1, 1:-1, :-2, 1]
    elif need_volume:
        grad_volume = torch.empty(D, D, D, device=dev, dtype=torch.float32)
        project_volume_bwd_gather_kernel[(triton.cdiv(D ** 3, BLOCK_VOXELS),)](
            grad_out, rotations, grad_volume, D, B, BLOCK_V=BLOCK_VOXELS)
    grad_rotations = partial.sum(1).view(B, 3, 3) if need_rotation else None
    return grad_volume, grad_rotations
