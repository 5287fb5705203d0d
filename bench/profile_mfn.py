"""Where the time of one mfn_stack training step goes (CUDA): torch.profiler's per-kernel
device times for the benchmark networks, and the backward's products over points timed
with cuBLAS (one GEMM, or batched over slabs of points) and with its Triton GEMMs.

    python bench/profile_mfn.py [problem ...]   # problems: 3d_h128_s3 2d_h256_s4
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fieldkern
from _bench_utils import PROBLEMS
from fieldkern.kernels import mfn_stack as M
from fieldkern.kernels._common import split_tf32


def step(model, x, target, precision):
    model.zero_grad(set_to_none=True)
    with fieldkern.set_backend("triton"), fieldkern.ops.set_precision(precision):
        loss = sum(torch.nn.functional.mse_loss(y, target) for y in model(x))
        loss.backward()


def profile_step(problem, precision):
    d, h, s, shapes = next((d, h, s, shapes) for name, d, h, s, shapes, _ in PROBLEMS if name == problem)
    shape = shapes[0] if d == 3 else shapes[1]
    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(d, h, 1, n_scales=s, resolution=max(shape)).cuda()
    x = fieldkern.grid_coordinates(shape, device="cuda").reshape(-1, d)
    target = torch.sin(9.0 * x.sum(-1, keepdim=True))
    for _ in range(2):
        step(model, x, target, precision)
    torch.cuda.synchronize()
    # memory by phase: forward (what it keeps for the backward, its peak), then backward
    mib = 2 ** -20
    model.zero_grad(set_to_none=True)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with fieldkern.set_backend("triton"), fieldkern.ops.set_precision(precision):
        loss = sum(torch.nn.functional.mse_loss(y, target) for y in model(x))
    torch.cuda.synchronize()
    kept, fwd_peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    print(f"memory {problem} {precision}: forward keeps {kept * mib:.0f} MiB (peak {fwd_peak * mib:.0f}), "
          f"backward peak {bwd_peak * mib:.0f} MiB above the step's start")
    del loss
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(model, x, target, precision)
        torch.cuda.synchronize()
    print(f"### {problem} {shape} {precision}: device time per step, top kernels (3 steps / 3)")
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows if e.device_time_total > 0 and not e.key.startswith("ProfilerStep"))
    for e in rows[:14]:
        print(f"{e.device_time_total / 3 / 1000:8.3f} ms  x{e.count // 3:<4d} {e.key[:110]}")
    print(f"(sum of listed kernel times per step ~ {total / 3 / 1000:.3f} ms; overlapping names may double count)")


def time_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def point_sum_products():
    print("### a^T b over n points, (n, H) x (n, H) -> (H, H)")
    for n, h in ((104857, 128), (262144, 128), (52428, 256), (262144, 256)):
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(n, h, device="cuda").to(dtype)
            b = torch.randn(n, h, device="cuda").to(dtype)
            kw = {"out_dtype": torch.float32} if dtype == torch.bfloat16 else {}
            res = {"mm": time_ms(lambda: torch.mm(a.t(), b, **kw))}
            for m in (2048, 8192):
                full = n // m * m
                def slabs(m=m, full=full):
                    out = torch.bmm(a[:full].view(-1, m, h).transpose(1, 2), b[:full].view(-1, m, h), **kw).sum(0)
                    if full < n:
                        out += torch.mm(a[full:].t(), b[full:], **kw)
                    return out
                res[f"slabs{m}"] = time_ms(slabs)
            res["dz mm (n,H)@(H,H)"] = time_ms(lambda: torch.mm(a, b[:h], **kw))
            # the backward's own Triton GEMMs (tf32x3 / bf16) at the same shapes (float32
            # takes cuBLAS unless they are named: mfn_stack.choose_products)
            mixed = dtype == torch.bfloat16
            sq = b[:h].float().contiguous()
            M._points_sum_kernel.cache.clear()
            M._rows_matmul_kernel.cache.clear()
            # float32: the second operand split as the backward provides it (mm_split)
            b_hi, b_lo = (b, None) if mixed else split_tf32(b)
            sq_hi, sq_lo = (sq, None) if mixed else split_tf32(sq)
            acc = torch.zeros((h, b.shape[1]), device=a.device, dtype=torch.float32)
            res["triton sum"] = time_ms(lambda: M._add_points_sum(acc, a, b_hi, b_lo, mixed=mixed, cublas=False))
            res["triton rows"] = time_ms(lambda: M._rows_matmul(a, sq_hi, sq_lo, mixed=mixed, cublas=False))
            flops = 2 * n * h * h
            print(f"n={n} H={h} {str(dtype)[6:]}: " + ", ".join(
                f"{k} {v:.3f} ms ({flops / v / 1e9:.0f} TFLOPS)" for k, v in res.items()))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    point_sum_products()
    for problem in sys.argv[1:] or ["3d_h128_s3", "2d_h256_s4"]:
        for precision in ("float32", "mixed"):
            profile_step(problem, precision)
