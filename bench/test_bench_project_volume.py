"""project_volume, ``(D, D, D), (B, 3, 3) -> (B, D, D)``: five ways to compute the same projections.

Implementations (same volume, same rotations, same run):

- ``triton``: :func:`fieldkern.ops.project_volume` under ``fieldkern.set_backend("triton")``
  (CUDA only: on CPU the kernels would run under the Triton interpreter, a correctness tool
  that is far too slow to benchmark);
- ``triton_deterministic``: the same under ``torch.use_deterministic_algorithms(True)``,
  whose volume gradient is the gather kernel instead of float32 atomics (forward+backward
  only: the forward is the same kernel);
- ``reference``: :func:`fieldkern.ops.project_volume.project_volume_reference`, the chunked
  ``grid_sample`` path (blocks of images x slices, checkpointed when autograd records);
- ``paper``: the naive approach, :func:`paper_project`: expand the volume per image
  (``volume[None, None].expand(B, 1, D, D, D)``), one ``affine_grid`` per image, one
  ``grid_sample`` over B full rotated volumes, sum over z. It materialises B x D^3 grids and
  samples (peak ~7 / ~8 B x D^3 float32 tensors forward / forward+backward), so it is
  skipped when that exceeds half the free memory (CUDA: free on the device plus torch's
  unused cache; CPU: ``MemAvailable``);
- ``fourier``: :func:`fieldkern.cryoem.fourier_slice.project_volume_fourier` (oversampling 2);
- ``compile``: ``torch.compile(project_volume_reference)``, skipped where the chunk loop it
  would unroll has more than ``COMPILE_MAX_BLOCKS`` blocks (compile time would dominate).

Passes: ``forward`` under ``torch.no_grad()``; ``forward_backward`` is ``out.square().sum()
.backward()`` with gradients w.r.t. both the volume and the rotations.

Sizes: on CUDA, D = 64 and 128 with B = 600 (issue 8). On a CPU-only machine, D = 64 with
B = 60 for every implementation and pass, plus the full D = 64, B = 600 for the forward of
``reference`` (~10 s a call on the 2-core development machine) and ``fourier`` only, to
keep the file within a few minutes.

Timing: one untimed warm-up call (compilation, autotuning), a second one where the first
may have been compiling (always on CUDA), then ``benchmark.pedantic`` with ~10 s of rounds
(at most 10 on CUDA, 3 on CPU; a single round for the ~10 s CPU case).

``extra_info``: implementation, pass, D, B, projections_per_s (B / mean time),
peak_memory_bytes with peak_memory_note saying what was measured, device.
Peak memory is taken over the timed calls (the step returns nothing, so no two outputs
are alive at once):

- CUDA: growth of ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before
  (``_bench_utils.peak_memory_bytes``): tensors the call allocates, not allocator caching;
- CPU (Linux): growth of the process's peak resident set size: ``VmHWM`` is reset through
  ``/proc/self/clear_refs`` (writing ``5``), freed heap is returned with ``malloc_trim``,
  then peak ``VmHWM`` minus ``VmRSS`` before. This sees torch's CPU allocations (which
  ``tracemalloc`` does not) but is page-granular and includes any allocator / thread-pool
  growth; None where ``/proc/self/clear_refs`` is not writable.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import time

import pytest
import torch
import torch.nn.functional as F

import fieldkern
from _bench_utils import CUDA, peak_memory_bytes, sync
from fieldkern.cryoem import random_rotations
from fieldkern.cryoem.fourier_slice import project_volume_fourier
from fieldkern.ops.project_volume import DEFAULT_MAX_POINTS, _block_sizes, project_volume_reference

IMPLS = ["triton", "triton_deterministic", "reference", "paper", "fourier", "compile"]
MODES = ["forward", "forward_backward"]
B_FULL = 600
# (D, B) problems. CPU: the full D = 64, B = 600 only for the cases in CPU_FULL_SIZE_CASES.
CUDA_PROBLEMS = [(64, B_FULL), (128, B_FULL)]
CPU_PROBLEMS = [(64, 60), (64, B_FULL)]
CPU_FULL_SIZE_CASES = {("reference", "forward"), ("fourier", "forward")}
# The paper's approach peaks at ~7 (forward: affine_grid's (B, D^3, 4) base grid, the
# (B, D^3, 3) grid) / ~8 (forward+backward) B x D^3 float32 tensors (measured on an H200 at
# D = 64 and 128, B = 600); skipped above this fraction of the free memory.
PAPER_TENSORS = {"forward": 7, "forward_backward": 8}
PAPER_MEMORY_FRACTION = 0.5
COMPILE_MAX_BLOCKS = 16
_COMPILED = {}


def problem_params():
    return [pytest.param((D, B), id=f"D{D}-B{B}") for D, B in (CUDA_PROBLEMS if CUDA else CPU_PROBLEMS)]


@functools.lru_cache(maxsize=None)
def smooth_volume(D: int) -> torch.Tensor:
    """Fixed smooth random volume on the benchmark device: seeded noise on a D/8 grid,
    trilinearly upsampled, inside a soft sphere of radius ~0.4 D (zero near the box edges)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, D // 8, D // 8, D // 8, generator=g)
    vol = F.interpolate(coarse, size=(D, D, D), mode="trilinear", align_corners=False)[0, 0]
    c = torch.arange(D, dtype=torch.float32) - D // 2
    r = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).sqrt()
    vol = vol * torch.sigmoid(0.4 * D - r)
    return vol.contiguous().to("cuda" if CUDA else "cpu")


