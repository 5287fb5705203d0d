"""Compile every kernel for sm_90 without a GPU (run as a script, TRITON_INTERPRET unset).

The interpreter does not check what only the compiler sees (constexpr-only branches,
layouts, shared-memory limits, unsupported ops), so the CPU suite also builds each kernel
down to a cubin with Triton's bundled ptxas. Prints one line per kernel; exits non-zero
on the first failure.

``--candidates``: instead, every GPU autotune candidate of every kernel at the benchmark's
shapes, one line each with registers, spill stack and shared memory (from the cubin); exits
non-zero if one fails to compile or needs more shared memory than an H100 / H200 block may
have (a candidate autotuning could never launch). Run it with the GPU image's triton too
(3.6): compilers differ in what they accept and in what spills.
"""

import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
if "--candidates" in sys.argv:
    os.environ["FIELDKERN_AUTOTUNE"] = "1"  # before the kernel modules build their config lists

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fieldkern.kernels import filters as F  # noqa: E402
from fieldkern.kernels import mfn_stack as M  # noqa: E402
from fieldkern.kernels import multiplicative_layer as ML  # noqa: E402
from fieldkern.kernels import project_volume as PV  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
INTS = {"P", "H", "O", "K", "D", "B", "n_tiles", "M", "N", "NA", "NB", "SLAB", "ROW"}  # everything else not constexpr is a fp32 pointer


#: Shared memory one block may opt into on sm_90 (227 KiB).
MAX_SHARED = 232448


