"""Compile every kernel for sm_90 without a GPU (run as a script, TRITON_INTERPRET unset).

The interpreter does not check what only the compiler sees (constexpr-only branches,
layouts, shared-memory limits, unsupported ops), so the CPU suite also builds each kernel
down to a cubin with Triton's bundled ptxas. Prints one line per kernel; exits non-zero
on the first failure.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fieldkern.kernels import filters as F  # noqa: E402
from fieldkern.kernels import mfn_stack as M  # noqa: E402
from fieldkern.kernels import multiplicative_layer as ML  # noqa: E402
from fieldkern.kernels import project_volume as PV  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
INTS = {"P", "H", "O", "K", "D", "B", "n_tiles", "M", "N", "NA", "NB", "SLAB", "ROW"}  # everything else not constexpr is a fp32 pointer


def build(kernel, consts, num_warps=4, types=None):
    """``types``: pointer types other than ``*fp32``, by argument name."""
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
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 2})
    print("ok", fn.__name__, consts, flush=True)
    return compiled.asm["ptx"]


def expect(ptx, instruction, what):
    """Fail unless the PTX holds ``instruction`` (a property the kernel's speed rests on)."""
    if instruction not in ptx:
        sys.exit(f"{what}: no {instruction} in the PTX")


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
        ptx = build(PV.project_volume_fwd_kernel, dict(BLOCK=PV.BLOCK, TILE_W=tile_w))
        expect(ptx, "ld.global.v2.b32", "projector forward")
    ptx = build(PV.project_volume_bwd_kernel, dict(NEED_VOLUME=True, NEED_ROTATION=True, BLOCK=PV.BLOCK, TILE_W=8))
    expect(ptx, "ld.global.v2.b32", "projector backward")
    expect(ptx, "red.global.gpu.relaxed.add.v2.f32", "projector backward")
    build(PV.project_volume_bwd_gather_kernel, dict(BLOCK_V=PV.BLOCK_VOXELS, REACH=1.733))


if __name__ == "__main__":
    sys.exit(main())
