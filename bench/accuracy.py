"""Accuracy of the Triton mfn_stack paths against the float32 PyTorch reference.

``max |triton - reference| / max |reference|`` over every output and over every parameter
gradient (loss: sum over scales of the MSE to 0.3), 512 random points in [-0.5, 0.5)^d,
for each forward variant (fused, layered: ``fieldkern.ops.set_variant(mfn_forward=...)``) and
precision, the backward's products as the rule picks them. On a GPU it measures the device
(tensor-core products, SFU sines); without one it runs the kernels under the Triton
interpreter, which computes products and sines exactly (and emulates bf16), so there it
checks the arithmetic's structure rather than the hardware's rounding; ``--tf32
truncate|nearest`` makes the interpreter round TF32 products' operands as tensor cores do
(``fieldkern.kernels.testing``).

    python bench/accuracy.py [--tf32 truncate|nearest]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import fieldkern  # noqa: E402

NETWORKS = (("2D hidden 256, 4 scales", 2, 256, 4, None), ("3D hidden 128, 3 scales, ReLU heads", 3, 128, 3, "relu"))


def step(model, x, backend, precision):
    model.zero_grad(set_to_none=True)
    with fieldkern.set_backend(backend), fieldkern.ops.set_precision(precision):
        ys = model(x)
        sum(((y - 0.3) ** 2).mean() for y in ys).backward()
    return [y.detach() for y in ys], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tf32", choices=("truncate", "nearest"),
                    help="interpreter only: round TF32 products' operands as tensor cores do")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter"
    if args.tf32 and device == "cuda":
        ap.error("--tf32 emulates tensor cores under the interpreter; on a GPU they are real")
    if args.tf32:
        from fieldkern.kernels.testing import emulate_tf32_tensor_cores

        where += f", TF32 operands emulated ({args.tf32})"
    with emulate_tf32_tensor_cores(args.tf32) if args.tf32 else contextlib.nullcontext():
        _table(device, where)


def _table(device, where) -> None:
    print(f"{where}; torch {torch.__version__}")
    print("| network | forward | precision | outputs | gradients (worst tensor) |")
    print("|---|---|---|---|---|")
    for name, d, h, s, head in NETWORKS:
        torch.manual_seed(0)
        model = fieldkern.ResidualMFN(d, h, 1, n_scales=s, resolution=64, head_activation=head).to(device)
        x = (torch.rand(512, d, generator=torch.Generator().manual_seed(1)) - 0.5).to(device)
        ref_y, ref_g = step(model, x, "torch", "float32")
        for forward in ("fused", "layered"):
            for precision in ("float32", "mixed"):
                with fieldkern.ops.set_variant(mfn_forward=forward):
                    y, g = step(model, x, "triton", precision)
                out = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(y, ref_y))
                err, worst = max((((g[n] - ref_g[n]).abs().max() / ref_g[n].abs().max()).item(), n) for n in ref_g)
                print(f"| {name} | {forward} | {precision} | {out:.1e} | {err:.1e} ({worst}) |", flush=True)


if __name__ == "__main__":
    main()
