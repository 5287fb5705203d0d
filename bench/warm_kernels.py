"""Compile the mfn_stack autotune candidates of the benchmark networks in parallel.

Triton autotuning compiles every candidate config in the calling process, one after the
other (5-40 s each for the large stacks). This script compiles *one* candidate (by index)
for one benchmark network and precision on a small input, filling Triton's on-disk cache;
run it for every index in parallel processes before ``pytest bench/`` and the
benchmark's autotuning then only times the candidates. Usage (see bench/run_gpu.sh):

    python bench/warm_kernels.py {2d_h256_s4|3d_h128_s3} {float32|mixed} INDEX
"""

from __future__ import annotations

import sys

import torch

import fieldkern
from _bench_utils import PROBLEMS
from fieldkern.kernels import mfn_stack as M
from fieldkern.kernels import multiplicative_layer as ML


def main(problem: str, precision: str, index: int) -> None:
    (d, h, s) = next((d, h, s) for name, d, h, s, *_ in PROBLEMS if name == problem)
    fwd, bwd, layer = M._mfn_stack_fwd_kernel, M._mfn_stack_bwd_kernel, ML._multiplicative_layer_fwd_kernel
    backward = index < len(bwd.configs)
    fwd.configs = [fwd.configs[index % len(fwd.configs)]]
    bwd.configs = [bwd.configs[index % len(bwd.configs)]]
    layer.configs = [layer.configs[index % len(layer.configs)]]
    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(d, h, 1, n_scales=s, resolution=64).cuda()
    x = torch.rand(4096, d, device="cuda") - 0.5  # P % 16 == 0, like the benchmark grids
    with fieldkern.set_backend("triton"), fieldkern.ops.set_precision(precision):
        for forward in ("fused", "layered"):  # both forward variants: the benchmarks may name either
            with fieldkern.ops.set_variant(mfn_forward=forward):
                with torch.no_grad():  # the forward without saving for a backward is its own kernel key
                    model(x)
                if backward:
                    sum(y.square().mean() for y in model(x)).backward()
    torch.cuda.synchronize()
    print(f"warm {problem} {precision} fwd={fwd.configs[0]} layer={layer.configs[0]} "
          f"bwd={bwd.configs[0] if backward else '-'}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
