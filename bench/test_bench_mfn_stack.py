"""mfn_stack through ResidualMFN: fieldkern-Triton vs eager reference vs torch.compile(reference).

Same model, same inputs, same run. ``extra_info``: points, points_per_s, peak_memory_bytes
(CUDA only), device. Forward is timed under ``torch.no_grad()``; forward+backward is the
training step's ``loss.backward()`` (sum over scales of MSE to a target).
"""

from __future__ import annotations

import pytest
import torch

import fieldkern
from _bench_utils import CUDA, peak_memory_bytes, problem_params, sync

# triton_mixed: the Triton kernels with fieldkern.ops.set_precision("mixed") (bf16 matmuls);
# triton_graph: the float32 Triton step captured once in a CUDA graph and replayed, i.e.
# without the host's launch gaps (which a profile put at ~1.3 ms of a 4.4 ms 3D step)
IMPLS = ["triton", "triton_mixed", "triton_graph", "eager", "compile"]


def _model(d, h, s, shape, device):
    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(d, h, 1, n_scales=s, resolution=max(shape)).to(device)
    x = fieldkern.grid_coordinates(shape, device=device).reshape(-1, d)
    target = torch.sin(9.0 * x.sum(-1, keepdim=True))
    return model, x, target


def _runner(impl, model):
    if impl == "compile":
        return torch.compile(model), "torch"
    return model, ("triton" if impl.startswith("triton") else "torch")


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("problem", problem_params())
def test_bench_mfn_stack(benchmark, problem, impl, mode, device):
    if impl.startswith("triton") and not CUDA:
        pytest.skip("Triton cases need a CUDA device: on CPU the kernels only run under the "
                    "Triton interpreter (a correctness tool, far too slow to benchmark)")
    d, h, s, shape = problem
    model, x, target = _model(d, h, s, shape, device)
    fn_model, backend = _runner(impl, model)
    precision = "mixed" if impl == "triton_mixed" else "float32"

    if impl == "triton_graph":
        step = _graphed_step(model, x, target, mode)
    elif mode == "forward":
        def step():
            with torch.no_grad(), fieldkern.set_backend(backend), fieldkern.ops.set_precision(precision):
                out = fn_model(x)
            sync()
            return out
    else:
        def step():
            model.zero_grad(set_to_none=True)
            with fieldkern.set_backend(backend), fieldkern.ops.set_precision(precision):
                loss = sum(torch.nn.functional.mse_loss(y, target) for y in fn_model(x))
                loss.backward()
            sync()
            return loss

    step()  # warm-up: compilation / autotuning stay out of the timings
    peak = peak_memory_bytes(step)
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
    n = x.shape[0]
    benchmark.extra_info.update(
        points=n,
        points_per_s=n / benchmark.stats.stats.mean,
        peak_memory_bytes=peak,
        peak_memory_note=("graph replay: buffers were allocated at capture" if impl == "triton_graph"
                          else None if CUDA else "not measured on CPU"),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        precision=precision,
        configs=_chosen_configs(mode) if impl.startswith("triton") else None,
        strategies=_strategies(n, d, h, s, mode, precision) if impl.startswith("triton") else None,
    )


def _graphed_step(model, x, target, mode):
    """The step captured in a CUDA graph (after warm-up on a side stream: autotuning cannot
    run during capture); gradients by ``autograd.grad``, as ``.grad`` accumulation is not
    capturable. Returns a function that replays it."""
    params = [p for p in model.parameters() if p.requires_grad]

    def body():
        with fieldkern.set_backend("triton"):
            if mode == "forward":
                with torch.no_grad():
                    return model(x)
            loss = sum(torch.nn.functional.mse_loss(y, target) for y in model(x))
            return loss, torch.autograd.grad(loss, params)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()

    def step():
        graph.replay()
        sync()
        return out

    return step


def _strategies(n_points, d, h, s, mode, precision):
    """The variants this case ran (``fieldkern.ops.set_variant`` and the fixed rule):
    forward "fused" / "layered", backward products "cublas" / "triton"."""
    from fieldkern.kernels import mfn_stack as M

    variants = fieldkern.ops.get_variants()
    save = mode == "forward_backward"
    return {"forward": M.choose_forward(variants["mfn_forward"], fits=M.fused_fits(n_points, d, s, h, 1, save)),
            "backward_products": M.choose_products(variants["mfn_backward_products"], precision) if save else None}


def _chosen_configs(mode):
    """The configs autotuning picked (or the only candidate) for the kernels this mode ran:
    one per key, and the backward kernel has one key per kind of layer (top, middle, first)."""
    from fieldkern.kernels import mfn_stack as M

    out = {}
    kernels = [("forward", M._mfn_stack_fwd_kernel)]
    if mode == "forward_backward":
        kernels.append(("backward", M._mfn_stack_bwd_kernel))
    for name, kernel in kernels:
        if len(kernel.configs) == 1:
            out[name] = [str(kernel.configs[0])]
        else:
            out[name] = sorted({str(c) for c in getattr(kernel, "cache", {}).values()})
    return out
