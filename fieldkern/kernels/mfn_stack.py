"""The multiplicative filter network stack: trunk, every head, residual sums and ReLU.

Parameters arrive stacked per layer as ``StackParams`` with the network's ``StackSpec``
(:mod:`fieldkern.ops._stack`). Which code runs is a fixed rule (``choose_forward``,
``choose_products``) unless the caller names a variant (:mod:`fieldkern.ops._variants`);
``@triton.autotune`` chooses tile sizes and warps only.

Fused forward (``_mfn_stack_fwd_kernel``, the default):

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
  Without autograd nothing of size ``P x H`` is written; when a gradient can be asked
  for, the forward also stores ``lin_i = z_{i-1} A_i^T + c_i`` (i >= 1, ``(L-1, P, H)``
  fp32) and, for ReLU heads, the head pre-activations ``(L, P, O)`` for the backward.
* Hidden width padded to ``BLOCK_H`` (power of two >= 16) by masks: padded columns have
  ``W = b = 0`` so ``g = 0`` and stay exactly zero through every layer.
* Products: mixed precision uses bf16 tensor-core products; float32 uses tf32x3 (each
  operand split into a TF32 head and a TF32 remainder, three tensor-core products summed
  in fp32: error at fp32 rounding level, unlike plain TF32), the weights ``A_i``, ``U_i``
  split once per call on the host (``_common.mm_split``). ``BLOCK_P``, ``BLOCK_N`` and
  ``BLOCK_K`` are autotuned; the hidden width is padded to at least the largest column
  block.
* Sines: the SFU's ``sin.approx`` after an explicit reduction to [-pi, pi]
  (``_common.sine``), not libdevice's ``sinf`` (see there; 1.6x on the 3D forward).
* Offsets are int32 and the kernel addresses its buffers whole: it runs only where every
  one has fewer than ``_common.MAX_ELEMENTS`` elements (``fused_fits``).

Layered forward (``_forward_layered``): the filter kernel for layer 0, then per layer the
multiplicative-layer kernel (a pipelined GEMM, 64-128 wide tiles, with the filter in its
epilogue; it also writes ``lin_i`` when saving) and the heads as GEMMs (``_head``: IEEE
float32, or bf16-rounded operands with fp32 accumulation in mixed mode, as in the fused
kernel), over chunks of points (``FWD_WORKSPACE_BYTES``). ``z_i`` makes a round trip
through global memory, but the products run as plain pipelined GEMMs. It runs where the
fused kernel does not fit, or when named (``mfn_forward="layered"``).

Backward (``mfn_stack_backward``): per chunk of points (work buffers bounded by
``BWD_WORKSPACE_BYTES``), top layer first,

1. ``_mfn_stack_bwd_kernel``, one launch per layer, elementwise in column blocks: recompute
   ``g_i`` (sin, cos, envelope) from ``x`` and ``z_i = lin_i g_i``; ``dz_i`` (from layer
   i+1) plus ``dh_i U_i`` (only for ``i >= detach_heads_below``); the filter gradients
   ``db, dW (if trainable), dgamma, dmu``, ``dc`` and this layer's share of ``dx``; writes
   ``dlin_i = dz_i g_i`` and ``z_{i-1}`` (sines of layer i-1 recomputed);
2. three GEMMs over the chunk's points: ``dA_i += dlin_i^T z_{i-1}``,
   ``dU_{i-1} += dh_{i-1}^T z_{i-1}``, ``dz_{i-1} = dlin_i A_i``: in float32 on cuBLAS in
   IEEE float32 by default, or as the Triton GEMMs ``_points_sum_kernel`` /
   ``_rows_matmul_kernel`` (tf32x3 on tensor cores; mixed precision: bf16, always). For
   the float32 Triton GEMMs each second operand arrives split into TF32 head and
   remainder (``mm_split``): the weights ``A_i`` split on the host, ``z_{i-1}`` written
   split by the layer kernel (a fourth work buffer), and the top layer's own ``z`` goes
   first in ``(z^T dh)^T`` with the top head's ``dh`` split on the host.

The backward reads ``lin_i`` instead of recomputing the trunk: a design that recomputed it
inside one fused backward kernel, accumulating ``dA`` per tile with FMA products (255
registers, spills), took 8.3 ms of a 9.7 ms 3D fwd+bwd on an H200 (bench/RESULTS.md).
Keeping ``lin_i`` costs (L-1) x P x H floats (0.17-0.19 of eager PyTorch's training memory
for the benchmark networks).

This one op's file holds its four kernels (fused forward, per-layer backward, the
backward's two GEMM kernels), the launch rules and the launchers: the kernels/ rule of one op
per file, not one idea per 350 lines.

Reductions over points are deterministic: each program adds its tiles into its own row of
``[n_programs, ...]`` partial buffers (plain load/add/store, no atomics), the GEMMs' slab
partials are summed in a fixed order, and ``dx`` rows belong to one program each.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import triton
import triton.language as tl

from fieldkern.kernels import _common
from fieldkern.kernels._common import (
    IEEE,
    accumulate,
    block,
    configs,
    cosine,
    filter_args,
    filter_backward,
    filter_values,
    ieee_float32,
    interpreting,
    load_split,
    max_programs,
    mm,
    mm_split,
    on_input_device,
    or_dummy,
    sine,
    split_tf32,
    weight_parts,
    _split_tf32,
)
from fieldkern.kernels.filters import filter_forward
from fieldkern.kernels.multiplicative_layer import multiplicative_layer_forward
from fieldkern.ops._stack import StackParams, StackSpec
from fieldkern.ops._variants import check_variant


def _config(bp, warps, bn, bk=None):
    meta = {"BLOCK_P": bp, "BLOCK_N": bn} if bk is None else {"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk}
    return triton.Config(meta, num_warps=warps, num_stages=2)


# (BLOCK_P, warps, BLOCK_N, BLOCK_K). The forward's products run on tensor cores in both
# precisions (tf32x3 / bf16); the register tiles are BLOCK_P x BLOCK_N, so N and K stay at
# 32-64: ptxas (sm_90, triton 3.9) reports 255 registers for every variant with
# BLOCK_P >= 64, and spills of 32-700 bytes per thread that grow with BLOCK_N and BLOCK_K
# (bench/RESULTS.md). The first config is the one ``FIELDKERN_AUTOTUNE=0`` keeps: the
# least spilling at BLOCK_P = 64.
FWD_CANDIDATES = [_config(*c) for c in ((64, 4, 32, 32), (128, 8, 64, 32), (64, 4, 64, 32),
                                         (128, 4, 32, 32), (32, 4, 32, 32), (64, 8, 64, 64))]
# (BLOCK_P, warps, BLOCK_N) of the per-layer backward: elementwise work and the head's
# K = BLOCK_O product only (the sums over points are separate GEMMs). ptxas (sm_90, H = 256):
# 255 / 248 / 179 / 186 registers, no spills; (128, 4, 32) and (32, 4, 64) spilled.
BWD_CANDIDATES = [_config(*c) for c in ((64, 4, 32), (128, 8, 32), (64, 8, 32), (32, 4, 32))]
_INTERP_FWD = _config(32, 4, 32, 32)
_INTERP_BWD = _config(32, 4, 32)
_FWD_CONFIGS = configs(FWD_CANDIDATES, _INTERP_FWD)
_BWD_CONFIGS = configs(BWD_CANDIDATES, _INTERP_BWD)
# Buffers are sized for every candidate, whichever subset autotuning may use (tests force
# single candidates): scratch for the largest BLOCK_P, hidden width padded to at least the
# largest column block, persistent grid for the smallest BLOCK_P.
_FWD_ALL = [_INTERP_FWD] if interpreting() else FWD_CANDIDATES
_BWD_ALL = [_INTERP_BWD] if interpreting() else BWD_CANDIDATES
_MAX_BLOCK_P_FWD = max(c.kwargs["BLOCK_P"] for c in _FWD_ALL)
_MIN_BLOCK_P = min(c.kwargs["BLOCK_P"] for c in _FWD_ALL + _BWD_ALL)
_MIN_BLOCK_H = max(max(c.kwargs["BLOCK_N"], c.kwargs.get("BLOCK_K", 0)) for c in _FWD_ALL + _BWD_ALL)
#: Bytes of (points x H) float32 work buffers the backward may hold at once (dz_i, dlin_i,
#: z_{i-1}; bf16 ones in mixed mode count as float32); it walks the points in chunks that
#: fit. Tests lower it to force several chunks.
BWD_WORKSPACE_BYTES = 256 << 20

# Point counts stay out of the keys: one tuning per network shape, not per batch size.
_KEY = ["H", "O", "D", "N_LAYERS", "HEAD_MASK", "HAS_C", "GABOR", "RELU", "RESIDUAL", "MIXED"]


@triton.jit
def _linear_block(z_ptr, a_ptr, alo_ptr, c_ptr, offs_r, offs_n, mask_n, offs_bk, H,
                  BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_C: tl.constexpr, MIXED: tl.constexpr):
    """``z A^T + c`` for one column block: ``z`` a (BLOCK_P, BLOCK_H) scratch tile read in K
    blocks, ``a_ptr`` / ``alo_ptr`` / ``c_ptr`` at this layer's (H, H) weight (split by
    ``split_tf32`` in float32) and (H,) bias."""
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, BLOCK_H, BLOCK_K):
        kk = k0 + offs_bk
        zk = tl.load(z_ptr + offs_r[:, None] * BLOCK_H + kk[None, :])
        at, atl = load_split(a_ptr, alo_ptr, offs_n[None, :] * H + kk[:, None],
                             mask_n[None, :] & (kk[:, None] < H), MIXED)
        acc = mm_split(zk, at, atl, acc, MIXED)
    if HAS_C:
        acc += tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY + ["SAVE"])
@triton.jit
def _mfn_stack_fwd_kernel(
    # inputs: coordinates and the stacked parameters (``StackParams``); ``alo_ptr`` /
    # ``ulo_ptr``: the ``split_tf32`` remainders of A and U in float32 (A, U again in mixed)
    x_ptr, w_ptr, b_ptr, a_ptr, alo_ptr, c_ptr, u_ptr, ulo_ptr, d_ptr, gamma_ptr, mu_ptr,
    # outputs (L, P, O), the per-program scratch pair, and for the backward (``SAVE``)
    # lin (L-1, P, H) and the ReLU heads' pre-activations (L, P, O)
    out_ptr, scratch_ptr, lin_ptr, hpre_ptr,
    # sizes: points, hidden width, head outputs
    P, H, O,
    # the network (``StackSpec`` and which parameters exist)
    D: tl.constexpr, N_LAYERS: tl.constexpr, HEAD_MASK: tl.constexpr, HAS_C: tl.constexpr,
    GABOR: tl.constexpr, RELU: tl.constexpr, RESIDUAL: tl.constexpr, MIXED: tl.constexpr,
    SAVE: tl.constexpr,
    # blocks (BLOCK_N, BLOCK_K, BLOCK_P autotuned)
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Long by its raw-pointer signature (a kernel takes no bundles) and one loop nest over
    # tiles, layers and column blocks; the block steps are helpers (filter_values,
    # _linear_block, load_split / mm_split). The store sequence per block stays here, where the
    # scratch barrier that orders it is.
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
                    acc = _linear_block(cur, a_ptr + (i - 1) * H * H, alo_ptr + (i - 1) * H * H,
                                        c_ptr + (i - 1) * H, offs_r, offs_n, mask_n, offs_bk, H,
                                        BLOCK_P, BLOCK_H, BLOCK_N, BLOCK_K, HAS_C, MIXED)
                    if SAVE:  # lin_i for the backward, (L-1, P, H)
                        tl.store(lin_ptr + (i - 1) * P * H + offs_p[:, None] * H + offs_n[None, :], acc,
                                 mask=mask_p[:, None] & mask_n[None, :])
                    zn = acc * g  # padded columns: g = 0, so z stays 0 there
                if i + 1 < N_LAYERS:
                    tl.store(nxt + offs_r[:, None] * BLOCK_H + offs_n[None, :], zn)
                if (HEAD_MASK >> i) & 1:
                    ut, utl = load_split(u_ptr + i * O * H, ulo_ptr + i * O * H,
                                         offs_o[None, :] * H + offs_n[:, None],
                                         mask_o[None, :] & mask_n[:, None], MIXED)
                    y = mm_split(zn, ut, utl, y, MIXED)
            if (HEAD_MASK >> i) & 1:
                y += tl.load(d_ptr + i * O + offs_o, mask=mask_o, other=0.0)[None, :]
                if RELU:
                    if SAVE:  # pre-activations: the backward's ReLU masks, (L, P, O)
                        tl.store(hpre_ptr + i * P * O + offs_p[:, None] * O + offs_o[None, :], y,
                                 mask=mask_p[:, None] & mask_o[None, :])
                    y = tl.maximum(y, 0.0)
                if RESIDUAL:
                    total += y
                    y = total
                tl.store(out_ptr + i * P * O + offs_p[:, None] * O + offs_o[None, :], y,
                         mask=mask_p[:, None] & mask_o[None, :])


@triton.jit
def _store_z(hi_ptr, lo_ptr, offs, z, mask, SPLIT: tl.constexpr):
    """Store a ``z`` tile for the GEMMs that take it as their second operand: in the work
    dtype, or (``SPLIT``, float32 Triton GEMMs) as ``split_tf32`` head and remainder."""
    if SPLIT:
        hi, lo = _split_tf32(z)
        tl.store(hi_ptr + offs, hi, mask=mask)
        tl.store(lo_ptr + offs, lo, mask=mask)
    else:
        tl.store(hi_ptr + offs, z.to(hi_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_BWD_CONFIGS,
    key=["H", "O", "D", "HAS_LIN", "HAS_DZ", "HAS_PREV_LIN", "HEAD_TO_TRUNK", "STORE_Z", "SPLIT_Z", "HAS_C",
         "GABOR", "NEED_DW", "MIXED"],
    reset_to_zero=["pw_ptr", "pb_ptr", "pg_ptr", "pm_ptr", "pc_ptr"],
    restore_value=["dx_ptr"],
)
@triton.jit
def _mfn_stack_bwd_kernel(
    # inputs: the head gradient dh_i, coordinates, filter i (w, b, gamma, mu), filter i-1
    # (wp, bp, gammap, mup: z_{i-1}'s sines), head weights U_i
    dh_ptr, x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, wp_ptr, bp_ptr, gammap_ptr, mup_ptr, u_ptr,
    # saved lin_i and lin_{i-1}, dz_i from layer i+1
    lin_ptr, linp_ptr, dz_ptr,
    # outputs for the products: dlin_i, z_{i-1} (head and remainder with ``SPLIT_Z``), z_i
    # (``STORE_Z``); dx, added to
    dlin_ptr, zp_ptr, zplo_ptr, z_ptr, dx_ptr,
    # this layer's program-owned partial sums of dW, db, dgamma, dmu, dc (rows ROW apart)
    pw_ptr, pb_ptr, pg_ptr, pm_ptr, pc_ptr,
    # sizes: points of the chunk, hidden width, head outputs, partial-row stride
    P, H, O, ROW,
    # what layer i has and needs
    D: tl.constexpr, HAS_LIN: tl.constexpr, HAS_DZ: tl.constexpr, HAS_PREV_LIN: tl.constexpr,
    HEAD_TO_TRUNK: tl.constexpr, STORE_Z: tl.constexpr, SPLIT_Z: tl.constexpr, HAS_C: tl.constexpr,
    GABOR: tl.constexpr,
    NEED_DW: tl.constexpr, MIXED: tl.constexpr,
    # blocks (BLOCK_P, BLOCK_N autotuned)
    BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One layer i of the backward for a chunk of P points (all row-major, row stride H / O
    / D): from ``dz_i`` (``HAS_DZ``: from layer i+1), the head gradient ``dh_i`` (``HEAD_TO_TRUNK``)
    and the saved ``lin_i`` (``HAS_LIN``, i >= 1) compute the filter partials, add this
    layer's share of ``dx``, and write ``dlin_i = dz_i g_i`` and ``z_{i-1}`` (``lin_{i-1}
    g_{i-1}``, sines recomputed) -- and ``z_i`` itself on the top layer (``STORE_Z``) -- for
    the launcher's products. Sums over points as (BLOCK_O x BLOCK_N) ``tl.dot`` on the FMA
    path need the whole point axis per thread (ptxas: 600-840 B of spills), so ``dU`` is
    left to the GEMMs below too.

    Long by its signature (30 pointers and switches) and one loop body whose values (the
    sines, ``lin_i``, ``dz_i``) feed four outputs; the filter math is in ``filter_args`` /
    ``filter_backward``, and a jit helper for the rest would take the same 30 arguments."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(P, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    offs_d = tl.arange(0, BLOCK_D)
    offs_bn = tl.arange(0, BLOCK_N)
    # this program's rows of the partial sums (rows ``ROW`` floats apart)
    pw = pw_ptr + pid * ROW
    pb = pb_ptr + pid * ROW
    pg = pg_ptr + pid * ROW
    pm = pm_ptr + pid * ROW
    pc = pc_ptr + pid * ROW
    for tile in range(pid, n_tiles, nprog):
        offs_p = tile * BLOCK_P + offs_r
        mask_p = offs_p < P
        dh = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        if HEAD_TO_TRUNK:
            dh = tl.load(dh_ptr + offs_p[:, None] * O + offs_o[None, :],
                         mask=mask_p[:, None] & mask_o[None, :], other=0.0)
        dx = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, BLOCK_H, BLOCK_N):
            offs_n = n0 + offs_bn
            mask_n = offs_n < H
            mask = mask_p[:, None] & mask_n[None, :]
            ptrs = offs_p[:, None] * H + offs_n[None, :]
            s, q, e = filter_args(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p, offs_n,
                                  mask_n, D, GABOR)
            sn = sine(s)
            cs = cosine(s)
            g = sn
            if GABOR:
                g = sn * e
            if HAS_LIN:
                un = tl.load(lin_ptr + ptrs, mask=mask, other=0.0)
                zn = un * g
            else:
                un = g  # unused
                zn = g
            if HAS_DZ:
                dzn = tl.load(dz_ptr + ptrs, mask=mask, other=0.0)
            else:
                dzn = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
            if STORE_Z:
                tl.store(z_ptr + ptrs, zn.to(z_ptr.dtype.element_ty), mask=mask)
            if HEAD_TO_TRUNK:
                un_t = tl.load(u_ptr + offs_o[:, None] * H + offs_n[None, :],
                               mask=mask_o[:, None] & mask_n[None, :], other=0.0)
                dzn += mm(dh, un_t, MIXED, IEEE)
            if HAS_LIN:
                dln = dzn * g
                tl.store(dlin_ptr + ptrs, dln.to(dlin_ptr.dtype.element_ty), mask=mask)
                if HAS_C:
                    accumulate(pc + offs_n, tl.sum(dln, axis=0), mask_n)
                zp = filter_values(x_ptr, wp_ptr, bp_ptr, gammap_ptr, mup_ptr, offs_p, mask_p,
                                   offs_n, mask_n, D, GABOR)
                if HAS_PREV_LIN:
                    zp = zp * tl.load(linp_ptr + ptrs, mask=mask, other=0.0)
                _store_z(zp_ptr, zplo_ptr, ptrs, zp, mask, SPLIT_Z)
                dgn = dzn * un
            else:
                dgn = dzn
            dx = filter_backward(dgn, sn, cs, q, e, x_ptr, w_ptr, gamma_ptr, mu_ptr, pw, pb, pg, pm,
                                 dx, offs_p, mask_p, offs_n, mask_n, offs_d, D, GABOR, NEED_DW)
        dx_ptrs = dx_ptr + offs_p[:, None] * D + offs_d[None, :]
        dx_mask = mask_p[:, None] & (offs_d[None, :] < D)
        tl.store(dx_ptrs, tl.load(dx_ptrs, mask=dx_mask, other=0.0) + dx, mask=dx_mask)


# The backward's products over points as Triton GEMMs: float32 on tensor cores as tf32x3
# (cuBLAS float32 is SIMT FMA: 37-54 TFLOPS on an H200, 0.18-0.75 ms per product at 2^18
# points, bench/RESULTS.md), mixed as bf16, both with fp32 results. Mixed precision always
# takes them; float32 takes cuBLAS unless they are named (``choose_products``).
_ROWS_CANDIDATES = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
                    for bm, bn, bk, w in ((128, 128, 32, 8), (128, 64, 32, 4), (64, 128, 32, 4))]
_SUM_CANDIDATES = [triton.Config({"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w, num_stages=3)
                   for ba, bb, bk, w in ((128, 128, 32, 8), (64, 64, 64, 4), (128, 64, 32, 4),
                                         (16, 128, 32, 4), (128, 16, 32, 4))]  # the last two for dU, dU^T


@triton.autotune(configs=configs(_ROWS_CANDIDATES, triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})),
                 key=["N", "K", "MIXED"])
@triton.jit
def _rows_matmul_kernel(a_ptr, b_ptr, blo_ptr, c_ptr, M, N, K, MIXED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``c (M, N) = a (M, K) @ b (K, N)``, row-major; M = points (long), N, K = hidden; the
    weight ``b`` split by ``split_tf32`` (``b_ptr``, ``blo_ptr``) in float32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * K + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b, bl = load_split(b_ptr, blo_ptr, kk[:, None] * N + offs_n[None, :],
                           (kk[:, None] < K) & (offs_n[None, :] < N), MIXED)
        acc = mm_split(a, b, bl, acc, MIXED)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=configs(_SUM_CANDIDATES, triton.Config({"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_K": 16})),
                 key=["NA", "NB", "MIXED"])
@triton.jit
def _points_sum_kernel(a_ptr, b_ptr, blo_ptr, part_ptr, M, NA, NB, SLAB, MIXED: tl.constexpr,
                       BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """``part[s] = a[rows of slab s]^T @ b[rows of slab s]``: a (M, NA), b (M, NB) row-major,
    part (n_slabs, NA, NB); slabs of ``SLAB`` points (a multiple of BLOCK_K). float32: ``b``
    as ``split_tf32`` head (``b_ptr``) and remainder (``blo_ptr``)."""
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    slab = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(slab * SLAB, tl.minimum(slab * SLAB + SLAB, M), BLOCK_K):
        kk = k0 + offs_k
        at = tl.load(a_ptr + kk[None, :] * NA + offs_a[:, None], mask=(kk[None, :] < M) & (offs_a[:, None] < NA),
                     other=0.0)
        bk, bkl = load_split(b_ptr, blo_ptr, kk[:, None] * NB + offs_b[None, :],
                             (kk[:, None] < M) & (offs_b[None, :] < NB), MIXED)
        acc = mm_split(at, bk, bkl, acc, MIXED)
    tl.store(part_ptr + slab * NA * NB + offs_a[:, None] * NB + offs_b[None, :], acc,
             mask=(offs_a[:, None] < NA) & (offs_b[None, :] < NB))




# --- what runs: fixed rules (the measurements are in bench/RESULTS.md) ---------------------


def fused_fits(P: int, D: int, L: int, H: int, O: int, save: bool) -> bool:
    """Whether the fused kernel can take the problem: it addresses x (P, D), the outputs and
    ReLU pre-activations (L, P, O) and, when saving, lin (L-1, P, H) whole with int32
    offsets, which wrap at ``_common.MAX_ELEMENTS`` (lin of the 3D net at hidden 128 with 3
    layers reaches it at 2^23 points: a 203^3 grid evaluated with gradients). The layered
    forward walks the points in chunks and has no such limit."""
    return max(L * P * O, P * D, (L - 1) * P * H if save else 0) < _common.MAX_ELEMENTS


def choose_forward(requested: str, *, fits: bool) -> str:
    """The forward that runs: "layered" where the fused kernel does not fit (``fused_fits``:
    whatever was requested, as the fused kernel cannot address such buffers), else the
    requested ``mfn_forward`` variant, "fused" for "auto". Source: on an H100 (bench/
    RESULTS.md, sixth session) the earlier code's timed choice took the fused forward for
    every 3D case and most 2D ones; the layered one for 2D hidden 256 in float32 at 2^20
    points (with and without saved activations) and at 2^18 with them, and in mixed
    precision at 2^16 without: the measured alternative there."""
    check_variant("mfn_forward", requested)
    if not fits:
        return "layered"
    return "fused" if requested == "auto" else requested


def choose_products(requested: str, precision: str) -> str:
    """How the backward's products over points run. float32: "cublas" (IEEE float32) for
    "auto": the H100 timed cuBLAS faster for every float32 product, hidden 256 included
    (bench/RESULTS.md, sixth session); "triton" is the measured alternative, which an H200
    had timed faster at hidden 256 (2D, 2^18 points: 10.9 against 13.1 ms fwd+bwd, third
    session). Mixed: the Triton bf16 GEMMs, its only implementation ("cublas" raises)."""
    check_variant("mfn_backward_products", requested)
    if precision == "mixed":
        if requested == "cublas":
            raise ValueError("mfn_backward_products='cublas' is a float32 variant: mixed precision's "
                             "backward products are the Triton bf16 GEMMs ('triton' or 'auto')")
        return "triton"
    return "cublas" if requested == "auto" else requested


# --- forward --------------------------------------------------------------------------------

#: Bytes of (points x H) float32 buffers the layer-by-layer forward holds at once (two
#: ``z`` tiles); it walks the points in chunks that fit.
FWD_WORKSPACE_BYTES = 256 << 20


@on_input_device
def mfn_stack_forward(x: torch.Tensor, params: StackParams, spec: StackSpec, save: bool):
    """The forward, fused or layer by layer as ``choose_forward`` says. ``x`` (P, D) and
    ``params`` (shapes in ``StackParams``) float32 contiguous. Returns (L, P, O) float32
    (rows of layers without a head uninitialised) and, with ``save``, what the backward
    needs: ``lin_i = z_{i-1} A_i^T + c_i`` (L-1, P, H) and, for ReLU heads, the
    pre-activations (L, P, O); else two empty tensors."""
    P, D = x.shape
    L, H, _ = params.w.shape
    O = params.u.shape[1]
    variant = choose_forward(spec.forward, fits=fused_fits(P, D, L, H, O, save))
    choose_products(spec.products, spec.precision)  # a refused variant fails here, not in the backward
    f32 = dict(device=x.device, dtype=torch.float32)
    out = torch.empty((L, P, O), **f32)
    lin = torch.empty((L - 1, P, H) if save else (0,), **f32)
    hpre = torch.empty((L, P, O) if save and spec.relu else (0,), **f32)
    if P > 0:
        impl = _forward_fused if variant == "fused" else _forward_layered
        impl(x, params, spec, save=save, out=out, lin=lin, hpre=hpre)
    return out, lin, hpre


def _flags(params: StackParams, spec: StackSpec) -> dict:
    """The network's constexpr switches of the fused kernel."""
    return dict(HEAD_MASK=spec.head_mask, HAS_C=params.c is not None, GABOR=params.gamma is not None,
                RELU=bool(spec.relu), RESIDUAL=bool(spec.residual), MIXED=spec.mixed)


