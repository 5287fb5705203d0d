"""Fused multiplicative layer ``(z A^T + c) * g(x)``.

Forward: one program per (``BLOCK_P`` points, ``BLOCK_N`` output features) tile; the
``z A^T`` tile accumulates over K blocks with ``tl.dot`` (fp32 accumulation), the filter is
computed in registers for the same columns, and the product is the only store.

Backward: persistent grid over point tiles, each program walking all output-column blocks:
it recomputes ``lin = z A^T + c`` and the filter (nothing saved by the forward), writes
``dlin = dout * g`` (P, h) fp32 -- the one intermediate -- and reduces the filter
gradients (``db, dW, dgamma, dmu``) and ``dc`` into its own row of ``[n_programs, ...]``
partials (deterministic fixed-order sum) and ``dx`` in registers. The two remaining
products, ``dz = dlin A`` and ``dA = dlin^T z``, are plain GEMMs and go to ``torch.mm``
(cuBLAS on GPU, in IEEE float32 whatever torch's TF32 switch says; deterministic for a
given shape and library).

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
    ieee_float32,
    load_split,
    max_programs,
    mm_split,
    on_input_device,
    or_dummy,
    point_chunks,
    weight_parts,
)

# (BLOCK_P, BLOCK_N, BLOCK_K, warps, stages). ptxas (sm_90, float32, H 128, triton 3.9 / 3.6):
# 192-255 registers, 64-180 KiB of shared memory, no spills but (128, 128, 32): 336 / 272
# bytes (``python tests/kernels/_aot_compile.py --candidates``); the full grid of 32 had ten
# that need more shared memory than an H100 has and could never launch.
FWD_CANDIDATES = [triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                  for bp, bn, bk, w, s in ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 8, 3),
                                           (64, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 8, 4))]
_CONFIGS = configs(FWD_CANDIDATES, triton.Config({"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4))
# (BLOCK_P, BLOCK_N, BLOCK_K, warps). The backward holds the filter's sine, cosine and
# envelope beside the lin tile, so it spills where the forward does not. Of the 16 in the
# grid (32, 64) x (64, 128) x (32, 64) x (4, 8), these spill at most 120 bytes per thread
# (sm_90, triton 3.9 and 3.6, both precisions); the others 0.3-3.5 KB, and one needs
# 228 KiB of shared memory, more than an H100 block may have. First: no spills (the one
# ``FIELDKERN_AUTOTUNE=0`` keeps).
BWD_CANDIDATES = [triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
                  for bp, bn, bk, w in ((32, 64, 32, 8), (32, 64, 64, 8), (32, 128, 32, 8), (64, 64, 32, 8),
                                        (32, 64, 32, 4))]
_BWD_CONFIGS = configs(BWD_CANDIDATES, triton.Config({"BLOCK_P": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4))
_KEY = ["H", "K", "D", "HAS_C", "GABOR", "MIXED"]


@triton.jit
def _lin_tile(z_ptr, a_ptr, alo_ptr, c_ptr, offs_p, mask_p, offs_n, mask_n, K,
              HAS_C: tl.constexpr, MIXED: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        zt = tl.load(z_ptr + offs_p[:, None] * K + kk[None, :], mask=mask_p[:, None] & mk[None, :], other=0.0)
        at, atl = load_split(a_ptr, alo_ptr, offs_n[None, :] * K + kk[:, None], mask_n[None, :] & mk[:, None],
                             MIXED)
        acc = mm_split(zt, at, atl, acc, MIXED)
    if HAS_C:
        acc += tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    return acc


@triton.autotune(configs=_CONFIGS, key=_KEY + ["SAVE_LIN"])
@triton.jit
def _multiplicative_layer_fwd_kernel(
    z_ptr, a_ptr, alo_ptr, c_ptr, x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, out_ptr, lin_ptr, P, H, K,
    D: tl.constexpr, HAS_C: tl.constexpr, GABOR: tl.constexpr, MIXED: tl.constexpr,
    SAVE_LIN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out = (z A^T + c) * g(x)``; ``SAVE_LIN``: also ``lin = z A^T + c`` (the stack's
    layer-by-layer forward keeps it for its backward)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < H
    lin = _lin_tile(z_ptr, a_ptr, alo_ptr, c_ptr, offs_p, mask_p, offs_n, mask_n, K,
                    HAS_C, MIXED, BLOCK_P, BLOCK_N, BLOCK_K)
    g = filter_values(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p, offs_n, mask_n,
                      D, GABOR)
    ptrs = offs_p[:, None] * H + offs_n[None, :]
    mask = mask_p[:, None] & mask_n[None, :]
    if SAVE_LIN:
        tl.store(lin_ptr + ptrs, lin, mask=mask)
    tl.store(out_ptr + ptrs, lin * g, mask=mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY + ["NEED_DW"],
                 reset_to_zero=["pc_ptr", "pw_ptr", "pb_ptr", "pg_ptr", "pm_ptr"])
@triton.jit
def _multiplicative_layer_bwd_kernel(
    gout_ptr, z_ptr, a_ptr, alo_ptr, c_ptr, x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr,
    dlin_ptr, dx_ptr, pc_ptr, pw_ptr, pb_ptr, pg_ptr, pm_ptr, P, H, K,
    D: tl.constexpr, HAS_C: tl.constexpr, GABOR: tl.constexpr, MIXED: tl.constexpr,
    NEED_DW: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(P, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    for tile in range(pid, n_tiles, nprog):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        dx = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, H, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < H
            m2 = mask_p[:, None] & mask_n[None, :]
            lin = _lin_tile(z_ptr, a_ptr, alo_ptr, c_ptr, offs_p, mask_p, offs_n, mask_n, K,
                            HAS_C, MIXED, BLOCK_P, BLOCK_N, BLOCK_K)
            s, q, e = filter_args(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p,
                                  offs_n, mask_n, D, GABOR)
            sn = sine(s)
            g = sn
            if GABOR:
                g = sn * e
            dout = tl.load(gout_ptr + offs_p[:, None] * H + offs_n[None, :], mask=m2, other=0.0)
            dlin = dout * g
            tl.store(dlin_ptr + offs_p[:, None] * H + offs_n[None, :], dlin, mask=m2)
            if HAS_C:
                tl.store(pc_ptr + pid * H + offs_n,
                         tl.load(pc_ptr + pid * H + offs_n, mask=mask_n, other=0.0) + tl.sum(dlin, axis=0),
                         mask=mask_n)
            dx = filter_backward(dout * lin, sn, cosine(s), q, e, x_ptr, w_ptr, gamma_ptr, mu_ptr,
                                 pw_ptr + pid * H * D, pb_ptr + pid * H, pg_ptr + pid * H,
                                 pm_ptr + pid * H * D, dx, offs_p, mask_p, offs_n, mask_n, offs_d,
                                 D, GABOR, NEED_DW)
        tl.store(dx_ptr + offs_p[:, None] * D + offs_d[None, :], dx,
                 mask=mask_p[:, None] & (offs_d[None, :] < D))


@on_input_device
def multiplicative_layer_forward(z, a, c, x, w, b, gamma, mu, precision, out=None, lin=None, a_parts=None):
    """z (P, K), a (H, K), c (H,) or None, x (P, D), filter params; fp32 contiguous -> (P, H).
    ``out``: a contiguous (P, H) float32 tensor to write into; ``lin``: one to receive
    ``z A^T + c`` as well; ``a_parts``: ``a`` already as ``weight_parts`` gives it."""
    P, K = z.shape
    H = a.shape[0]
    D = x.shape[1]
    if out is None:
        out = torch.empty((P, H), device=z.device, dtype=torch.float32)
    chunks = point_chunks(P, H, K, D)
    if chunks:
        a_hi, a_lo = a_parts or weight_parts(a, precision)
    for p0, p1 in chunks:
        n = p1 - p0
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_P"]), triton.cdiv(H, meta["BLOCK_N"]))  # noqa: E731
        _multiplicative_layer_fwd_kernel[grid](
            z[p0:p1], a_hi, a_lo, or_dummy(c, b), x[p0:p1], w, b, or_dummy(gamma, b), or_dummy(mu, w),
            out[p0:p1], or_dummy(lin, out)[p0:p1], n, H, K, D=D,
            HAS_C=c is not None, GABOR=gamma is not None, MIXED=precision == "mixed",
            SAVE_LIN=lin is not None,
        )
    return out


@on_input_device
def multiplicative_layer_backward(grad, z, a, c, x, w, b, gamma, mu, need_dw, precision):
    """-> dz (P, K), dA (H, K), dc (H,) or None, dx (P, D), dW (H, D), db, dgamma, dmu (or None)."""
    P, K = z.shape
    H = a.shape[0]
    D = x.shape[1]
    nprog = max_programs(z.device)
    f32 = dict(device=z.device, dtype=torch.float32)
    dlin = torch.empty((P, H), **f32)
    dx = torch.empty((P, D), **f32)
    pc = torch.zeros((nprog, H), **f32)
    pw = torch.zeros((nprog, H, D), **f32)
    pb = torch.zeros((nprog, H), **f32)
    pg = torch.zeros((nprog, H), **f32)
    pm = torch.zeros((nprog, H, D), **f32)
    chunks = point_chunks(P, H, K, D)
    if chunks:
        a_hi, a_lo = weight_parts(a, precision)
    # Every chunk adds into the same program rows (program i of each launch to row i), so
    # the partials hold sums over all points and one fixed-order reduction follows. Safe
    # with autotuning's reset_to_zero: it only zeroes when tuning, on the first launch.
    for p0, p1 in chunks:
        n = p1 - p0
        grid = lambda meta: (min(triton.cdiv(n, meta["BLOCK_P"]), nprog),)  # noqa: E731
        _multiplicative_layer_bwd_kernel[grid](
            grad[p0:p1], z[p0:p1], a_hi, a_lo, or_dummy(c, b), x[p0:p1], w, b, or_dummy(gamma, b),
            or_dummy(mu, w), dlin[p0:p1], dx[p0:p1], pc, pw, pb, pg, pm, n, H, K, D=D,
            HAS_C=c is not None, GABOR=gamma is not None, MIXED=precision == "mixed",
            NEED_DW=bool(need_dw), BLOCK_D=block(D, 2),
        )
    if precision == "mixed":
        dz = (dlin.bfloat16() @ a.bfloat16()).float()
        da = (dlin.t().bfloat16() @ z.bfloat16()).float()
    else:
        with ieee_float32():
            dz = torch.mm(dlin, a)
            da = torch.mm(dlin.t(), z)
    gabor = gamma is not None
    return (dz, da, pc.sum(0) if c is not None else None, dx, pw.sum(0), pb.sum(0),
            pg.sum(0) if gabor else None, pm.sum(0) if gabor else None)
