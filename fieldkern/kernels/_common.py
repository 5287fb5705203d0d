"""Helpers shared by the kernel files: interpreter detection, autotune configs, block sizes,
IEEE float32 cuBLAS calls, sines, split tf32x3 products, filters."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    """False under ``FIELDKERN_AUTOTUNE=0``: each kernel keeps its first autotune config."""
    return os.environ.get("FIELDKERN_AUTOTUNE", "1") != "0"


def configs(gpu_configs: list[triton.Config], interp_config: triton.Config) -> list[triton.Config]:
    """Autotune configs: the GPU list, or one small config under the interpreter (autotuning
    there would rerun every candidate in Python). ``@triton.autotune`` times the candidates
    on the first launch per key and keeps the fastest: it chooses tile sizes and warps, never
    which code path runs (that is a fixed rule, ``fieldkern.ops.set_variant``).
    ``FIELDKERN_AUTOTUNE=0`` keeps only the first GPU config: each candidate costs a
    compilation (2-3 s per stack-forward candidate on one CPU core, triton 3.6 and 3.9) and a
    timing on the first call, which short jobs (tests, smoke runs) need not pay."""
    if interpreting():
        return [interp_config]
    if not autotuning():
        return gpu_configs[:1]
    return gpu_configs


def block(n: int, minimum: int = 16) -> int:
    """Power-of-two block covering ``n`` (``tl.dot`` needs every dim >= 16)."""
    return max(minimum, triton.next_power_of_2(int(n)))


#: Kernels address point-major buffers (``(P, H)``, ``(P, D)``, ...) with int32 offsets such as
#: ``offs_p * H``, which wrap at 2^31 elements: an illegal address or another buffer's memory
#: on a GPU (a (P, 128) buffer reaches it at 2^24 points, a 256^3 grid). Launchers keep every
#: buffer one launch addresses below this, by walking the points in ``point_chunks``; the
#: stack's fused forward gives way to its layered one. Tests lower it to force chunking.
MAX_ELEMENTS = 1 << 31


def point_chunks(P: int, *widths: int) -> list[tuple[int, int]]:
    """``(p0, p1)`` ranges covering ``range(P)`` in order, each short enough that a
    ``(p1 - p0, width)`` buffer has fewer than ``MAX_ELEMENTS`` elements for every ``width``:
    just ``(0, P)`` for problems below the limit, none for ``P == 0``. Padding lanes of a chunk's last tile may
    compute wrapped offsets; they are masked, never dereferenced."""
    rows = max(1, (MAX_ELEMENTS - 1) // max(1, *widths))
    if rows < P and rows >= 16:
        # chunks start 16-byte aligned in every buffer, as Triton specializes pointers on
        # it (vectorized accesses); else each chunk could compile a slower variant
        rows -= rows % 16
    return [(p0, min(P, p0 + rows)) for p0 in range(0, P, rows)]


def or_dummy(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """``t``, or ``dummy`` where ``t`` is None or empty: a kernel takes a valid pointer for
    every argument, also for those a constexpr switch leaves unread."""
    return dummy if t is None or t.numel() == 0 else t


@contextlib.contextmanager
def ieee_float32():
    """Within the block, torch's float32 matmuls (cuBLAS on a GPU) compute in IEEE float32,
    whatever torch's TF32 switch says (``torch.backends.cuda.matmul.allow_tf32``,
    ``.fp32_precision``, ``torch.set_float32_matmul_precision``); the switch is restored on
    exit, also on error. Python flags only: cheap, and safe under CUDA-graph capture (the
    captured GEMMs keep the precision they were captured with). The kernels' launchers hold
    it around every float32 torch product; the custom ops are opaque to torch.compile, so
    it never runs inside a traced graph."""
    matmul = torch.backends.cuda.matmul
    new_api = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; None before
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the legacy and new APIs were mixed: only the new one reads
        legacy = None
    if new_api == "ieee" or (new_api is None and legacy == "highest"):
        yield
        return
    matmul.allow_tf32 = False  # sets both APIs to IEEE float32
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        if new_api is not None:
            matmul.fp32_precision = new_api


def device_guard(device: torch.device | None):
    """Make ``device`` the current CUDA device for the block (nothing for other devices)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_input_device(launcher):
    """Run a launcher with its first tensor argument's GPU as the current device: Triton
    launches on the current device, so tensors on ``cuda:1`` while ``cuda:0`` is current
    would otherwise be read by kernels on another GPU."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        with device_guard(device):
            return launcher(*args, **kwargs)

    return wrapper


def max_programs(device: torch.device, per_sm: int = 2) -> int:
    """Size of the persistent grid. Per-program scratch and gradient partials scale with
    it, not with the number of points."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: two programs, so the multi-tile loop is exercised by tests