def _forward_fused(x, params, spec, *, save, out, lin, hpre):
    """``_mfn_stack_fwd_kernel``: the whole stack in one launch (module docstring)."""
    P, D = x.shape
    L, H, _ = params.w.shape
    O = params.u.shape[1]
    block_h = block(H, _MIN_BLOCK_H)
    # no config launches more programs than this (small P: fewer tiles than SMs)
    nprog = min(max_programs(x.device), triton.cdiv(P, _MIN_BLOCK_P))
    scratch = torch.empty((nprog * 2 * _MAX_BLOCK_P_FWD * block_h,), device=x.device, dtype=torch.float32)
    grid = lambda meta: (min(triton.cdiv(P, meta["BLOCK_P"]), nprog),)  # noqa: E731
    # float32: weights split for the kernel's tf32x3 products (``mm_split``), once per call
    (a, a_lo), (u, u_lo) = weight_parts(params.a, spec.precision), weight_parts(params.u, spec.precision)
    w, b = params.w, params.b
    _mfn_stack_fwd_kernel[grid](
        x, w, b, or_dummy(a, w), or_dummy(a_lo, w), or_dummy(params.c, b), u, u_lo, params.d,
        or_dummy(params.gamma, b), or_dummy(params.mu, w),
        out, scratch, or_dummy(lin, out), or_dummy(hpre, out),
        P, H, O,
        D=D, N_LAYERS=L, BLOCK_H=block_h, BLOCK_O=block(O), SAVE=bool(save), **_flags(params, spec),
    )


