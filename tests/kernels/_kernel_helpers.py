"""Shared builders and comparisons for the kernel tests (imported as a plain module)."""

from __future__ import annotations

import os

import pytest
import torch

import fieldkern

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1 (set by tests/kernels/conftest.py without CUDA)"
)

# float32 tolerances, triton vs reference (both fp32): outputs and gradients are compared
# as |a - b| <= ATOL + RTOL * max|b| (scaled by the tensor's magnitude: sums of ~H products
# of O(1) terms, summation order differs between tl.dot and the BLAS reference).
RTOL, ATOL = 2e-5, 1e-5
# mixed mode (bf16 matmul operands, fp32 accumulation)
MIXED_RTOL = 5e-2


def close(name, got, ref, rtol=RTOL, atol=ATOL):
    assert got is not None and ref is not None, f"{name}: gradient missing ({got is None}, {ref is None})"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max abs err {err:.3e} > {atol} + {rtol} * {scale:.3e}"


def stack_params(d=2, hidden=20, n_layers=3, out=2, gabor=False, heads=None, linear_bias=True,
                 trainable_w=False, dtype=torch.float32, freq=20.0, seed=0):
    """Random MFN-stack arguments (all but x) as a dict for ``fieldkern.ops.mfn_stack``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    heads = list(range(n_layers)) if heads is None else heads
    p = dict(
        filter_weight=[r(hidden, d, scale=freq, grad=trainable_w) for _ in range(n_layers)],
        filter_bias=[r(hidden, scale=3.0) for _ in range(n_layers)],
        linear_weight=[r(hidden, hidden, scale=hidden ** -0.5) for _ in range(n_layers - 1)],
        linear_bias=[r(hidden, scale=0.1) if linear_bias else None for _ in range(n_layers - 1)],
        head_weight=[r(out, hidden, scale=hidden ** -0.5) if i in heads else None for i in range(n_layers)],
        head_bias=[r(out, scale=0.1) if i in heads else None for i in range(n_layers)],
    )
    if gabor:
        p["gabor_gamma"] = [(torch.rand(hidden, generator=g, dtype=dtype) * 4).requires_grad_() for _ in range(n_layers)]
        p["gabor_mu"] = [(torch.rand(hidden, d, generator=g, dtype=dtype) - 0.5).requires_grad_() for _ in range(n_layers)]
    return p


def leaves(p, x):
    """Every tensor that requires grad, with a name, x first."""
    out = [("x", x)] if x.requires_grad else []
    for k, v in p.items():
        for i, t in enumerate(v):
            if t is not None and t.requires_grad:
                out.append((f"{k}[{i}]", t))
    return out


def run_both(p, x, seed=1, **kw):
    """Outputs and gradients of mfn_stack on backends torch and triton, for a random
    upstream gradient."""
    names, tensors = zip(*leaves(p, x))
    res = {}
    for backend in ("torch", "triton"):
        with fieldkern.set_backend(backend):
            outs = fieldkern.ops.mfn_stack(x, **p, **kw)
        g = torch.Generator().manual_seed(seed)
        ups = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs]
        grads = torch.autograd.grad(outs, tensors, ups, allow_unused=True)
        res[backend] = ([o.detach() for o in outs], grads)
    return names, res


def compare_stack(p, x, rtol=RTOL, atol=ATOL, **kw):
    names, res = run_both(p, x, **kw)
    (ro, rg), (to, tg) = res["torch"], res["triton"]
    assert len(ro) == len(to)
    for k, (a, b) in enumerate(zip(to, ro)):
        close(f"output[{k}]", a, b, rtol, atol)
    for n, a, b in zip(names, tg, rg):
        if b is None:
            assert a is None or a.abs().max() == 0, f"{n}: triton gives a gradient where torch has none"
            continue
        close(f"grad {n}", a, b, rtol, atol)


def compare_op(fn, args, rtol=RTOL, atol=ATOL, seed=1):
    """``fn(*args)`` under backends torch and triton: output and the gradient of every
    tensor argument that requires grad."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    res = {}
    for backend in ("torch", "triton"):
        with fieldkern.set_backend(backend):
            out = fn(*args)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
        res[backend] = (out.detach(), torch.autograd.grad(out, tensors, up))
    close("output", res["triton"][0], res["torch"][0], rtol, atol)
    for k, (a, b) in enumerate(zip(res["triton"][1], res["torch"][1])):
        close(f"grad of tensor argument {k}", a, b, rtol, atol)


def smooth_volume(D, seed=0, device="cpu"):
    """Three Gaussian blobs plus a little noise, ``(D, D, D)``: smooth enough that few
    trilinear samples sit within rounding distance of a voxel face, where the interpolant's
    derivative jumps and two correct implementations may pick different sides."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D)
    for _ in range(3):
        ctr = (torch.rand(3, generator=g) - 0.5) * D * 0.5
        vol += torch.exp(-((x - ctr[0]) ** 2 + (y - ctr[1]) ** 2 + (z - ctr[2]) ** 2) / (0.02 * D * D + 1))
    return (vol + 0.1 * torch.rand(D, D, D, generator=g)).to(device)


def projection_both_paths(volume, rotations, grad_out):
    """``project_volume`` on backends triton and torch: ``[(images, d volume, d rotations)]``
    for the upstream gradient ``grad_out``, triton first."""
    results = []
    for backend in ("triton", "torch"):
        v = volume.clone().requires_grad_()
        r = rotations.clone().requires_grad_()
        with fieldkern.set_backend(backend):
            out = fieldkern.ops.project_volume(v, r)
        (out * grad_out).sum().backward()
        results.append((out.detach(), v.grad, r.grad))
    return results


def spy_launches(monkeypatch, module, name):
    """Replace the kernel ``module.name`` by a wrapper that records each launch's grid and
    launches it; returns the list of grids."""
    launches = []
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, Spy())
    return launches