# The interpreter's bf16 x bf16 tl.dot returns garbage (numpy has no bfloat16), so there the
# mixed mode rounds the operands to bf16 and multiplies in fp32: the same products (a bf16
# product is exact in fp32), only the accumulation order differs.
_EMULATE_BF16_DOT = tl.constexpr(interpreting())
# float32 products: on tensor cores as tf32x3 through ``mm_split`` (each operand split
# into a TF32 head and remainder, three products summed in fp32: error at fp32 rounding
# level, unlike plain TF32); the FMA path ("ieee", the ``FP32`` argument of ``mm``) where a
# product is too small for tensor cores to pay (the backward layer kernel's head term).
IEEE = tl.constexpr("ieee")


def split_tf32(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = hi + lo`` for float32 ``t``: ``hi`` rounded to TF32's 10 mantissa bits (to
    nearest, ties away from zero, like ``cvt.rna.tf32.f32``), ``lo`` the exact remainder
    (|lo| <= 2^-11 |t|). Host side of ``mm_split``."""
    t = t.contiguous()
    hi = ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return hi, t - hi


def weight_parts(t: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as ``mm_split`` takes it (through ``load_split``): ``split_tf32`` parts in
    float32, the weight itself twice in mixed mode."""
    return (t, t) if precision == "mixed" else split_tf32(t)


@triton.jit
def _split_tf32(x):
    """In-kernel ``split_tf32``."""
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def load_split(hi_ptr, lo_ptr, offs, mask, MIXED: tl.constexpr):
    """A weight tile as ``split_tf32`` left it on the host: head and remainder. Mixed mode
    keeps the unsplit weights at ``hi_ptr`` and returns them twice (``lo_ptr`` unread)."""
    hi = tl.load(hi_ptr + offs, mask=mask, other=0.0)
    if MIXED:
        lo = hi
    else:
        lo = tl.load(lo_ptr + offs, mask=mask, other=0.0)
    return hi, lo


@triton.jit
def mm_split(a, b_hi, b_lo, acc, MIXED: tl.constexpr):
    """``acc + a @ b`` in fp32 for a weight operand ``b = b_hi + b_lo`` split on the host.
    float32: three TF32 tensor-core products ``a_lo b_hi + a_hi b_lo + a_hi b_hi`` (the
    tf32x3 scheme, error ~2^-21 relative per product), with ``a`` split in registers and
    ``b``'s parts loaded as they are: Triton's own tf32x3 splits ``b`` in registers too,
    which sends each B tile through registers and back to shared memory before every
    ``wgmma`` (sm_90 TTGIR: two ``local_alloc`` per product in the loops, every ``wgmma``
    waited for; with the split done once there are none). Mixed: bf16 ``a @ b_hi``."""
    if MIXED:
        r = acc + mm(a, b_hi, MIXED, IEEE)
    else:
        a_hi, a_lo = _split_tf32(a)
        r = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        r = tl.dot(a_hi, b_lo, r, input_precision="tf32")
        r = tl.dot(a_hi, b_hi, r, input_precision="tf32")
    return r


# Sines on the GPU: reduce the argument to [-pi, pi] (2 pi split in two, the head with 8
# significant bits so k * head is exact for |k| < 2^16, i.e. |s| < 4e5 rad) and take the
# SFU's ``sin.approx.f32`` / ``cos.approx.f32`` (absolute error <= 2^-20.9 on [-pi, pi]).
# libdevice's sinf, which ``tl.sin`` calls, carries a Payne-Hanek slow path with a local
# array per call: hundreds of bytes of stack per thread in the fused kernels; on an H200
# the SFU version made the 3D mfn_stack forward 1.6x faster (bench/RESULTS.md). The
# interpreter cannot run PTX: it takes tl.sin / tl.cos of the same reduced argument.
_FAST_SINE = tl.constexpr(not interpreting())
_TWO_PI_HEAD = tl.constexpr(6.28125)
_TWO_PI_TAIL = tl.constexpr(0.0019353071795864769)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _reduce(s):
    k = tl.floor(s * _INV_TWO_PI + 0.5)
    return (s - k * _TWO_PI_HEAD) - k * _TWO_PI_TAIL


@triton.jit
def sine(s):
    """``sin(s)`` of fp32 radians (see above for the GPU's accuracy). The interpreter takes
    an exact sine of the same reduced argument, so CPU tests exercise the reduction too."""
    r = _reduce(s)
    if _FAST_SINE:
        r = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.sin(r)
    return r


@triton.jit
def cosine(s):
    """``cos(s)`` of fp32 radians, as :func:`sine`."""
    r = _reduce(s)
    if _FAST_SINE:
        r = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.cos(r)
    return r