@functools.lru_cache(maxsize=None)
def rotations(B: int) -> torch.Tensor:
    return random_rotations(B, generator=torch.Generator().manual_seed(1), device="cuda" if CUDA else "cpu")


def paper_project(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The paper's projector: B rotated copies of the volume via ``affine_grid`` +
    ``grid_sample`` on the expanded volume, summed over z. Same convention as
    ``project_volume`` (sample at ``R^T p``, p the centred voxel coordinate): with
    ``align_corners=False`` the normalised coordinate of index i is ``n = (2 (i - D/2) + 1) / D``,
    so ``g = R^T n + (1 - R^T 1) / D``."""
    B, D = rotations.shape[0], volume.shape[-1]
    rt = rotations.to(volume.dtype).transpose(1, 2)
    theta = torch.cat([rt, ((1 - rt.sum(-1)) / D)[..., None]], -1)  # (B, 3, 4)
    grid = F.affine_grid(theta, [B, 1, D, D, D], align_corners=False)  # (B, D, D, D, 3)
    out = F.grid_sample(volume[None, None].expand(B, 1, D, D, D), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out[:, 0].sum(1)


def _triton(volume, rots):
    with fieldkern.set_backend("triton"):
        return fieldkern.ops.project_volume(volume, rots)


@contextlib.contextmanager
def _deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on or before, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _compiled(key):
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(project_volume_reference)
    return _COMPILED[key]


def _free_memory_bytes() -> int:
    if CUDA:  # free on the device plus what torch's caching allocator holds unused
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1))


def _cpu_peak_rss_bytes(fn):
    """Peak resident-set growth of ``fn()`` (Linux; None where VmHWM cannot be reset)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) * 1024


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _skip_reason(impl, mode, D, B):
    if impl == "triton_deterministic" and mode == "forward":
        return "the forward is triton's: only the backward differs"
    if impl.startswith("triton") and not CUDA:
        return ("triton needs a CUDA device: on CPU the kernels only run under the Triton "
                "interpreter (TRITON_INTERPRET=1), a correctness tool far too slow to benchmark")
    if not CUDA and B == B_FULL and (impl, mode) not in CPU_FULL_SIZE_CASES:
        return (f"CPU: the full B={B_FULL} runs only for {sorted(CPU_FULL_SIZE_CASES)} to keep "
                "the suite within minutes (the other cases run at B=60)")
    if impl == "paper":
        need = PAPER_TENSORS[mode] * B * D**3 * 4
        free = _free_memory_bytes()
        if need > PAPER_MEMORY_FRACTION * free:
            return (f"paper approach needs ~{need / 2**30:.1f} GiB ({PAPER_TENSORS[mode]} x B x D^3 "
                    f"float32), more than {PAPER_MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free")
    if impl == "compile":
        b_chunk, z_chunk = _block_sizes(D, B, None, None, DEFAULT_MAX_POINTS)
        blocks = -(-B // b_chunk) * -(-D // z_chunk)
        if blocks > COMPILE_MAX_BLOCKS:
            return (f"torch.compile would unroll the reference's {blocks} blocks "
                    f"(> {COMPILE_MAX_BLOCKS}): compile time dominates, not run")
    return None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("problem", problem_params())
def test_bench_project_volume(benchmark, problem, impl, mode, device):
    D, B = problem
    reason = _skip_reason(impl, mode, D, B)
    if reason:
        pytest.skip(reason)
    fn = {
        "triton": _triton,
        "triton_deterministic": _triton,
        "reference": project_volume_reference,
        "paper": paper_project,
        "fourier": project_volume_fourier,
        "compile": _compiled((D, B, mode)) if impl == "compile" else None,
    }[impl]
    volume, rots = smooth_volume(D), rotations(B)

    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(volume, rots)
            sync()
    else:
        v = volume.clone().requires_grad_(True)
        r = rots.clone().requires_grad_(True)

        def step():
            v.grad = r.grad = None
            with _deterministic(impl == "triton_deterministic"):
                fn(v, r).square().sum().backward()
            sync()

    est = _seconds(step)  # warm-up: compilation / autotuning stay out of the timings
    if CUDA or impl == "compile" or est < 2.0:
        est = _seconds(step)  # the warm-up may have been compiling: time a warm call
    # ~10 s of timed calls per case: up to 10 rounds (CUDA) / 3 (CPU), one for slow CPU cases.
    rounds = max(1, min(10 if CUDA else 3, int(10.0 / max(est, 1e-6))))

    def timed():
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)

    if CUDA:
        peak = peak_memory_bytes(timed)
        note = "torch.cuda.max_memory_allocated growth over the timed calls"
    else:
        peak = _cpu_peak_rss_bytes(timed)
        note = ("peak RSS growth over the timed calls (VmHWM reset via /proc/self/clear_refs, "
                "after malloc_trim)" if peak is not None else "not measured (no /proc/self/clear_refs)")
    benchmark.extra_info.update(
        implementation=impl,
        **{"pass": mode},
        D=D,
        B=B,
        projections_per_s=B / benchmark.stats.stats.mean,
        peak_memory_bytes=peak,
        peak_memory_note=note,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        volume_gradient_method=_volume_gradient_method(impl, mode),
    )


def _volume_gradient_method(impl, mode):
    """The volume-gradient variant the Triton backward ran (``fieldkern.ops.set_variant`` and
    the fixed rule), None where no Triton backward ran."""
    if not impl.startswith("triton") or mode != "forward_backward":
        return None
    from fieldkern.kernels import project_volume as PV

    return PV.choose_volume_gradient(fieldkern.ops.get_variants()["volume_gradient"],
                                     deterministic=impl == "triton_deterministic")
