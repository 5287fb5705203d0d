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

Second forward (``_forward_layered``): the filter kernel for layer 0, then per layer the
multiplicative-layer kernel (a pipelined GEMM, 64-128 wide tiles, with the filter in its
epilogue; it also writes ``lin_i`` when saving) and the heads as ``addmm``, over chunks of
points (``FWD_WORKSPACE_BYTES``). ``z_i`` makes a round trip through global memory, but
the products run as plain pipelined GEMMs, where the fused kernel's small column blocks,
two programs per SM (255 registers) and scratch reads leave it far below the tensor
cores' rate (~10%, bench/RESULTS.md). Which is faster depends on the GPU, the width and
the number of points, and was never measured: ``_forward_strategy`` times both on the
first call per network shape and size and keeps the faster, as autotuning does for
configs (fused without timing on the interpreter, under CUDA-graph capture, with
``FIELDKERN_AUTOTUNE=0`` and under ``torch.use_deterministic_algorithms``).

Backward (``mfn_stack_backward``): per chunk of points (work buffers bounded by
``BWD_WORKSPACE_BYTES``), top layer first,

1. ``_mfn_stack_bwd_kernel``, one launch per layer, elementwise in column blocks: recompute
   ``g_i`` (sin, cos, envelope) from ``x`` and ``z_i = lin_i g_i``; ``dz_i`` (from layer
   i+1) plus ``dh_i U_i`` (only for ``i >= detach_heads_below``); the filter gradients
   ``db, dW (if trainable), dgamma, dmu``, ``dc`` and this layer's share of ``dx``; writes
   ``dlin_i = dz_i g_i`` and ``z_{i-1}`` (sines of layer i-1 recomputed);
2. three GEMMs over the chunk's points: ``dA_i += dlin_i^T z_{i-1}``,
   ``dU_{i-1} += dh_{i-1}^T z_{i-1}``, ``dz_{i-1} = dlin_i A_i`` (``_points_sum_kernel`` /
   ``_rows_matmul_kernel``: tf32x3 or bf16 on tensor cores; float32 may run on cuBLAS
   instead, whichever ``_backward_products`` times faster on the first call). In float32 each
   GEMM's second operand arrives split into TF32 head and remainder (``mm_split``): the
   weights ``A_i`` split on the host, ``z_{i-1}`` written split by the layer kernel (a
   fourth work buffer), and the top layer's own ``z`` goes first in ``(z^T dh)^T`` with
   the top head's ``dh`` split on the host.

