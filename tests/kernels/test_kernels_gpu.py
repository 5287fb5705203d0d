"""The kernel comparisons on a CUDA device (compiled Triton, not the interpreter).

Tolerances are the float32 ones of the CPU tests (RTOL 2e-5): TF32 (10-bit mantissa) in
either path would give ~1e-3 relative errors and fail them, so these also guard against an
accidental TF32 ``tl.dot`` or cuBLAS call.
"""

import pytest
import torch

import fieldkern
from _kernel_helpers import INTERPRET, MIXED_RTOL, close, compare_op, compare_stack, projection_both_paths, smooth_volume, stack_params
from _kernel_helpers import leaves as grad_leaves

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 is set: kernels would be interpreted"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cuda(p):
    return {k: [t.detach().cuda().requires_grad_(t.requires_grad) if t is not None else None for t in v]
            for k, v in p.items()}


def _x(n, d):
    return (torch.rand(n, d, device="cuda") - 0.5).requires_grad_()


CASES = [  # d, hidden, n_layers, out, gabor, residual, relu, detach, trainable_w, heads
    (2, 256, 4, 1, False, True, False, 0, False, None),
    (3, 128, 3, 1, False, True, True, 0, False, None),
    (2, 100, 5, 3, True, False, True, 2, True, None),
    (3, 20, 4, 2, True, True, False, 0, True, [1, 3]),
    (2, 200, 3, 1, True, True, True, 1, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("n_points", [1000, 4099])
def test_mfn_stack_cuda(case, n_points):
    d, h, n_layers, o, gabor, residual, relu, detach, train_w, heads = case
    p = _cuda(stack_params(d, h, n_layers, o, gabor, heads, trainable_w=train_w))
    # outputs are sums over many points' upstream gradients: allow for summation order
    compare_stack(p, _x(n_points, d), rtol=1e-4, atol=1e-4, residual=residual,
                  head_activation="relu" if relu else None, detach_heads_below=detach)


@pytest.mark.parametrize("hidden, precision, products",
                         [(128, "float32", "auto"), (256, "float32", "auto"), (256, "float32", "triton"),
                          (128, "mixed", "auto")])
def test_mfn_stack_backward_deterministic_cuda(hidden, precision, products):
    """Two backward passes give bitwise equal gradients: program-owned partial rows, slab
    partials of the Triton GEMMs summed in a fixed order, and cuBLAS (float32 by default),
    which repeats its results run to run on one GPU."""
    p = _cuda(stack_params(3, hidden, 3, 1, True, trainable_w=True))
    x = _x(70001, 3)
    leaves = [x, *p["filter_weight"], *p["linear_weight"], *p["head_weight"], *p["gabor_mu"]]
    grads = []
    for _ in range(2):
        with fieldkern.set_backend("triton"), fieldkern.ops.set_precision(precision), \
                fieldkern.ops.set_variant(mfn_backward_products=products):
            outs = fieldkern.ops.mfn_stack(x, **p, residual=True)
        grads.append(torch.autograd.grad(sum(o.square().sum() for o in outs), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gabor", [False, True])
def test_filters_and_layer_cuda(gabor):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, h = 3001, 3, 96
    x = (torch.rand(n, d, device="cuda", generator=g) - 0.5).requires_grad_()
    w = (torch.randn(h, d, device="cuda", generator=g) * 30).requires_grad_()
    b = torch.randn(h, device="cuda", generator=g).requires_grad_()
    gamma = (torch.rand(h, device="cuda", generator=g) * 5).requires_grad_()
    mu = (torch.rand(h, d, device="cuda", generator=g) - 0.5).requires_grad_()
    z = torch.randn(n, 80, device="cuda", generator=g).requires_grad_()
    a = (torch.randn(h, 80, device="cuda", generator=g) / 9).requires_grad_()
    c = torch.randn(h, device="cuda", generator=g).requires_grad_()
    if gabor:
        compare_op(fieldkern.ops.gabor_filter, (x, w, b, gamma, mu), rtol=1e-4, atol=1e-4)
        compare_op(fieldkern.ops.multiplicative_layer, (z, a, c, x, w, b, gamma, mu), rtol=1e-4, atol=1e-4)
    else:
        compare_op(fieldkern.ops.fourier_filter, (x, w, b), rtol=1e-4, atol=1e-4)
        compare_op(fieldkern.ops.multiplicative_layer, (z, a, None, x, w, b), rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("index", range(5))
def test_multiplicative_layer_every_backward_candidate(index):
    """The standalone layer's backward candidates (the stack has its own kernels), each forced."""
    from fieldkern.kernels import multiplicative_layer as ML

    assert len(ML.BWD_CANDIDATES) == 5
    kernel = ML._multiplicative_layer_bwd_kernel
    saved = kernel.configs
    kernel.configs = [ML.BWD_CANDIDATES[index]]
    kernel.cache.clear()
    try:
        g = torch.Generator(device="cuda").manual_seed(index)
        n, d, h, k = 3001, 3, 200, 130  # widths that are not multiples of the blocks
        leaf = lambda t: t.requires_grad_()  # noqa: E731
        x = leaf(torch.rand(n, d, device="cuda", generator=g) - 0.5)
        w = leaf(torch.randn(h, d, device="cuda", generator=g) * 30)
        b, c = (leaf(torch.randn(h, device="cuda", generator=g)) for _ in range(2))
        gamma = leaf(torch.rand(h, device="cuda", generator=g) * 5)
        mu = leaf(torch.rand(h, d, device="cuda", generator=g) - 0.5)
        z = leaf(torch.randn(n, k, device="cuda", generator=g))
        a = leaf(torch.randn(h, k, device="cuda", generator=g) / 11)
        compare_op(fieldkern.ops.multiplicative_layer, (z, a, c, x, w, b, gamma, mu), rtol=1e-4, atol=1e-4)
    finally:
        kernel.configs = saved
        kernel.cache.clear()

@pytest.mark.parametrize("forward", ["fused", "layered"])
def test_forward_float32_is_not_tf32(forward):
    """float32 stays float32 with torch's TF32 switch on (the reference runs with it off):
    outputs, one tile per point (TF32 would be ~1e-3 off, fp32 stays ~1e-6), and gradients
    through the backward's cuBLAS products and the layered forward's heads (TF32 would
    miss the 1e-4 of the other device tests); the switch is on again afterwards."""
    p = _cuda(stack_params(2, 256, 4, 1, freq=50.0, trainable_w=True))
    x = (torch.rand(4096, 2, device="cuda") - 0.5).requires_grad_()
    names, tensors = zip(*grad_leaves(p, x))

    def run(backend):
        with fieldkern.set_backend(backend), fieldkern.ops.set_variant(mfn_forward=forward):
            outs = fieldkern.ops.mfn_stack(x, **p, residual=True)
        ups = [torch.randn(o.shape, generator=torch.Generator(device="cuda").manual_seed(k), device="cuda")
               for k, o in enumerate(outs)]
        return [o.detach() for o in outs], torch.autograd.grad(outs, tensors, ups)

    ref, ref_grads = run("torch")
    torch.backends.cuda.matmul.allow_tf32 = True  # the autouse fixture restores it
    got, got_grads = run("triton")
    assert torch.backends.cuda.matmul.allow_tf32
    for a, b in zip(got, ref):
        close("output", a, b, rtol=2e-5, atol=1e-5)
    for n, a, b in zip(names, got_grads, ref_grads):
        close(f"grad {n}", a, b, rtol=1e-4, atol=1e-4)


def test_mixed_precision_cuda():
    p = _cuda(stack_params(2, 256, 4, 1, freq=50.0))
    x = torch.rand(4096, 2, device="cuda") - 0.5
    with fieldkern.set_backend("torch"):
        ref = fieldkern.ops.mfn_stack(x, **p, residual=True)[-1]
    with fieldkern.set_backend("triton"), fieldkern.ops.set_precision("mixed"):
        got = fieldkern.ops.mfn_stack(x, **p, residual=True)[-1]
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    # > 5e-4, not > 0: measured on an H100, float32 3.1e-6 and mixed 2.7e-3 from the
    # reference (bf16 operands: half an ulp is 2^-9 ~ 2e-3), so this shows bf16 was used.
    assert 5e-4 < err < MIXED_RTOL, err


def test_models_cuda_and_compile():
    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(3, 128, 1, n_scales=3, resolution=64, head_activation="relu").cuda()
    x = torch.rand(5000, 3, device="cuda") - 0.5
    with fieldkern.set_backend("torch"):
        ref = model(x)
    with fieldkern.set_backend("triton"):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    for a, b, c in zip(eager, compiled, ref):
        close("eager", a.detach(), c.detach(), rtol=1e-4, atol=1e-4)
        close("compiled", b.detach(), c.detach(), rtol=1e-4, atol=1e-4)


def test_cuda_graph_forward_backward():
    torch.manual_seed(0)
    model = fieldkern.ResidualMFN(2, 64, 1, n_scales=3, resolution=64).cuda()
    x = torch.rand(2048, 2, device="cuda") - 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    with fieldkern.set_backend("triton"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: autotuning must not happen during capture
            for _ in range(2):
                loss = sum(y.square().mean() for y in model(x))
                grads = torch.autograd.grad(loss, params)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = sum(y.square().mean() for y in model(x))
            grads = torch.autograd.grad(loss, params)
        graph.replay()
        torch.cuda.synchronize()
    with fieldkern.set_backend("torch"):
        ref_loss = sum(y.square().mean() for y in model(x))
        ref_grads = torch.autograd.grad(ref_loss, params)
    close("loss", loss.detach(), ref_loss.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        close("grad", a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D, B", [(20, 3), (32, 8), (64, 5)])
def test_project_volume_cuda(D, B):
    """Compiled projector vs the grid_sample reference on the device: values and gradients."""
    from fieldkern.cryoem import random_rotations

    g = torch.Generator(device="cuda").manual_seed(D)
    # Smooth: on a rough volume (torch.rand) ~1e-6 rounding differences put some samples
    # on the other side of a voxel face, where the trilinear derivative jumps; measured on
    # an H100: 0.7% max error in the rotation gradient at D = 32 against the reference.
    # At D = 64 this failed on an H200 (rotation gradient 2.5e-3 off) while the kernel walked
    # its rays by repeated addition; under the interpreter (D = 64, against float64) that
    # walk gave 1.6e-3 where the float32 reference gives 7e-4, and computing each sample from
    # the ray origin brought the kernel to the reference's error (5.6e-5 vs 5.5e-5, B = 1);
    # passed on an H200 after that change.
    volume = smooth_volume(D, seed=D, device="cuda")
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(B)).cuda()
    grad_out = torch.randn(B, D, D, device="cuda", generator=g)
    (out, gv, gr), (out_ref, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("images", out, out_ref, rtol=1e-4, atol=1e-4)
    # Both sides sum with float32 atomics (measured 1.2e-4 of the max at D = 64, B = 5).
    close("d volume", gv, gv_ref, rtol=1e-3, atol=1e-4)
    close("d rotations", gr, gr_ref, rtol=1e-3, atol=1e-3)


def _mfn_tuned_kernels():
    """Each autotuned mfn_stack kernel and its GPU candidates, by test id prefix."""
    from fieldkern.kernels import mfn_stack as M
    from fieldkern.kernels import multiplicative_layer as ML

    return {"fwd": (M._mfn_stack_fwd_kernel, M.FWD_CANDIDATES),
            "bwd": (M._mfn_stack_bwd_kernel, M.BWD_CANDIDATES),
            "rows": (M._rows_matmul_kernel, M._ROWS_CANDIDATES),
            "sum": (M._points_sum_kernel, M._SUM_CANDIDATES),
            "layer": (ML._multiplicative_layer_fwd_kernel, ML.FWD_CANDIDATES)}


def _candidate_params():
    return [pytest.param(which, i, id=f"{which}{i}")
            for which, (_, cands) in _mfn_tuned_kernels().items() for i in range(len(cands))]


@pytest.mark.parametrize("forward", ["fused", "layered"])
def test_mfn_stack_forward_variants_cuda(forward):
    """Both forwards, named, against the reference at a size of several tiles per program
    (autotuned, as a real run is)."""
    p = _cuda(stack_params(3, 128, 3, 1, False, trainable_w=True))
    with fieldkern.ops.set_variant(mfn_forward=forward):
        compare_stack(p, _x(20000, 3), rtol=1e-4, atol=1e-4, residual=True, head_activation="relu")


@pytest.mark.parametrize("products", ["cublas", "triton"])
def test_mfn_stack_backward_products_cuda(products):
    """Both float32 product paths of the backward, at the benchmark widths."""
    with fieldkern.ops.set_variant(mfn_backward_products=products):
        for d, h, n_layers in ((3, 128, 3), (2, 256, 4)):
            p = _cuda(stack_params(d, h, n_layers, 1, False, trainable_w=True))
            compare_stack(p, _x(4099, d), rtol=1e-4, atol=1e-4, residual=True, head_activation="relu")


@pytest.mark.parametrize("which, index", _candidate_params())
def test_mfn_stack_every_autotune_candidate(which, index):
    """Autotuning may pick any candidate, while the other tests (FIELDKERN_AUTOTUNE=0) run
    the first: force each one (stack forward, layer backward, the backward's two GEMMs, the
    layer-by-layer forward's multiplicative-layer kernel) on a wide, a 3D and an odd-width
    net; the float32 products on the Triton GEMMs for the wide net, cuBLAS for the others
    (so the layer kernel runs with and without its split z)."""
    kernel, candidates = _mfn_tuned_kernels()[which]
    saved = kernel.configs
    kernel.configs = [candidates[index]]
    kernel.cache.clear()
    # the fused forward, or layer by layer for the layer kernel's candidates
    forward = "layered" if which == "layer" else "fused"
    try:
        for d, h, n_layers, gabor, relu in ((2, 256, 4, False, False), (3, 128, 3, True, True),
                                            (2, 100, 5, False, True)):
            p = _cuda(stack_params(d, h, n_layers, 1, gabor, trainable_w=True))
            with fieldkern.ops.set_variant(mfn_forward=forward,
                                           mfn_backward_products="triton" if h > 128 else "cublas"):
                compare_stack(p, _x(4099, d), rtol=1e-4, atol=1e-4, residual=True,
                              head_activation="relu" if relu else None)
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def test_project_volume_deterministic_cuda():
    """torch.use_deterministic_algorithms: the gather kernel's volume gradient against the
    reference and bitwise equal across runs (the atomics' is not)."""
    from fieldkern.cryoem import random_rotations

    D, B = 48, 7
    volume = smooth_volume(D, seed=1, device="cuda")
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(3)).cuda()
    grad_out = torch.randn(B, D, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    (_, gv_ref_atomic, _), (_, gv_ref, _) = projection_both_paths(volume, rotations, grad_out)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # the reference's grid_sample
    try:                                                      # backward has no such mode
        runs = [projection_both_paths(volume, rotations, grad_out)[0][1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    close("d volume (gather)", runs[0], gv_ref, rtol=1e-3, atol=1e-4)
    close("d volume (gather vs atomics)", runs[0], gv_ref_atomic, rtol=1e-4, atol=1e-5)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("method", ["auto", "scatter", "scatter_tiled", "gather"])
def test_project_volume_gradient_variants_cuda(method):
    """Each volume-gradient variant, named (``auto``: the rule's scatter_tiled); both
    gradients right."""
    from fieldkern.cryoem import random_rotations

    D, B = 48, 40
    volume = smooth_volume(D, seed=3, device="cuda")
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(3)).cuda()
    grad_out = torch.randn(B, D, D, device="cuda")
    with fieldkern.ops.set_variant(volume_gradient=method):
        (_, gv, gr), (_, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("d volume", gv, gv_ref, rtol=1e-3, atol=1e-3)
    close("d rotations", gr, gr_ref, rtol=1e-3, atol=1e-3)


def _projector_candidates():
    from fieldkern.kernels import project_volume as PV

    return range(len(PV.FWD_CANDIDATES))


@pytest.mark.parametrize("index", _projector_candidates())
def test_project_volume_every_forward_candidate(index):
    """Each autotune candidate of the projector's forward against the reference."""
    from fieldkern.cryoem import random_rotations
    from fieldkern.kernels import project_volume as PV

    kernel = PV.project_volume_fwd_kernel
    saved = kernel.configs
    kernel.configs = [PV.FWD_CANDIDATES[index]]
    kernel.cache.clear()
    try:
        for D, B in ((34, 3), (64, 2)):
            volume = smooth_volume(D, seed=D, device="cuda")
            rotations = random_rotations(B, generator=torch.Generator().manual_seed(B)).cuda()
            with fieldkern.set_backend("triton"):
                out = fieldkern.ops.project_volume(volume, rotations)
            with fieldkern.set_backend("torch"):
                ref = fieldkern.ops.project_volume(volume, rotations)
            close("images", out, ref, rtol=1e-4, atol=1e-4)
    finally:
        kernel.configs = saved
        kernel.cache.clear()