@triton.jit
def mm(a, b, MIXED: tl.constexpr, FP32: tl.constexpr):
    """``a @ b`` with fp32 accumulation: bf16 operands (``MIXED``), else fp32 products
    computed as ``FP32`` says (``IEEE``: the FMA path)."""
    if MIXED:
        if _EMULATE_BF16_DOT:
            r = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                       input_precision="ieee")
        else:
            r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        r = tl.dot(a, b, input_precision=FP32)
    return r


@triton.jit
def accumulate(ptr, value, mask):
    """``*ptr += value`` for memory this program owns alone (no atomics: deterministic)."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def filter_args(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p, offs_h, mask_h,
                D: tl.constexpr, GABOR: tl.constexpr):
    """Sine argument ``s = x W^T + b`` (fp32, always), and for Gabor the squared distance
    ``q = |x - mu|^2`` and envelope ``e = exp(-gamma q / 2)``; (BLOCK_P, BLOCK_H) each.
    ``w_ptr``/``mu_ptr`` point at (H, D) row-major, ``b_ptr``/``gamma_ptr`` at (H,)."""
    x0 = tl.load(x_ptr + offs_p * D, mask=mask_p, other=0.0)
    w0 = tl.load(w_ptr + offs_h * D, mask=mask_h, other=0.0)
    bias = tl.load(b_ptr + offs_h, mask=mask_h, other=0.0)
    s = x0[:, None] * w0[None, :] + bias[None, :]
    for d in tl.static_range(1, D):
        xd = tl.load(x_ptr + offs_p * D + d, mask=mask_p, other=0.0)
        wd = tl.load(w_ptr + offs_h * D + d, mask=mask_h, other=0.0)
        s += xd[:, None] * wd[None, :]
    if GABOR:
        q = s * 0.0
        for d in tl.static_range(D):
            xd = tl.load(x_ptr + offs_p * D + d, mask=mask_p, other=0.0)
            md = tl.load(mu_ptr + offs_h * D + d, mask=mask_h, other=0.0)
            diff = xd[:, None] - md[None, :]
            q += diff * diff
        gamma = tl.load(gamma_ptr + offs_h, mask=mask_h, other=0.0)
        e = tl.exp(-0.5 * gamma[None, :] * q)
    else:
        q = s
        e = s
    return s, q, e


@triton.jit
def filter_values(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p, offs_h, mask_h,
                  D: tl.constexpr, GABOR: tl.constexpr):
    """Filter values ``g = sin(x W^T + b)`` (times the Gabor envelope), (BLOCK_P, BLOCK_H)."""
    s, q, e = filter_args(x_ptr, w_ptr, b_ptr, gamma_ptr, mu_ptr, offs_p, mask_p, offs_h, mask_h, D, GABOR)
    g = sine(s)
    if GABOR:
        g = g * e
    return g


@triton.jit
def filter_backward(dg, sn, cs, q, e, x_ptr, w_ptr, gamma_ptr, mu_ptr,
                    dw_ptr, db_ptr, dgamma_ptr, dmu_ptr, dx,
                    offs_p, mask_p, offs_h, mask_h, offs_d,
                    D: tl.constexpr, GABOR: tl.constexpr, NEED_DW: tl.constexpr):
    """Given dL/dg for g = e sin(s), add this tile's sums over points into the (program-
    owned) partials of dW (H, D), db (H,), dgamma (H,), dmu (H, D); return dx (BLOCK_P, BLOCK_D)
    plus this filter's contribution."""
    if GABOR:
        ds = dg * e * cs
        de = dg * sn
    else:
        ds = dg * cs
    accumulate(db_ptr + offs_h, tl.sum(ds, axis=0), mask_h)
    if GABOR:
        gamma = tl.load(gamma_ptr + offs_h, mask=mask_h, other=0.0)
        dee = de * e
        accumulate(dgamma_ptr + offs_h, tl.sum(-0.5 * dee * q, axis=0), mask_h)
        t = -dee * gamma[None, :]  # dL/d(x - mu) = t (x - mu)
    for d in tl.static_range(D):
        xd = tl.load(x_ptr + offs_p * D + d, mask=mask_p, other=0.0)
        wd = tl.load(w_ptr + offs_h * D + d, mask=mask_h, other=0.0)
        col = tl.sum(ds * wd[None, :], axis=1)
        if NEED_DW:
            accumulate(dw_ptr + offs_h * D + d, tl.sum(ds * xd[:, None], axis=0), mask_h)
        if GABOR:
            md = tl.load(mu_ptr + offs_h * D + d, mask=mask_h, other=0.0)
            tdiff = t * (xd[:, None] - md[None, :])
            col += tl.sum(tdiff, axis=1)
            accumulate(dmu_ptr + offs_h * D + d, -tl.sum(tdiff, axis=0), mask_h)
        dx += tl.where(offs_d[None, :] == d, col[:, None], 0.0)
    return dx