def build(kernel, consts, num_warps=4, types=None, num_stages=2, quiet=False):
    """``types``: pointer types other than ``*fp32``, by argument name. Returns the compiled kernel."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    # a constexpr left out would be compiled as a pointer argument, silently
    missing = [p.name for p in fn.params if p.is_constexpr and not p.has_default and p.name not in consts]
    if missing:
        sys.exit(f"{fn.__name__}: no value for constexpr {missing}")
    sig = {n: "constexpr" if n in consts else ("i32" if n in INTS else "*fp32") for n in names}
    sig.update(types or {})
    # pointers 16-byte aligned, as the launcher specialises them for torch's allocations
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    if not quiet:
        print("ok", fn.__name__, consts, flush=True)
    return compiled


def expect(ptx, what, *instructions):
    """Fail unless the PTX holds one of ``instructions`` (a property the kernel's speed rests on)."""
    if not any(i in ptx for i in instructions):
        sys.exit(f"{what}: none of {instructions} in the PTX")


def main():
    for mixed, gabor in ((False, True), (True, False)):  # small blocks: compile time
        bh = 32 if mixed else 128  # float32 at 128: four column blocks and K blocks
        flags = dict(D=3, N_LAYERS=2, HEAD_MASK=3, HAS_C=True, GABOR=gabor, RELU=True, RESIDUAL=True,
                     MIXED=mixed, BLOCK_H=bh, BLOCK_O=16, BLOCK_P=16, SAVE=True)
        fwd, bwd = M._FWD_CONFIGS[0].kwargs, M._BWD_CONFIGS[0].kwargs  # the AUTOTUNE=0 configs
        build(M._mfn_stack_fwd_kernel, dict(flags, BLOCK_N=fwd["BLOCK_N"], BLOCK_K=fwd["BLOCK_K"]))
        # a middle layer (every input and output of the per-layer backward present)
        layer = dict(D=3, HAS_LIN=True, HAS_DZ=True, HAS_PREV_LIN=True, HEAD_TO_TRUNK=True, STORE_Z=True,
                     SPLIT_Z=not mixed, HAS_C=True, GABOR=gabor, NEED_DW=True, MIXED=mixed, BLOCK_H=bh, BLOCK_O=16,
                     BLOCK_D=4, BLOCK_P=bwd["BLOCK_P"], BLOCK_N=bwd["BLOCK_N"])
        work = "*bf16" if mixed else "*fp32"
        build(M._mfn_stack_bwd_kernel, layer, types={"dlin_ptr": work, "zp_ptr": work, "z_ptr": work})
        rows, sums = M._ROWS_CANDIDATES[0], M._SUM_CANDIDATES[0]
        build(M._rows_matmul_kernel, dict(MIXED=mixed, **rows.kwargs), num_warps=rows.num_warps,
              types={"a_ptr": work})
        build(M._points_sum_kernel, dict(MIXED=mixed, **sums.kwargs), num_warps=sums.num_warps,
              types={"a_ptr": work, "b_ptr": work})
        build(F._filter_fwd_kernel, dict(D=3, GABOR=gabor, BLOCK_P=16, BLOCK_H=16))
        build(F._filter_bwd_kernel, dict(D=3, GABOR=gabor, NEED_DW=True, BLOCK_D=4, BLOCK_P=16, BLOCK_H=16))
        ml = dict(D=3, HAS_C=True, GABOR=gabor, MIXED=mixed, BLOCK_P=16, BLOCK_N=16, BLOCK_K=16)
        build(ML._multiplicative_layer_fwd_kernel, dict(ml, SAVE_LIN=True))
        build(ML._multiplicative_layer_bwd_kernel, dict(ml, NEED_DW=True, BLOCK_D=4))
    # the projector's paired taps: 8-byte loads of voxel pairs, 8-byte atomics in the scatter
    for tile_w in (0, 8):  # runs of a row, rectangles
        ptx = build(PV.project_volume_fwd_kernel, dict(BLOCK=PV.BLOCK, TILE_W=tile_w)).asm["ptx"]
        expect(ptx, "projector forward", "ld.global.v2.b32")
    ptx = build(PV.project_volume_bwd_kernel,
                dict(NEED_VOLUME=True, NEED_ROTATION=True, BLOCK=PV.BLOCK, TILE_W=8)).asm["ptx"]
    expect(ptx, "projector backward", "ld.global.v2.b32")
    # triton 3.9 writes red, 3.6 (the GPU image's) atom with an unused result: ptxas makes
    # both the same REDG.E.ADD.F32x2 in SASS
    expect(ptx, "projector backward", "red.global.gpu.relaxed.add.v2.f32", "atom.global.gpu.relaxed.add.v2.f32")
    build(PV.project_volume_bwd_gather_kernel, dict(BLOCK_V=PV.BLOCK_VOXELS, REACH=1.733))


def resources(compiled):
    """(registers, spill stack bytes) per thread from the cubin, or (None, None) without cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return int(reg.group(1)) if reg else None, int(stack.group(1)) if stack else None


def candidates():
    """Every GPU candidate at the benchmark's networks (3D H 128 with 3 scales, 2D H 256
    with 4), both precisions."""
    jobs = []  # (label, kernel, constexprs, configs, pointer types)
    for mixed in (False, True):
        prec, work = ("mixed", "*bf16") if mixed else ("float32", "*fp32")
        for d, h, n in ((3, 128, 3), (2, 256, 4)):
            bh = max(h, M._MIN_BLOCK_H)
            net = dict(D=d, HAS_C=True, GABOR=False, MIXED=mixed, BLOCK_H=bh, BLOCK_O=16)
            jobs.append((f"{prec} D{d} H{h}", M._mfn_stack_fwd_kernel,
                         dict(net, N_LAYERS=n, HEAD_MASK=(1 << n) - 1, RELU=False, RESIDUAL=True, SAVE=True),
                         M.FWD_CANDIDATES, None))
            jobs.append((f"{prec} D{d} H{h}", M._mfn_stack_bwd_kernel,
                         dict(net, HAS_LIN=True, HAS_DZ=True, HAS_PREV_LIN=True, HEAD_TO_TRUNK=True, STORE_Z=False,
                              SPLIT_Z=not mixed, NEED_DW=False, BLOCK_D=4),
                         M.BWD_CANDIDATES, {"dlin_ptr": work, "zp_ptr": work, "z_ptr": work, "zplo_ptr": work}))
        layer = dict(D=3, HAS_C=True, GABOR=False, MIXED=mixed)
        jobs.append((prec, ML._multiplicative_layer_fwd_kernel, dict(layer, SAVE_LIN=True), ML.FWD_CANDIDATES, None))
        jobs.append((prec, ML._multiplicative_layer_bwd_kernel, dict(layer, NEED_DW=True, BLOCK_D=4),
                     ML.BWD_CANDIDATES, None))
        jobs.append((prec, M._rows_matmul_kernel, dict(MIXED=mixed), M._ROWS_CANDIDATES, {"a_ptr": work}))
        jobs.append((prec, M._points_sum_kernel, dict(MIXED=mixed), M._SUM_CANDIDATES,
                     {"a_ptr": work, "b_ptr": work}))
    jobs.append(("D3", F._filter_fwd_kernel, dict(D=3, GABOR=True), F._CONFIGS, None))
    jobs.append(("D3", F._filter_bwd_kernel, dict(D=3, GABOR=True, NEED_DW=True, BLOCK_D=4), F._BWD_CONFIGS, None))
    jobs.append(("", PV.project_volume_fwd_kernel, {}, PV.FWD_CANDIDATES, None))
    jobs.append(("", PV.project_volume_bwd_kernel, dict(NEED_VOLUME=True, NEED_ROTATION=True),
                 [triton.Config({"BLOCK": PV.BLOCK, "TILE_W": w}) for w in (0, 8)], None))
    jobs.append(("", PV.project_volume_bwd_gather_kernel, dict(REACH=1.733),
                 [triton.Config({"BLOCK_V": PV.BLOCK_VOXELS})], None))
    tasks = [(j, c) for j, (_, _, _, cfgs, _) in enumerate(jobs) for c in range(len(cfgs))]
    print(f"triton {triton.__version__}, sm_90; regs / spill stack bytes per thread, shared bytes per block")
    # One process per core: the compiles are independent and CPU-bound (about 2x on CI's 2
    # cores); forked workers inherit ``jobs`` (kernels do not pickle), lines print in order.
    _JOBS[:] = jobs
    workers = min(len(tasks), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        lines = list(pool.map(_compile_candidate, tasks, chunksize=4))
    for line in lines:
        print(line, flush=True)
    failed = sum(line.startswith("FAIL") for line in lines)
    print(f"{len(lines)} candidates, {failed} failed")
    return 1 if failed else 0


#: The candidates' jobs, set before the workers fork.
_JOBS: list = []


def _compile_candidate(task: tuple[int, int]) -> str:
    """Compile config ``task[1]`` of job ``task[0]``: its "ok ..." or "FAIL ..." line."""
    label, kernel, consts, cfgs, types = _JOBS[task[0]]
    cfg = cfgs[task[1]]
    name = (kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel).__name__
    what = f"{name} {label} {cfg.kwargs} warps {cfg.num_warps} stages {cfg.num_stages}"
    try:
        compiled = build(kernel, dict(consts, **cfg.kwargs), num_warps=cfg.num_warps, types=types,
                         num_stages=cfg.num_stages, quiet=True)
    except Exception as exc:  # report every failure, not just the first
        return f"FAIL {what} {str(exc).strip().splitlines()[-1:] or type(exc).__name__}"
    regs, stack = resources(compiled)
    shared = compiled.metadata.shared
    if shared > MAX_SHARED:
        return f"FAIL {what} needs {shared} bytes of shared memory, over {MAX_SHARED}"
    return f"ok {what} regs {regs} stack {stack} shared {shared}"


if __name__ == "__main__":
    sys.exit(candidates() if "--candidates" in sys.argv else main())
