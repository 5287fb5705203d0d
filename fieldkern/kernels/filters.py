"""Fused Fourier / Gabor filter ``g = [exp(-gamma/2 |x - mu|^2)] sin(x W^T + b)``.

Forward: one program per (``BLOCK_P`` points, ``BLOCK_H`` filters) tile; the sine argument
(always fp32) and the envelope live in registers only, the output tile is the one store.

Backward: persistent grid over point tiles; each program walks all filter blocks of its
tile, recomputes ``sin``/``cos``/envelope from ``x`` (nothing saved by the forward), keeps
``dx`` in registers (one store per tile) and adds ``db, dW (if trainable), dgamma, dmu`` into
its own row of ``[n_programs, ...]`` partial buffers; the launcher sums the rows in fixed
order, so the result is deterministic.

Both launchers walk the points in ``point_chunks`` (one launch per chunk; a single chunk
below ``_common.MAX_ELEMENTS``), since the kernels' offsets are int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldkern.kernels._common import (
    block,
    configs,
    cosine,
    sine,
    filter_args,
    filter_backward,
    filter_values,
    max_programs,
    on_input_device,
    or_dummy,
    point_chunks,
)

_CONFIGS = configs(
    [triton.Config({"BLOCK_P": bp, "BLOCK_H": bh}, num_warps=w)
     for bp in (64, 128) for bh in (32, 64, 128) for w in (4, 8)],
    triton.Config({"BLOCK_P": 32, "BLOCK_H": 16}, num_warps=4),
)
_BWD_CONFIGS = configs(
    [triton.Config({"BLOCK_P": bp, "BLOCK_H": bh}, num_warps=w)
     for bp in (32, 64, 128) for bh in (32, 64) for w in (4, 8)],
    triton.Config({"BLOCK_P": 32, "BLOCK_H": 16}, num_warps=4),
)


@triton.autotune(configs=_CONFIGS, key=["H", "D", "GABOR"])
@triton.jit
def _filter_fwd_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, out_ptr, P, H,
                       D: tl.constexpr, GABOR: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_p = offs_p < P
    mask_h = offs_h < H
    g = filter_values(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p, offs_h, mask_h,
                      D, GABOR)
    tl.store(out_ptr + offs_p[:, None] * H + offs_h[None, :], g,
             mask=mask_p[:, None] & mask_h[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["H", "D", "GABOR", "NEED_DW"],
                 reset_to_zero=["pw_ptr", "pb_ptr", "pg_ptr", "pm_ptr"])
@triton.jit
def _filter_bwd_kernel(gout_ptr, x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr,
                       dx_ptr, pw_ptr, pb_ptr, pg_ptr, pm_ptr, P, H,
                       D: tl.constexpr, GABOR: tl.constexpr, NEED_DW: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(P, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    for tile in range(pid, n_tiles, nprog):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        dx = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            s, q, e = filter_args(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p,
                                  offs_h, mask_h, D, GABOR)
            dg = tl.load(gout_ptr + offs_p[:, None] * H + offs_h[None, :],
                         mask=mask_p[:, None] & mask_h[None, :], other=0.0)
            dx = filter_backward(dg, sine(s), cosine(s), q, e, x_ptr, w_ptr, gamma_ptr, mu_ptr,
                                 pw_ptr + pid * H * D, pb_ptr + pid * H, pg_ptr + pid * H,
                                 pm_ptr + pid * H * D, dx, offs_p, mask_p, offs_h, mask_h, offs_d,
                                 D, GABOR, NEED_DW)
        tl.store(dx_ptr + offs_p[:, None] * D + offs_d[None, :], dx,
                 mask=mask_p[:, None] & (offs_d[None, :] < D))


@on_input_device
def filter_forward(x, w, b, gamma=None, mu=None):
    """x (P, D), w (H, D), b (H,), gamma (H,) / mu (H, D) or None; fp32 contiguous -> (P, H) fp32."""
    P, D = x.shape
    H = w.shape[0]
    out = torch.empty((P, H), device=x.device, dtype=torch.float32)
    for p0, p1 in point_chunks(P, H, D):
        n = p1 - p0
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_P"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
        _filter_fwd_kernel[grid](x[p0:p1], w, b, or_dummy(gamma, b), or_dummy(mu, w), out[p0:p1], n, H,
                                 D=D, GABOR=gamma is not None)
    return out


@on_input_device
def filter_backward_launch(grad, x, w, b, gamma=None, mu=None, need_dw=True):
    """grad (P, H) -> dx (P, D), dW (H, D) (zeros unless need_dw), db (H,), dgamma, dmu (or None)."""
    P, D = x.shape
    H = w.shape[0]
    nprog = max_programs(x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty((P, D), **f32)
    pw = torch.zeros((nprog, H, D), **f32)
    pb = torch.zeros((nprog, H), **f32)
    pg = torch.zeros((nprog, H), **f32)
    pm = torch.zeros((nprog, H, D), **f32)
    # Every chunk adds into the same program rows (program i of each launch to row i), so
    # the partials hold sums over all points and one fixed-order reduction follows. Safe
    # with autotuning's reset_to_zero: it only zeroes when tuning, on the first launch.
    for p0, p1 in point_chunks(P, H, D):
        n = p1 - p0
        grid = lambda meta: (min(triton.cdiv(n, meta["BLOCK_P"]), nprog),)  # noqa: E731
        _filter_bwd_kernel[grid](grad[p0:p1], x[p0:p1], w, b, or_dummy(gamma, b), or_dummy(mu, w),
                                 dx[p0:p1], pw, pb, pg, pm, n, H, D=D,
                                 GABOR=gamma is not None, NEED_DW=bool(need_dw),
                                 BLOCK_D=block(D, 2))
    gabor = gamma is not None
    return dx, pw.sum(0), pb.sum(0), pg.sum(0) if gabor else None, pm.sum(0) if gabor else None