The previous design recomputed the whole trunk inside one fused backward kernel and
accumulated ``dA`` per tile with FMA products (255 registers, spills); on an H200 it took
8.3 ms of the 3D 9.7 ms fwd+bwd (bench/RESULTS.md). Keeping ``lin_i`` costs (L-1) x P x H
floats (0.17-0.19 of eager PyTorch's training memory for the benchmark networks).

Reductions over points are deterministic: each program adds its tiles into its own row of
``[n_programs, ...]`` partial buffers (plain load/add/store, no atomics), the GEMMs' slab
partials are summed in a fixed order, and ``dx`` rows belong to one program each.
"""

from __future__ import annotations

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
    interpreting,
    load_split,
    max_programs,
    mm,
    mm_split,
    on_input_device,
    sine,
    split_tf32,
    timed_choice,
    weight_parts,
    _split_tf32,
)
from fieldkern.kernels.filters import filter_forward
from fieldkern.kernels.multiplicative_layer import multiplicative_layer_forward


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
    x_ptr, w_ptr, b_ptr, a_ptr, alo_ptr, c_ptr, u_ptr, ulo_ptr, d_ptr, gamma_ptr, mu_ptr, out_ptr, scratch_ptr,
    lin_ptr, hpre_ptr,
    P, H, O,
    D: tl.constexpr, N_LAYERS: tl.constexpr, HEAD_MASK: tl.constexpr, HAS_C: tl.constexpr,
    GABOR: tl.constexpr, RELU: tl.constexpr, RESIDUAL: tl.constexpr, MIXED: tl.constexpr,
    SAVE: tl.constexpr,
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
    dh_ptr, x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, wp_ptr, bp_ptr, gammap_ptr, mup_ptr, u_ptr,
    lin_ptr, linp_ptr, dz_ptr, dlin_ptr, zp_ptr, zplo_ptr, z_ptr, dx_ptr,
    pw_ptr, pb_ptr, pg_ptr, pm_ptr, pc_ptr,
    P, H, O, ROW,
    D: tl.constexpr, HAS_LIN: tl.constexpr, HAS_DZ: tl.constexpr, HAS_PREV_LIN: tl.constexpr,
    HEAD_TO_TRUNK: tl.constexpr, STORE_Z: tl.constexpr, SPLIT_Z: tl.constexpr, HAS_C: tl.constexpr,
    GABOR: tl.constexpr,
    NEED_DW: tl.constexpr, MIXED: tl.constexpr,
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
    left to the GEMMs below too."""
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


# The backward's products over points, as Triton GEMMs so that float32 runs on tensor
# cores as tf32x3 (cuBLAS float32 is SIMT FMA: 37-54 TFLOPS on an H200, 0.18-0.75 ms per
# product at 2^18 points, bench/RESULTS.md) and mixed as bf16, both with fp32 results;
# float32 may take cuBLAS instead (``_backward_products``).
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


#: Pins the float32 backward's products, "cublas" or "triton" (tests, benchmarks); None:
#: measured (``_backward_products``).
BACKWARD_PRODUCTS = None
_backward_choice: dict[tuple, str] = {}


def _default_products(hidden):
    """Without a timing: cuBLAS at H <= 128. Measured on an H200 (bench/RESULTS.md), before
    the pre-split operands (``mm_split``): 3D hidden 128 fwd+bwd took 4.4 ms with cuBLAS's
    SIMT products and 6.9 ms with the Triton GEMMs, while at hidden 256 these cut 2D
    fwd+bwd from 13.1 to 10.9 ms."""
    return "cublas" if hidden <= 128 else "triton"


def _backward_products(key, device, hidden, run):
    """"cublas" or "triton" for the float32 backward's products: on the first call per key
    both backwards run and are timed on the device, the faster is kept (as for the
    forward's strategy); ``_default_products`` where nothing can be timed."""
    if BACKWARD_PRODUCTS is not None:
        return BACKWARD_PRODUCTS
    return timed_choice(_backward_choice, key, device, ("cublas", "triton"), run, _default_products(hidden))


def _rows_matmul(a, b, b_lo, mixed, cublas):
    """(M, K) @ (K, N) -> (M, N) float32 for a weight ``b``, by cuBLAS or the Triton GEMM
    (``b_lo``: the ``split_tf32`` remainder of ``b`` for the float32 Triton GEMM, ``b``
    being its head; None elsewhere)."""
    if cublas:
        return torch.mm(a, b)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _rows_matmul_kernel[grid](a, b, b if b_lo is None else b_lo, c, M, N, K, MIXED=mixed)
    return c


def _points_sum(a, b, b_lo, mixed, cublas):
    """``a^T b`` (NA, NB) float32 for a (M, NA), b (M, NB), by cuBLAS or the Triton GEMM
    (``b_lo``: the ``split_tf32`` remainder of ``b`` for the float32 Triton GEMM, ``b``
    being its head; None elsewhere): the sum over points split into slabs (parallelism; a
    (H, H) result alone is one or four tiles), the slab partials summed in a fixed order
    (deterministic)."""
    if cublas:
        return torch.mm(a.t(), b)
    M, NA = a.shape
    NB = b.shape[1]
    tiles = triton.cdiv(NA, 64) * triton.cdiv(NB, 64)
    n_slabs = max(1, min(triton.cdiv(M, 1024), triton.cdiv(4 * max_programs(a.device, 1), tiles)))
    slab = triton.cdiv(triton.cdiv(M, n_slabs), 64) * 64  # a multiple of every BLOCK_K
    n_slabs = triton.cdiv(M, slab)
    part = torch.empty((n_slabs, NA, NB), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(NA, meta["BLOCK_A"]), triton.cdiv(NB, meta["BLOCK_B"]), n_slabs)  # noqa: E731
    _points_sum_kernel[grid](a, b, b if b_lo is None else b_lo, part, M, NA, NB, slab, MIXED=mixed)
    return part.sum(0)


def _flags(head_mask, gamma, c, relu, residual, precision):
    return dict(HEAD_MASK=head_mask, HAS_C=c is not None, GABOR=gamma is not None,
                RELU=bool(relu), RESIDUAL=bool(residual), MIXED=precision == "mixed")


#: Bytes of (points x H) float32 buffers the layer-by-layer forward holds at once (two
#: ``z`` tiles); it walks the points in chunks that fit.
FWD_WORKSPACE_BYTES = 256 << 20
#: Pins the forward's strategy, "fused" or "layered" (tests, benchmarks); None: measured.
FORWARD_STRATEGY = None
_forward_choice: dict[tuple, str] = {}


def _forward_layered(x, w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, precision, save, out, lin,
                     hpre):
    """The fused kernel's results, one launch per layer instead: the filter kernel for layer
    0, then the multiplicative-layer kernel (a pipelined GEMM with the filter in its
    epilogue, writing ``lin_i`` too when saving), the heads as ``addmm`` (float32 in both
    precisions). ``z_i`` goes through global memory, in chunks of points bounded by
    ``FWD_WORKSPACE_BYTES``."""
    P = x.shape[0]
    L, H, _ = w.shape
    a_hi, a_lo = weight_parts(a, precision)  # split once for all chunks
    chunk = max(1, FWD_WORKSPACE_BYTES // (2 * 4 * H))
    for p0 in range(0, P, chunk):
        p1 = min(P, p0 + chunk)
        xs = x[p0:p1]
        total = z = None
        for i in range(L):
            filt = (w[i], b[i], None if gamma is None else gamma[i], None if mu is None else mu[i])
            if i == 0:
                z = filter_forward(xs, *filt)
            else:
                z = multiplicative_layer_forward(z, a[i - 1], None if c is None else c[i - 1], xs, *filt,
                                                 precision, lin=lin[i - 1, p0:p1] if save else None,
                                                 a_parts=(a_hi[i - 1], a_lo[i - 1]))
            if (head_mask >> i) & 1:
                y = torch.addmm(d[i], z, u[i].t())
                if relu:
                    if save:
                        hpre[i, p0:p1] = y
                    y = y.clamp_min(0.0)
                if residual:
                    total = y if total is None else total + y
                    y = total
                out[i, p0:p1] = y


def _forward_strategy(key, device, run):
    """"fused" or "layered" for this network shape and size: on the first call per key
    (the point count enters as its bit length), both run and are timed on the device and
    the faster is kept, as autotuning does for kernel configs. Fused without timing where
    ``_common.can_time`` says no."""
    if FORWARD_STRATEGY is not None:
        return FORWARD_STRATEGY
    return timed_choice(_forward_choice, key, device, ("fused", "layered"), run, "fused")


@on_input_device
def mfn_stack_forward(x, w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, precision, save):
    """The forward, fused or layer by layer (``_forward_strategy``). Shapes: x (P, D); w (L, H, D); b (L, H); a (L-1, H, H);
    c (L-1, H) or None; u (L, O, H); d (L, O) (rows of layers without a head unused);
    gamma (L, H), mu (L, H, D) or None. All fp32 contiguous. Returns (L, P, O) fp32 (rows of
    layers without a head uninitialised) and, with ``save``, what the backward needs:
    ``lin_i = z_{i-1} A_i^T + c_i`` (L-1, P, H) and, for ReLU heads, the pre-activations
    (L, P, O); else two empty tensors. Layered, without timing, where the fused kernel's
    offsets would not fit in int32 (``_common.MAX_ELEMENTS``)."""
    P, D = x.shape
    L, H, _ = w.shape
    O = u.shape[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    out = torch.empty((L, P, O), **f32)
    lin = torch.empty((L - 1, P, H) if save else (0,), **f32)
    hpre = torch.empty((L, P, O) if save and relu else (0,), **f32)
    if P == 0:
        return out, lin, hpre

    def run(strategy):
        impl = _forward_layered if strategy == "layered" else _forward_fused
        impl(x, w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, precision, save, out, lin, hpre)

    # The fused kernel addresses lin (L-1, P, H), out / hpre (L, P, O) and x whole, with int32
    # offsets: for the 3D net at hidden 128 with 3 layers, lin passes 2^31 elements at 2^23
    # points (a 203^3 grid evaluated with gradients). The layered forward walks the points
    # in chunks, so it takes such problems whatever FORWARD_STRATEGY says.
    if max(L * P * O, P * D, (L - 1) * P * H if save else 0) >= _common.MAX_ELEMENTS:
        run("layered")
        return out, lin, hpre
    key = (P.bit_length(), H, D, L, O, head_mask, bool(residual), bool(relu), c is not None, gamma is not None,
           precision, bool(save), x.device.index)
    run(_forward_strategy(key, x.device, run))
    return out, lin, hpre


def _forward_fused(x, w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, precision, save, out, lin, hpre):
    """``_mfn_stack_fwd_kernel``: the whole stack in one launch (module docstring)."""
    P, D = x.shape
    L, H, _ = w.shape
    O = u.shape[1]
    block_h = block(H, _MIN_BLOCK_H)
    # no config launches more programs than this (small P: fewer tiles than SMs)
    nprog = min(max_programs(x.device), triton.cdiv(P, _MIN_BLOCK_P))
    scratch = torch.empty((nprog * 2 * _MAX_BLOCK_P_FWD * block_h,), device=x.device, dtype=torch.float32)
    grid = lambda meta: (min(triton.cdiv(P, meta["BLOCK_P"]), nprog),)  # noqa: E731
    # float32: weights split for the kernel's tf32x3 products (``mm_split``), once per call
    (a, a_lo), (u, u_lo) = weight_parts(a, precision), weight_parts(u, precision)
    _mfn_stack_fwd_kernel[grid](
        x, w, b, a if a.numel() else w, a_lo if a_lo.numel() else w, c if c is not None else b, u, u_lo, d,
        gamma if gamma is not None else b, mu if mu is not None else w, out, scratch,
        lin if lin.numel() else out, hpre if hpre.numel() else out,
        P, H, O,
        D=D, N_LAYERS=L, BLOCK_H=block_h, BLOCK_O=block(O), SAVE=bool(save),
        **_flags(head_mask, gamma, c, relu, residual, precision),
    )


@on_input_device
def mfn_stack_backward(grad_out, x, w, b, a, c, u, d, gamma, mu, lin, hpre, head_mask, residual,
                       relu, detach_heads_below, need_dw, need_da, precision):
    """Backward from what the forward saved (``lin``, ``hpre``). ``grad_out`` (L, P, O)
    (zero rows where no head). Returns dx (P, D), dW (L, H, D) (zeros unless ``need_dw``),
    db (L, H), dA (L-1, H, H) (zeros unless ``need_da``), dc (L-1, H) or None, dU (L, O, H),
    dd (L, O), dgamma (L, H) or None, dmu (L, H, D) or None.

    Per chunk of points, top layer first: the layer kernel does everything elementwise
    (sines recomputed, never stored) and writes ``dlin_i`` and ``z_{i-1}``; then three
    GEMMs: ``dA_i += dlin_i^T z_{i-1}``, ``dU_{i-1} += dh_{i-1}^T z_{i-1}`` and
    ``dz_{i-1} = dlin_i A_i`` (float32 as tf32x3 Triton GEMMs or on cuBLAS, whichever
    ``_backward_products`` measured faster; mixed: Triton GEMMs with bf16 operands, the
    work buffers being bf16 then, as their products round them to bf16 anyway)."""
    args = (grad_out, x, w, b, a, c, u, d, gamma, mu, lin, hpre, head_mask, residual, relu,
            detach_heads_below, need_dw, need_da, precision)
    if precision == "mixed":
        return _backward(*args, cublas=False)
    P, D = x.shape
    L, H, _ = w.shape
    key = (P.bit_length(), H, D, L, u.shape[1], head_mask, bool(residual), bool(relu), detach_heads_below,
           bool(need_dw), bool(need_da), c is not None, gamma is not None, x.device.index)
    products = _backward_products(key, x.device, H, lambda p: _backward(*args, cublas=p == "cublas"))
    return _backward(*args, cublas=products == "cublas")


def _backward(grad_out, x, w, b, a, c, u, d, gamma, mu, lin, hpre, head_mask, residual, relu,
              detach_heads_below, need_dw, need_da, precision, cublas):
    """``mfn_stack_backward`` with its products on cuBLAS (``cublas``) or the Triton GEMMs."""
    P, D = x.shape
    L, H, _ = w.shape
    O = u.shape[1]
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    heads = [i for i in range(L) if (head_mask >> i) & 1]
    # head gradients: running sums from the top for residual outputs, ReLU masks
    dh_all = grad_out.flip(0).cumsum(0).flip(0) if residual else grad_out
    if relu:
        dh_all = dh_all * (hpre > 0)
    dd = dh_all.sum(1)  # rows of layers without a head are not used
    dx = torch.zeros((P, D), **f32)
    da = torch.zeros((max(L - 1, 0), H, H), **f32)
    du = torch.zeros((L, O, H), **f32)
    nprog = max(1, min(max_programs(dev), triton.cdiv(max(P, 1), _MIN_BLOCK_P)))
    # program-owned partial sums, one row per program (summed in a fixed order below), all
    # in one buffer: one fill and one reduction instead of one per layer and parameter
    sizes = {"w": H * D, "m": H * D, "b": H, "g": H, "c": H}
    part = torch.zeros((nprog, L, sum(sizes.values())), **f32)
    offsets = dict(zip(sizes, [0, H * D, 2 * H * D, 2 * H * D + H, 2 * H * D + 2 * H]))
    view = lambda k, i: part[:, i, offsets[k]:offsets[k] + sizes[k]]  # noqa: E731
    mixed = precision == "mixed"
    # float32 Triton GEMMs take their second operand split (``mm_split``): the weights of
    # dz = dlin A here, once; z_{i-1} of dA = dlin^T z_{i-1} and dU = dh^T z_{i-1} from the
    # layer kernel, which writes head and remainder (one more work buffer); the top
    # layer's own z goes first in (z^T dh)^T, with the top head's dh split here
    split = not mixed and not cublas
    a_hi, a_lo = split_tf32(a) if split else (a, None)
    top_dh = split_tf32(dh_all[L - 1]) if split and L - 1 in heads else None
    work_dtype = torch.bfloat16 if mixed else torch.float32
    # at most three (points x H) buffers alive at once: dz_i (or z_i), dlin_i, z_{i-1}; four
    # with ``split`` (z_{i-1}'s remainder)
    chunk = max(_MIN_BLOCK_P, BWD_WORKSPACE_BYTES // ((4 if split else 3) * 4 * H))
    block_h = block(H, _MIN_BLOCK_H)
    has_c = c is not None
    for p0 in range(0, P, chunk):
        p1 = min(P, p0 + chunk)
        n = p1 - p0
        dz = None  # dz_i, from layer i + 1
        grid = lambda meta: (min(triton.cdiv(n, meta["BLOCK_P"]), nprog),)  # noqa: E731

        def head_sum(i, z, z_lo):  # dU_i += dh_i^T z_i
            if split and z_lo is None:  # the top layer's own z, not split: (z^T dh)^T
                du[i] += _points_sum(z, top_dh[0][p0:p1], top_dh[1][p0:p1], mixed, cublas).t()
            else:
                du[i] += _points_sum(dh_all[i, p0:p1], z, z_lo, mixed, cublas)

        for i in reversed(range(L)):
            has_head = i in heads
            # z_i of lower layers is the z_{i-1} output of the layer above; the top writes its own
            store_z = has_head and i == L - 1
            buf = lambda live: torch.empty((n, H) if live else (0,), device=dev, dtype=work_dtype)  # noqa: E731
            dlin, zprev, z = buf(i >= 1), buf(i >= 1), buf(store_z)
            zprev_lo = buf(i >= 1 and split)
            dummy = dx  # a valid pointer where a constexpr switch leaves an argument unused
            ip = max(i - 1, 0)
            _mfn_stack_bwd_kernel[grid](
                dh_all[i, p0:p1] if has_head else dummy, x[p0:p1], w[i], b[i],
                gamma[i] if gamma is not None else dummy, mu[i] if mu is not None else dummy,
                w[ip], b[ip], gamma[ip] if gamma is not None else dummy,
                mu[ip] if mu is not None else dummy, u[i],
                lin[i - 1, p0:p1] if i >= 1 else dummy, lin[i - 2, p0:p1] if i >= 2 else dummy,
                dz if dz is not None else dummy, dlin if i >= 1 else dummy,
                zprev if i >= 1 else dummy, zprev_lo if zprev_lo.numel() else dummy,
                z if store_z else dummy, dx[p0:p1],
                view("w", i), view("b", i), view("g", i), view("m", i), view("c", i),
                n, H, O, part.stride(0),
                D=D, HAS_LIN=i >= 1, HAS_DZ=dz is not None, HAS_PREV_LIN=i >= 2,
                HEAD_TO_TRUNK=has_head and i >= detach_heads_below, STORE_Z=store_z, SPLIT_Z=split,
                HAS_C=has_c, GABOR=gamma is not None, NEED_DW=bool(need_dw), MIXED=mixed,
                BLOCK_H=block_h, BLOCK_O=block(O), BLOCK_D=block(D, 2),
            )
            dz = None  # consumed
            if store_z:
                head_sum(i, z, None)
            if i >= 1:
                if i - 1 in heads:
                    head_sum(i - 1, zprev, zprev_lo if split else None)
                if need_da:
                    da[i - 1] += _points_sum(dlin, zprev, zprev_lo if split else None, mixed, cublas)
                zprev = zprev_lo = None
                dz = _rows_matmul(dlin, a_hi[i - 1], None if a_lo is None else a_lo[i - 1], mixed, cublas)
            dlin = z = None
    # fixed-order reduction over the program rows: deterministic
    total = part.sum(0)
    # copies: outputs of a custom op may not alias each other
    sums = {k: total[:, offsets[k]:offsets[k] + sizes[k]].clone() for k in sizes}
    sums["w"], sums["m"] = sums["w"].view(L, H, D), sums["m"].view(L, H, D)
    return (
        dx, sums["w"], sums["b"], da, sums["c"][1:] if has_c else None,
        du, dd, sums["g"] if gamma is not None else None,
        sums["m"] if mu is not None else None,
    )
