"""Fully fused MFN stack: trunk, every head, residual sums and ReLU in one launch.

Design (forward, ``_mfn_stack_fwd_kernel``):

* Persistent grid (``2 x #SMs`` programs on CUDA); each program loops over tiles of
  ``BLOCK_P`` points. Per tile and layer, the output features are produced in column blocks
  of ``BLOCK_N``: ``acc = z_{i-1} A_i^T[:, n-block]`` accumulates over K blocks with
  ``tl.dot`` (fp32 accumulation), the filter ``g_i`` for the same columns is computed in
  registers from ``x`` (sine arguments always fp32), ``z_i = (acc + c_i) * g_i`` is formed in
  registers, and the head ``z_i U_i^T`` accumulates block by block. After the last block:
  ``+ d_i``, ReLU, the residual running sum, and the one store of the head outputs
  ``(L, P, O)``.
* Register tensors cannot be sliced, and ``A_i`` (256 KiB fp32 at H = 256) does not fit on
  chip, so ``z_i`` is handed to the next layer through a per-program scratch pair
  (``2 x BLOCK_P x BLOCK_H`` fp32, written once and read ``BLOCK_H / BLOCK_N`` times per
  layer). This *is* global memory, but only one pair per program exists (H100, 264
  programs, H = 256: 35 MB touched at BLOCK_P = 64; allocated for the largest tuned
  BLOCK_P, 69 MB), reused by every tile, so it is largely L2-resident and independent of
  the number of points.
  Nothing of size ``P x H`` is ever written.
* Hidden width padded to ``BLOCK_H`` (power of two >= 16) by masks: padded columns have
  ``W = b = 0`` so ``g = 0`` and stay exactly zero through every layer.
* Products: mixed precision uses bf16 tensor-core products. float32 uses ``tf32x3`` in the
  forward (each operand split into a TF32 head and a TF32 remainder, three tensor-core
  products summed in fp32: error at fp32 rounding level, unlike plain TF32) and the FMA
  path (``ieee``) in the backward, where the split operands' extra registers made it
  slower (H200 measurements in bench/RESULTS.md). ``BLOCK_P``, ``BLOCK_N`` and ``BLOCK_K``
  are autotuned; the hidden width is padded to at least the largest column block.

Backward (``_mfn_stack_bwd_kernel``), per tile, nothing saved from the forward pass, same
column-blocked structure (register tiles are ``BLOCK_P x BLOCK_N``, never full width):

1. recompute the trunk, storing ``lin_i = z_{i-1} A_i^T + c_i`` (i >= 1) in the program's
   scratch and, for ReLU heads, the head pre-activations ``(BLOCK_P, O)``;
2. walk the layers top-down. Head: ``dy`` (the running sum of the output gradients from the
   top for residual outputs), ReLU mask, ``dd_i``. Then per column block: recompute
   ``g_i`` (sin, cos, envelope) from ``x`` and ``z_i = lin_i g_i``; ``dU_i``; ``dz_i`` = the
   scratch ``dz`` (from layer i+1) plus ``dh_i U_i`` (only for ``i >= detach_heads_below``);
   ``dlin_i = dz_i g_i`` -> scratch; the filter gradients ``db, dW (if trainable), dgamma,
   dmu`` and ``dx`` from ``dz_i lin_i``; ``z_{i-1}`` recomputed -> scratch. Then
   ``dA_i = dlin_i^T z_{i-1}`` block by block and ``dz_{i-1} = dlin_i A_i`` -> scratch.

Scratch of the backward: ``L + 2`` tiles of ``BLOCK_P x BLOCK_H`` fp32 per program (dz,
lin_1..lin_{L-1}, z_{i-1}, dlin_i), ``#SMs`` programs: bounded by the grid, not by the
number of points. Costs: one extra H x H product per layer (the recompute) and all sines
computed three times (forward recompute, layer i, as z_{i-1} for layer i+1).

Reductions over points are deterministic: each program adds its tiles into its own row of
``[n_programs, ...]`` partial buffers (plain load/add/store, no atomics), and the launcher
sums the rows in a fixed order with ``torch.sum``. ``dx`` is per point, written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fieldkern.kernels._common import (
    IEEE,
    TF32X3,
    accumulate,
    block,
    configs,
    filter_args,
    filter_backward,
    filter_values,
    interpreting,
    max_programs,
    mm,
)


def _config(bp, warps, bn, bk):
    return triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=2)


# (BLOCK_P, warps, BLOCK_N, BLOCK_K). The forward's products run on tensor cores in both
# precisions (tf32x3 / bf16), the backward's in mixed precision only; the register tiles are BLOCK_P x BLOCK_N, so N and K stay at 32-64: ptxas (sm_90, triton
# 3.9) reports 255 registers for every variant with BLOCK_P >= 64, and spills of 32-700
# bytes per thread that grow with BLOCK_N and BLOCK_K (bench/RESULTS.md). The first
# config is the one ``FIELDKERN_AUTOTUNE=0`` keeps: the least spilling at BLOCK_P = 64.
FWD_CANDIDATES = [_config(*c) for c in ((64, 4, 32, 32), (128, 8, 64, 32), (64, 4, 64, 32),
                                         (128, 4, 32, 32), (32, 4, 32, 32), (64, 8, 64, 64))]
# (64, 8, 32, 32) and (64, 8, 64, 32) were candidates too: on an H200 with triton 3.6 the
# first made an illegal memory access and the second gave dx 0.2% off (compiler issue with
# 8 warps at BLOCK_P = 64, not understood); tests/kernels/test_kernels_gpu.py checks every
# candidate against the reference.
BWD_CANDIDATES = [_config(*c) for c in ((32, 4, 32, 32), (64, 4, 32, 32), (128, 8, 32, 32))]
_INTERP_CONFIG = _config(32, 4, 32, 32)
_FWD_CONFIGS = configs(FWD_CANDIDATES, _INTERP_CONFIG)
_BWD_CONFIGS = configs(BWD_CANDIDATES, _INTERP_CONFIG)
# Buffers are sized for every candidate, whichever subset autotuning may use (tests force
# single candidates): scratch for the largest BLOCK_P, hidden width padded to at least the
# largest column block, persistent grid for the smallest BLOCK_P.
_FWD_ALL = [_INTERP_CONFIG] if interpreting() else FWD_CANDIDATES
_BWD_ALL = [_INTERP_CONFIG] if interpreting() else BWD_CANDIDATES
_MAX_BLOCK_P_FWD = max(c.kwargs["BLOCK_P"] for c in _FWD_ALL)
_MAX_BLOCK_P_BWD = max(c.kwargs["BLOCK_P"] for c in _BWD_ALL)
_MIN_BLOCK_P = min(c.kwargs["BLOCK_P"] for c in _FWD_ALL + _BWD_ALL)
_MIN_BLOCK_H = max(max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in _FWD_ALL + _BWD_ALL)

# Point counts stay out of the keys: one tuning per network shape, not per batch size.
_KEY = ["H", "O", "D", "N_LAYERS", "HEAD_MASK", "HAS_C", "GABOR", "RELU", "RESIDUAL", "MIXED"]


@triton.jit
def _linear_block(z_ptr, a_ptr, c_ptr, offs_r, offs_n, mask_n, offs_bk, H,
                  BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_C: tl.constexpr, MIXED: tl.constexpr, FP32: tl.constexpr):
    """``z A^T + c`` for one column block: ``z`` a (BLOCK_P, BLOCK_H) scratch tile read in K
    blocks, ``a_ptr`` / ``c_ptr`` at this layer's (H, H) weight and (H,) bias."""
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, BLOCK_H, BLOCK_K):
        kk = k0 + offs_bk
        zk = tl.load(z_ptr + offs_r[:, None] * BLOCK_H + kk[None, :])
        at = tl.load(a_ptr + offs_n[None, :] * H + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < H), other=0.0)
        acc += mm(zk, at, MIXED, FP32)
    if HAS_C:
        acc += tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _mfn_stack_fwd_kernel(
    x_ptr, w_ptr, b_ptr, a_ptr, c_ptr, u_ptr, d_ptr, gamma_ptr, mu_ptr, out_ptr, scratch_ptr,
    P, H, O,
    D: tl.constexpr, N_LAYERS: tl.constexpr, HEAD_MASK: tl.constexpr, HAS_C: tl.constexpr,
    GABOR: tl.constexpr, RELU: tl.constexpr, RESIDUAL: tl.constexpr, MIXED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(P, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    offs_bn = tl.arange(0, BLOCK_N)
    offs_bk = tl.arange(0, BLOCK_K)
    tile_elems = BLOCK_P * BLOCK_H
    # two scratch tiles: z_{i-1} (read in K blocks) and z_i (written in N blocks)
    scr = scratch_ptr + pid * (2 * tile_elems)
    for tile in range(pid, n_tiles, nprog):
        offs_p = tile * BLOCK_P + offs_r
        mask_p = offs_p < P
        total = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        for i in tl.static_range(N_LAYERS):
            cur = scr + ((i + 1) % 2) * tile_elems
            nxt = scr + (i % 2) * tile_elems
            tl.debug_barrier()  # z_{i-1} complete in `cur`; earlier readers of `nxt` done
            y = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
            for n0 in range(0, BLOCK_H, BLOCK_N):
                offs_n = n0 + offs_bn
                mask_n = offs_n < H
                g = filter_values(x_ptr, w_ptr + i * H * D, b_ptr + i * H, gamma_ptr + i * H,
                                  mu_ptr + i * H * D, offs_p, mask_p, offs_n, mask_n, D, GABOR)
                if i == 0:
                    zn = g
                else:
                    acc = _linear_block(cur, a_ptr + (i - 1) * H * H, c_ptr + (i - 1) * H, offs_r, offs_n,
                                        mask_n, offs_bk, H, BLOCK_P, BLOCK_H, BLOCK_N, BLOCK_K, HAS_C,
                                        MIXED, TF32X3)
                    zn = acc * g  # padded columns: g = 0, so z stays 0 there
                if i + 1 < N_LAYERS:
                    tl.store(nxt + offs_r[:, None] * BLOCK_H + offs_n[None, :], zn)
                if (HEAD_MASK >> i) & 1:
                    ut = tl.load(u_ptr + i * O * H + offs_o[None, :] * H + offs_n[:, None],
                                 mask=mask_o[None, :] & mask_n[:, None], other=0.0)
                    y += mm(zn, ut, MIXED, TF32X3)
            if (HEAD_MASK >> i) & 1:
                y += tl.load(d_ptr + i * O + offs_o, mask=mask_o, other=0.0)[None, :]
                if RELU:
                    y = tl.maximum(y, 0.0)
                if RESIDUAL:
                    total += y
                    y = total
                tl.store(out_ptr + i * P * O + offs_p[:, None] * O + offs_o[None, :], y,
                         mask=mask_p[:, None] & mask_o[None, :])


@triton.autotune(
    configs=_BWD_CONFIGS, key=_KEY + ["NEED_DW"],
    reset_to_zero=["pw_ptr", "pb_ptr", "pa_ptr", "pc_ptr", "pu_ptr", "pd_ptr", "pg_ptr", "pm_ptr"],
)
@triton.jit
def _mfn_stack_bwd_kernel(
    gout_ptr, x_ptr, w_ptr, b_ptr, a_ptr, c_ptr, u_ptr, d_ptr, gamma_ptr, mu_ptr, scratch_ptr,
    hscr_ptr, dx_ptr, pw_ptr, pb_ptr, pa_ptr, pc_ptr, pu_ptr, pd_ptr, pg_ptr, pm_ptr,
    P, H, O,
    D: tl.constexpr, N_LAYERS: tl.constexpr, HEAD_MASK: tl.constexpr, HAS_C: tl.constexpr,
    GABOR: tl.constexpr, RELU: tl.constexpr, RESIDUAL: tl.constexpr, MIXED: tl.constexpr,
    NEED_DW: tl.constexpr, DETACH: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(P, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    offs_d = tl.arange(0, BLOCK_D)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_bk = tl.arange(0, BLOCK_K)
    tile_elems = BLOCK_P * BLOCK_H
    # scratch slots (BLOCK_P x BLOCK_H fp32 each): 0 = dz, 1..L-1 = lin_i, L and L+1 =
    # z ping-pong in the recompute sweep, then z_{i-1} (L) and dlin_i (L+1)
    scr = scratch_ptr + pid * ((N_LAYERS + 2) * tile_elems)
    s_dz = scr
    s_zp = scr + N_LAYERS * tile_elems
    s_dl = scr + (N_LAYERS + 1) * tile_elems
    hscr = hscr_ptr + pid * (N_LAYERS * BLOCK_P * BLOCK_O)  # head pre-activations (ReLU)
    o_ptrs = offs_r[:, None] * BLOCK_O + offs_o[None, :]
    pw = pw_ptr + pid * (N_LAYERS * H * D)
    pb = pb_ptr + pid * (N_LAYERS * H)
    pa = pa_ptr + pid * ((N_LAYERS - 1) * H * H)
    pc = pc_ptr + pid * ((N_LAYERS - 1) * H)
    pu = pu_ptr + pid * (N_LAYERS * O * H)
    pd = pd_ptr + pid * (N_LAYERS * O)
    pg = pg_ptr + pid * (N_LAYERS * H)
    pm = pm_ptr + pid * (N_LAYERS * H * D)
    for tile in range(pid, n_tiles, nprog):
        offs_p = tile * BLOCK_P + offs_r
        mask_p = offs_p < P
        # 1. recompute the trunk column block by column block; keep lin_i (and, for ReLU
        #    heads, the head pre-activations)
        for i in tl.static_range(N_LAYERS):
            cur = scr + (N_LAYERS + (i + 1) % 2) * tile_elems
            nxt = scr + (N_LAYERS + i % 2) * tile_elems
            tl.debug_barrier()
            h = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
            for n0 in range(0, BLOCK_H, BLOCK_N):
                offs_n = n0 + offs_bn
                mask_n = offs_n < H
                g = filter_values(x_ptr, w_ptr + i * H * D, b_ptr + i * H, gamma_ptr + i * H,
                                  mu_ptr + i * H * D, offs_p, mask_p, offs_n, mask_n, D, GABOR)
                if i == 0:
                    zn = g
                else:
                    acc = _linear_block(cur, a_ptr + (i - 1) * H * H, c_ptr + (i - 1) * H, offs_r, offs_n,
                                        mask_n, offs_bk, H, BLOCK_P, BLOCK_H, BLOCK_N, BLOCK_K, HAS_C,
                                        MIXED, IEEE)
                    tl.store(scr + i * tile_elems + offs_r[:, None] * BLOCK_H + offs_n[None, :], acc)
                    zn = acc * g
                if i + 1 < N_LAYERS:
                    tl.store(nxt + offs_r[:, None] * BLOCK_H + offs_n[None, :], zn)
                if RELU:
                    if (HEAD_MASK >> i) & 1:
                        ut = tl.load(u_ptr + i * O * H + offs_o[None, :] * H + offs_n[:, None],
                                     mask=mask_o[None, :] & mask_n[:, None], other=0.0)
                        h += mm(zn, ut, MIXED, IEEE)
            if RELU:
                if (HEAD_MASK >> i) & 1:
                    h += tl.load(d_ptr + i * O + offs_o, mask=mask_o, other=0.0)[None, :]
                    tl.store(hscr + i * BLOCK_P * BLOCK_O + o_ptrs, h)
        tl.debug_barrier()
        # 2. top-down
        dyrun = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        dx = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(N_LAYERS):
            i = N_LAYERS - 1 - j
            has_head = (HEAD_MASK >> i) & 1
            dh = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
            if has_head:
                dyi = tl.load(gout_ptr + i * P * O + offs_p[:, None] * O + offs_o[None, :],
                              mask=mask_p[:, None] & mask_o[None, :], other=0.0)
                if RESIDUAL:
                    dyrun += dyi
                    dh = dyrun
                else:
                    dh = dyi
                if RELU:
                    dh = tl.where(tl.load(hscr + i * BLOCK_P * BLOCK_O + o_ptrs) > 0.0, dh, 0.0)
                accumulate(pd + i * O + offs_o, tl.sum(dh, axis=0), mask_o)
            # pass A, per column block: dz, head and filter gradients, dlin, z_{i-1}
            for n0 in range(0, BLOCK_H, BLOCK_N):
                offs_n = n0 + offs_bn
                mask_n = offs_n < H
                n_ptrs = offs_r[:, None] * BLOCK_H + offs_n[None, :]
                s, q, e = filter_args(x_ptr, w_ptr + i * H * D, b_ptr + i * H, gamma_ptr + i * H,
                                      mu_ptr + i * H * D, offs_p, mask_p, offs_n, mask_n, D, GABOR)
                sn = tl.sin(s)
                cs = tl.cos(s)
                g = sn
                if GABOR:
                    g = sn * e
                if i >= 1:
                    un = tl.load(scr + i * tile_elems + n_ptrs)
                    zn = un * g
                else:
                    un = g  # unused
                    zn = g
                if i + 1 < N_LAYERS:
                    dzn = tl.load(s_dz + n_ptrs)
                else:
                    dzn = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
                if has_head:
                    ut = tl.load(u_ptr + i * O * H + offs_o[None, :] * H + offs_n[:, None],
                                 mask=mask_o[None, :] & mask_n[:, None], other=0.0)
                    accumulate(pu + i * O * H + offs_o[:, None] * H + offs_n[None, :],
                               mm(tl.trans(dh), zn, MIXED, IEEE), mask_o[:, None] & mask_n[None, :])
                    if i >= DETACH:
                        dzn += mm(dh, tl.trans(ut), MIXED, IEEE)
                if i >= 1:
                    dln = dzn * g
                    dgn = dzn * un
                    tl.store(s_dl + n_ptrs, dln)
                    if HAS_C:
                        accumulate(pc + (i - 1) * H + offs_n, tl.sum(dln, axis=0), mask_n)
                    # z_{i-1} for this column block (its sines recomputed)
                    zp = filter_values(x_ptr, w_ptr + (i - 1) * H * D, b_ptr + (i - 1) * H,
                                       gamma_ptr + (i - 1) * H, mu_ptr + (i - 1) * H * D,
                                       offs_p, mask_p, offs_n, mask_n, D, GABOR)
                    if i >= 2:
                        zp = zp * tl.load(scr + (i - 1) * tile_elems + n_ptrs)
                    tl.store(s_zp + n_ptrs, zp)
                else:
                    dgn = dzn
                dx = filter_backward(dgn, sn, cs, q, e, x_ptr, w_ptr + i * H * D, gamma_ptr + i * H,
                                     mu_ptr + i * H * D, pw + i * H * D, pb + i * H, pg + i * H,
                                     pm + i * H * D, dx, offs_p, mask_p, offs_n, mask_n, offs_d,
                                     D, GABOR, NEED_DW)
            if i >= 1:
                tl.debug_barrier()  # dlin_i and z_{i-1} complete; dz of layer i consumed
                pai = pa + (i - 1) * H * H
                for n0 in range(0, BLOCK_H, BLOCK_N):
                    offs_n = n0 + offs_bn
                    mask_n = offs_n < H
                    dln = tl.load(s_dl + offs_r[:, None] * BLOCK_H + offs_n[None, :])
                    for k0 in range(0, BLOCK_H, BLOCK_N):
                        kk = k0 + offs_bn
                        zk = tl.load(s_zp + offs_r[:, None] * BLOCK_H + kk[None, :])
                        accumulate(pai + offs_n[:, None] * H + kk[None, :], mm(tl.trans(dln), zk, MIXED, IEEE),
                                   mask_n[:, None] & (kk[None, :] < H))
                    # dz_{i-1}[:, n-block] = dlin_i A_i[:, n-block]
                    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
                    for k0 in range(0, BLOCK_H, BLOCK_K):
                        kk = k0 + offs_bk
                        dlk = tl.load(s_dl + offs_r[:, None] * BLOCK_H + kk[None, :])
                        ak = tl.load(a_ptr + (i - 1) * H * H + kk[:, None] * H + offs_n[None, :],
                                     mask=(kk[:, None] < H) & mask_n[None, :], other=0.0)
                        acc += mm(dlk, ak, MIXED, IEEE)
                    tl.store(s_dz + offs_r[:, None] * BLOCK_H + offs_n[None, :], acc)
                tl.debug_barrier()
        tl.store(dx_ptr + offs_p[:, None] * D + offs_d[None, :], dx,
                 mask=mask_p[:, None] & (offs_d[None, :] < D))


def _flags(head_mask, gamma, c, relu, residual, precision):
    return dict(HEAD_MASK=head_mask, HAS_C=c is not None, GABOR=gamma is not None,
                RELU=bool(relu), RESIDUAL=bool(residual), MIXED=precision == "mixed")


def mfn_stack_forward(x, w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, precision):
    """Launch the fused forward. Shapes: x (P, D); w (L, H, D); b (L, H); a (L-1, H, H);
    c (L-1, H) or None; u (L, O, H); d (L, O) (rows of layers without a head unused);
    gamma (L, H), mu (L, H, D) or None. All fp32 contiguous. Returns (L, P, O) fp32; rows of
    layers without a head are left uninitialised."""
    P, D = x.shape
    L, H, _ = w.shape
    O = u.shape[1]
    out = torch.empty((L, P, O), device=x.device, dtype=torch.float32)
    if P == 0:
        return out
    block_h = block(H, _MIN_BLOCK_H)
    # no config launches more programs than this (small P: fewer tiles than SMs)
    nprog = min(max_programs(x.device), triton.cdiv(P, _MIN_BLOCK_P))
    scratch = torch.empty((nprog * 2 * _MAX_BLOCK_P_FWD * block_h,), device=x.device,
                          dtype=torch.float32)
    grid = lambda meta: (min(triton.cdiv(P, meta["BLOCK_P"]), nprog),)  # noqa: E731
    _mfn_stack_fwd_kernel[grid](
        x, w, b, a if a.numel() else w, c if c is not None else b, u, d,
        gamma if gamma is not None else b, mu if mu is not None else w, out, scratch,
        P, H, O,
        D=D, N_LAYERS=L, BLOCK_H=block_h, BLOCK_O=block(O),
        **_flags(head_mask, gamma, c, relu, residual, precision),
    )
    return out


def mfn_stack_backward(grad_out, x, w, b, a, c, u, d, gamma, mu, head_mask, residual, relu,
                       detach_heads_below, need_dw, precision):
    """Launch the fused backward. ``grad_out`` (L, P, O) (zero rows where no head). Returns
    dx (P, D), dW (L, H, D) (zeros unless ``need_dw``), db (L, H), dA (L-1, H, H),
    dc (L-1, H) or None, dU (L, O, H), dd (L, O), dgamma (L, H) or None, dmu (L, H, D) or None."""
    P, D = x.shape
    L, H, _ = w.shape
    O = u.shape[1]
    dev = x.device
    block_h = block(H, _MIN_BLOCK_H)
    # two programs per SM (one left 4 warps per SM to hide all the latency); the
    # [n_programs, L-1, H, H] dA partials are the largest buffer of the op
    nprog = max(1, min(max_programs(dev, per_sm=2), triton.cdiv(P, _MIN_BLOCK_P)))
    f32 = dict(device=dev, dtype=torch.float32)
    dx = torch.empty((P, D), **f32)
    pw = torch.zeros((nprog, L, H, D), **f32)
    pb = torch.zeros((nprog, L, H), **f32)
    pa = torch.zeros((nprog, max(L - 1, 0), H, H), **f32)
    pc = torch.zeros((nprog, max(L - 1, 0), H), **f32)
    pu = torch.zeros((nprog, L, O, H), **f32)
    pd = torch.zeros((nprog, L, O), **f32)
    pg = torch.zeros((nprog, L, H), **f32)
    pm = torch.zeros((nprog, L, H, D), **f32)
    if P > 0:
        scratch = torch.empty((nprog * (L + 2) * _MAX_BLOCK_P_BWD * block_h,), **f32)
        hscratch = torch.empty((nprog * L * _MAX_BLOCK_P_BWD * block(O),) if relu else (1,), **f32)
        grid = lambda meta: (min(triton.cdiv(P, meta["BLOCK_P"]), nprog),)  # noqa: E731
        _mfn_stack_bwd_kernel[grid](
            grad_out, x, w, b, a if a.numel() else w, c if c is not None else b, u, d,
            gamma if gamma is not None else b, mu if mu is not None else w, scratch, hscratch,
            dx, pw, pb, pa if pa.numel() else pb, pc if pc.numel() else pb, pu, pd, pg, pm,
            P, H, O,
            D=D, N_LAYERS=L, NEED_DW=bool(need_dw), DETACH=int(detach_heads_below),
            BLOCK_H=block_h, BLOCK_O=block(O),
            BLOCK_D=block(D, 2),
            **_flags(head_mask, gamma, c, relu, residual, precision),
        )
    # fixed-order reduction over the program rows: deterministic
    return (
        dx, pw.sum(0), pb.sum(0), pa.sum(0), pc.sum(0) if c is not None else None,
        pu.sum(0), pd.sum(0), pg.sum(0) if gamma is not None else None,
        pm.sum(0) if mu is not None else None,
    )