def _layer(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Layer ``i`` of a stacked optional parameter."""
    return None if t is None else t[i]


def _forward_layered(x, params, spec, *, save, out, lin, hpre):
    """The fused kernel's results, one launch per layer instead: the filter kernel for layer
    0, then the multiplicative-layer kernel (a pipelined GEMM with the filter in its
    epilogue, writing ``lin_i`` too when saving), the heads by ``_head``. ``z_i`` goes
    through global memory, in chunks of points bounded by ``FWD_WORKSPACE_BYTES``."""
    P = x.shape[0]
    L, H, _ = params.w.shape
    a_hi, a_lo = weight_parts(params.a, spec.precision)  # split once for all chunks
    # mixed: U rounded to bf16 once, as the fused kernel's bf16 products take it
    u = params.u.bfloat16().float() if spec.mixed else params.u
    chunk = max(1, FWD_WORKSPACE_BYTES // (2 * 4 * H))
    with ieee_float32():
        for p0 in range(0, P, chunk):
            p1 = min(P, p0 + chunk)
            xs = x[p0:p1]
            total = z = None
            for i in range(L):
                filt = (params.w[i], params.b[i], _layer(params.gamma, i), _layer(params.mu, i))
                if i == 0:
                    z = filter_forward(xs, *filt)
                else:
                    z = multiplicative_layer_forward(z, params.a[i - 1], _layer(params.c, i - 1), xs, *filt,
                                                     spec.precision, lin=lin[i - 1, p0:p1] if save else None,
                                                     a_parts=(a_hi[i - 1], a_lo[i - 1]))
                if not spec.has_head(i):
                    continue
                y = _head(z, u[i], params.d[i], spec.mixed)
                if spec.relu:
                    if save:
                        hpre[i, p0:p1] = y
                    y = y.clamp_min(0.0)
                if spec.residual:
                    total = y if total is None else total + y
                    y = total
                out[i, p0:p1] = y


def _head(z: torch.Tensor, u: torch.Tensor, d: torch.Tensor, mixed: bool) -> torch.Tensor:
    """``z U^T + d`` (n, O) float32 (the caller holds ``ieee_float32``). Mixed: ``z`` rounded
    to bf16 (``u`` arrives rounded), then exact products with fp32 accumulation: what the
    fused kernel's bf16 tensor-core products compute."""
    if mixed:
        z = z.bfloat16().float()
    return torch.addmm(d, z, u.t())


# --- backward -------------------------------------------------------------------------------


@on_input_device
def mfn_stack_backward(grad_out, x, params: StackParams, spec: StackSpec, *, lin, hpre, need_dw, need_da):
    """Backward from what the forward saved (``lin``, ``hpre``). ``grad_out`` (L, P, O)
    (zero rows where no head). Returns dx (P, D) and the parameter gradients as a
    ``StackParams``: dW zeros unless ``need_dw``, dA zeros unless ``need_da``, dc, dgamma,
    dmu None where the parameter is absent.

    Per chunk of points (``_backward_chunk``), top layer first: the layer kernel does
    everything elementwise (sines recomputed, never stored) and writes ``dlin_i`` and
    ``z_{i-1}``; then three GEMMs (``_layer_products``), on cuBLAS or the Triton GEMMs as
    ``choose_products`` says (mixed: Triton GEMMs with bf16 operands, the work buffers being
    bf16 then, as their products round them to bf16 anyway)."""
    cublas = choose_products(spec.products, spec.precision) == "cublas"
    call = _BackwardCall.start(grad_out, x, params, spec, lin=lin, hpre=hpre, need_dw=need_dw,
                               need_da=need_da, cublas=cublas)
    with ieee_float32():
        for p0, p1 in call.chunks():
            _backward_chunk(call, p0=p0, p1=p1)
    return call.finish()


def _head_gradients(grad_out: torch.Tensor, hpre: torch.Tensor, spec: StackSpec) -> torch.Tensor:
    """Gradients of the head pre-activations, (L, P, O): running sums from the top for
    residual outputs, times the ReLU masks (rows of layers without a head unused)."""
    dh = grad_out.flip(0).cumsum(0).flip(0) if spec.residual else grad_out
    if spec.relu:
        dh = dh * (hpre > 0)
    return dh


class _Partials:
    """Program-owned partial sums of the filter and bias gradients, one row per program and
    layer, all in one ``(n_programs, L, 2 H D + 3 H)`` buffer (one fill, one fixed-order
    reduction instead of one per layer and parameter): dW and dmu (H x D each), db, dgamma
    and dc (H each; layer i's dc is c_{i-1}'s gradient)."""

    def __init__(self, nprog: int, L: int, H: int, D: int, device):
        self.sizes = {"w": H * D, "m": H * D, "b": H, "g": H, "c": H}
        self.offsets = dict(zip(self.sizes, itertools.accumulate(self.sizes.values(), initial=0)))
        self.buf = torch.zeros((nprog, L, sum(self.sizes.values())), device=device, dtype=torch.float32)

    def row(self, key: str, i: int) -> torch.Tensor:
        """Layer ``i``'s partials of ``key`` for every program (rows ``stride`` floats apart)."""
        o = self.offsets[key]
        return self.buf[:, i, o:o + self.sizes[key]]

    @property
    def stride(self) -> int:
        return self.buf.stride(0)

    def sums(self, keys) -> dict[str, torch.Tensor]:
        """(L, size) sums over the programs of each of ``keys``, in a fixed order:
        deterministic. One reduction per key, each a tensor of its own (outputs of a custom op
        may not alias each other)."""
        return {k: self.buf[:, :, self.offsets[k]:self.offsets[k] + self.sizes[k]].sum(0) for k in keys}


@dataclasses.dataclass
class _BackwardCall:
    """One backward call: its inputs, the operands its GEMMs take, and its accumulators."""

    x: torch.Tensor
    params: StackParams
    spec: StackSpec
    lin: torch.Tensor
    dh: torch.Tensor  # (L, P, O), ``_head_gradients``
    need_dw: bool
    need_da: bool
    cublas: bool  # products on cuBLAS, else the Triton GEMMs
    split: bool  # float32 Triton GEMMs: second operands split into TF32 head and remainder
    a_hi: torch.Tensor  # the weights of dz = dlin A (split's head with ``split``)
    a_lo: torch.Tensor | None  # and remainder
    top_dh: tuple[torch.Tensor, torch.Tensor] | None  # the top head's dh, split (``_head_sum``)
    work_dtype: torch.dtype  # of the (points x H) work buffers
    nprog: int
    dx: torch.Tensor
    da: torch.Tensor
    du: torch.Tensor
    dd: torch.Tensor
    partials: _Partials

    @classmethod
    def start(cls, grad_out, x, params, spec, *, lin, hpre, need_dw, need_da, cublas):
        P, D = x.shape
        L, H, _ = params.w.shape
        O = params.u.shape[1]
        f32 = dict(device=x.device, dtype=torch.float32)
        dh = _head_gradients(grad_out, hpre, spec)
        split = not spec.mixed and not cublas
        nprog = max(1, min(max_programs(x.device), triton.cdiv(max(P, 1), _MIN_BLOCK_P)))
        a_hi, a_lo = split_tf32(params.a) if split else (params.a, None)
        return cls(
            x=x, params=params, spec=spec, lin=lin, dh=dh, need_dw=bool(need_dw), need_da=bool(need_da),
            cublas=cublas, split=split, a_hi=a_hi, a_lo=a_lo,
            top_dh=split_tf32(dh[L - 1]) if split and spec.has_head(L - 1) else None,
            work_dtype=torch.bfloat16 if spec.mixed else torch.float32, nprog=nprog,
            dx=torch.zeros((P, D), **f32), da=torch.zeros((max(L - 1, 0), H, H), **f32),
            du=torch.zeros((L, O, H), **f32), dd=dh.sum(1),  # rows of layers without a head unused
            partials=_Partials(nprog, L, H, D, x.device),
        )

    def chunks(self) -> list[tuple[int, int]]:
        """Point ranges whose work buffers fit ``BWD_WORKSPACE_BYTES``: at most three
        (points x H) buffers alive at once (dz_i or z_i, dlin_i, z_{i-1}), four with
        ``split`` (z_{i-1}'s remainder)."""
        P, H = self.x.shape[0], self.params.w.shape[1]
        chunk = max(_MIN_BLOCK_P, BWD_WORKSPACE_BYTES // ((4 if self.split else 3) * 4 * H))
        return [(p0, min(P, p0 + chunk)) for p0 in range(0, P, chunk)]

    def finish(self) -> tuple[torch.Tensor, StackParams]:
        """dx and the parameter gradients (``mfn_stack_backward``)."""
        p = self.params
        L, H, D = p.w.shape
        present = {"w": True, "b": True, "c": p.c is not None, "g": p.gamma is not None, "m": p.mu is not None}
        sums = self.partials.sums([k for k, there in present.items() if there])
        return self.dx, StackParams(
            w=sums["w"].view(L, H, D), b=sums["b"], a=self.da, c=sums["c"][1:] if p.c is not None else None,
            u=self.du, d=self.dd, gamma=sums["g"] if p.gamma is not None else None,
            mu=sums["m"].view(L, H, D) if p.mu is not None else None,
        )


@dataclasses.dataclass
class _LayerBuffers:
    """What layer i's kernel writes for its products: dlin_i and z_{i-1} (i >= 1; with
    ``split`` also z_{i-1}'s remainder), and z_i on a top layer with a head (a lower layer's
    z_i is the z_{i-1} of the layer above). Empty where not written."""

    dlin: torch.Tensor | None
    zprev: torch.Tensor | None
    zprev_lo: torch.Tensor | None
    z: torch.Tensor | None


def _backward_chunk(call: _BackwardCall, *, p0: int, p1: int) -> None:
    """Points p0..p1, top layer first: each layer's kernel, then its products, which hand
    dz_{i-1} down. dz_i is freed once the kernel has read it, dlin_i and z_i once the
    products have: each before the next buffer of its size is allocated (the budget of
    ``_BackwardCall.chunks``)."""
    dz = None  # dz_i, from layer i + 1
    for i in reversed(range(call.params.w.shape[0])):
        bufs = _layer_kernel(call, i=i, p0=p0, p1=p1, dz=dz)
        del dz
        dz = _layer_products(call, i=i, p0=p0, p1=p1, bufs=bufs)
        del bufs


def _layer_kernel(call: _BackwardCall, *, i: int, p0: int, p1: int, dz: torch.Tensor | None) -> _LayerBuffers:
    """``_mfn_stack_bwd_kernel`` for layer i on points p0..p1: adds to the filter partials and
    dx, and returns the buffers it wrote for the products."""
    p, spec = call.params, call.spec
    L, H, D = p.w.shape
    O = p.u.shape[1]
    n = p1 - p0
    has_head = spec.has_head(i)
    store_z = has_head and i == L - 1

    def buf(live):
        return torch.empty((n, H) if live else (0,), device=call.x.device, dtype=call.work_dtype)

    out = _LayerBuffers(dlin=buf(i >= 1), zprev=buf(i >= 1), zprev_lo=buf(i >= 1 and call.split), z=buf(store_z))
    dummy = call.dx  # a valid pointer where a constexpr switch leaves an argument unused
    ip = max(i - 1, 0)
    part = call.partials
    grid = lambda meta: (min(triton.cdiv(n, meta["BLOCK_P"]), call.nprog),)  # noqa: E731
    _mfn_stack_bwd_kernel[grid](
        call.dh[i, p0:p1] if has_head else dummy, call.x[p0:p1],
        p.w[i], p.b[i], or_dummy(_layer(p.gamma, i), dummy), or_dummy(_layer(p.mu, i), dummy),
        p.w[ip], p.b[ip], or_dummy(_layer(p.gamma, ip), dummy), or_dummy(_layer(p.mu, ip), dummy), p.u[i],
        call.lin[i - 1, p0:p1] if i >= 1 else dummy, call.lin[i - 2, p0:p1] if i >= 2 else dummy,
        or_dummy(dz, dummy),
        or_dummy(out.dlin, dummy), or_dummy(out.zprev, dummy), or_dummy(out.zprev_lo, dummy),
        or_dummy(out.z, dummy), call.dx[p0:p1],
        part.row("w", i), part.row("b", i), part.row("g", i), part.row("m", i), part.row("c", i),
        n, H, O, part.stride,
        D=D, HAS_LIN=i >= 1, HAS_DZ=dz is not None, HAS_PREV_LIN=i >= 2,
        HEAD_TO_TRUNK=has_head and i >= spec.detach_heads_below, STORE_Z=store_z, SPLIT_Z=call.split,
        HAS_C=p.c is not None, GABOR=p.gamma is not None, NEED_DW=call.need_dw, MIXED=spec.mixed,
        BLOCK_H=block(H, _MIN_BLOCK_H), BLOCK_O=block(O), BLOCK_D=block(D, 2),
    )
    return out


def _layer_products(call: _BackwardCall, *, i: int, p0: int, p1: int, bufs: _LayerBuffers):
    """Layer i's GEMMs over points p0..p1: dU_i += dh_i^T z_i on the top layer,
    dU_{i-1} += dh_{i-1}^T z_{i-1}, dA_i += dlin_i^T z_{i-1}; returns dz_{i-1} = dlin_i A_i
    (None for i = 0)."""
    spec = call.spec
    kw = dict(mixed=spec.mixed, cublas=call.cublas)
    if i == call.params.w.shape[0] - 1 and spec.has_head(i):
        _head_sum(call, i=i, p0=p0, p1=p1, z=bufs.z, z_lo=None)
    if i == 0:
        return None
    zprev_lo = bufs.zprev_lo if call.split else None
    if spec.has_head(i - 1):
        _head_sum(call, i=i - 1, p0=p0, p1=p1, z=bufs.zprev, z_lo=zprev_lo)
    if call.need_da:
        _add_points_sum(call.da[i - 1], bufs.dlin, bufs.zprev, zprev_lo, **kw)
    bufs.zprev = bufs.zprev_lo = zprev_lo = None  # freed before dz_{i-1} is allocated
    return _rows_matmul(bufs.dlin, call.a_hi[i - 1], None if call.a_lo is None else call.a_lo[i - 1], **kw)


def _head_sum(call: _BackwardCall, *, i: int, p0: int, p1: int, z: torch.Tensor, z_lo: torch.Tensor | None):
    """dU_i += dh_i^T z_i over points p0..p1. With ``split``, the top layer's own z arrives
    unsplit (the kernel splits only the z_{i-1} it writes): it goes first, (z^T dh)^T, with
    the top head's dh split on the host."""
    kw = dict(mixed=call.spec.mixed, cublas=call.cublas)
    if call.split and z_lo is None:
        dh_hi, dh_lo = call.top_dh
        _add_points_sum(call.du[i].t(), z, dh_hi[p0:p1], dh_lo[p0:p1], **kw)
    else:
        _add_points_sum(call.du[i], call.dh[i, p0:p1], z, z_lo, **kw)


def _rows_matmul(a, b, b_lo, *, mixed, cublas):
    """(M, K) @ (K, N) -> (M, N) float32 for a weight ``b``, by cuBLAS (the caller holds
    ``ieee_float32``) or the Triton GEMM (``b_lo``: the ``split_tf32`` remainder of ``b``
    for the float32 Triton GEMM, ``b`` being its head; None elsewhere)."""
    if cublas:
        return torch.mm(a, b)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _rows_matmul_kernel[grid](a, b, or_dummy(b_lo, b), c, M, N, K, MIXED=mixed)
    return c


def _add_points_sum(out, a, b, b_lo, *, mixed, cublas):
    """``out += a^T b`` (NA, NB) float32 for a (M, NA), b (M, NB), in place (one ``addmm_``
    launch on cuBLAS, the kernel and one sum with add otherwise), by cuBLAS (the caller holds
    ``ieee_float32``) or the Triton GEMM (``b_lo``: the ``split_tf32`` remainder of ``b``
    for the float32 Triton GEMM, ``b`` being its head; None elsewhere): the sum over points
    split into slabs (parallelism; a (H, H) result alone is one or four tiles), the slab
    partials summed in a fixed order (deterministic)."""
    if cublas:
        out.addmm_(a.t(), b)
        return
    M, NA = a.shape
    NB = b.shape[1]
    tiles = triton.cdiv(NA, 64) * triton.cdiv(NB, 64)
    n_slabs = max(1, min(triton.cdiv(M, 1024), triton.cdiv(4 * max_programs(a.device, 1), tiles)))
    slab = triton.cdiv(triton.cdiv(M, n_slabs), 64) * 64  # a multiple of every BLOCK_K
    n_slabs = triton.cdiv(M, slab)
    part = torch.empty((n_slabs, NA, NB), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(NA, meta["BLOCK_A"]), triton.cdiv(NB, meta["BLOCK_B"]), n_slabs)  # noqa: E731
    _points_sum_kernel[grid](a, b, or_dummy(b_lo, b), part, M, NA, NB, slab, MIXED=mixed)
    out.add_(part.sum(0))
