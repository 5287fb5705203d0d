"""The Triton projector against the reference: values, volume and rotation gradients.

Tolerances (float32 both sides, compared as |a - b| <= ATOL + RTOL * max|b|): the kernel and
``grid_sample`` compute the same trilinear taps in a different order.
"""

import pytest
import torch
from _kernel_helpers import close, needs_interpreter, projection_both_paths, smooth_volume, spy_launches
from hypothesis import given, settings
from hypothesis import strategies as st

import fieldkern
from fieldkern import ops
from fieldkern.cryoem import random_rotations

pytestmark = needs_interpreter

RTOL, ATOL = 2e-5, 1e-5


@pytest.mark.parametrize("D, B", [(6, 1), (10, 3), (12, 5)])
def test_projection_values_and_gradients(D, B):
    """Even D that are not powers of two, B = 1 and B not a multiple of anything."""
    volume = smooth_volume(D)
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(D)).float()
    grad_out = torch.randn(B, D, D, generator=torch.Generator().manual_seed(1))
    (out, gv, gr), (out_ref, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("images", out, out_ref, RTOL, ATOL)
    close("d volume", gv, gv_ref, RTOL, ATOL)
    close("d rotations", gr, gr_ref, 1e-4, 1e-4)


@pytest.mark.parametrize("tile_w", [4, 8])
def test_projection_tiled_pixels(tile_w):
    """The forward's rectangular pixel tiles (autotune candidates on the GPU; the interpreter
    runs the row-run config otherwise), D a multiple of neither tile side: the edge tiles are
    partly outside the image."""
    import triton

    from fieldkern.kernels import project_volume as PV

    kernel = PV.project_volume_fwd_kernel
    saved = kernel.configs
    kernel.configs = [triton.Config({"BLOCK": 64, "TILE_W": tile_w}, num_warps=4)]
    kernel.cache.clear()
    try:
        D, B = 18, 3
        volume = smooth_volume(D)
        rotations = random_rotations(B, generator=torch.Generator().manual_seed(5)).float()
        with fieldkern.set_backend("triton"):
            out = ops.project_volume(volume, rotations)
        with fieldkern.set_backend("torch"):
            ref = ops.project_volume(volume, rotations)
        close("images", out, ref, RTOL, ATOL)
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def test_rotation_gradient_matches_finite_differences():
    D = 8
    volume = smooth_volume(D, seed=3).double()
    R = random_rotations(2, generator=torch.Generator().manual_seed(5)).float()
    grad_out = torch.randn(2, D, D, generator=torch.Generator().manual_seed(2)).double()
    r = R.clone().requires_grad_()
    with fieldkern.set_backend("triton"):
        loss = (ops.project_volume(volume.float(), r).double() * grad_out).sum()
    loss.backward()
    # Small enough that R +- eps stays within the rotation check's tolerance (1e-3) of a
    # rotation; float64 keeps the difference quotient's rounding at ~1e-12.
    eps = 1e-4
    fd = torch.zeros(2, 3, 3, dtype=torch.float64)
    with fieldkern.set_backend("torch"):
        for b in range(2):
            for i in range(3):
                for j in range(3):
                    dR = torch.zeros(2, 3, 3, dtype=torch.float64)
                    dR[b, i, j] = eps
                    lp = (ops.project_volume(volume, R.double() + dR) * grad_out).sum()
                    lm = (ops.project_volume(volume, R.double() - dR) * grad_out).sum()
                    fd[b, i, j] = (lp - lm) / (2 * eps)
    # The trilinear interpolant has kinks at voxel faces that some of the 2 * D^3 samples
    # may cross within +-eps: central differences are good to ~1% here, not to rounding.
    close("d rotations vs finite differences", r.grad.double(), fd, rtol=1e-2, atol=1e-3)


def test_bfloat16_volume_storage_accumulates_in_float32():
    """bf16 voxels, fp32 sums, one rounding of each pixel to bf16 at the end: within half a
    bf16 ulp (2^-8 relative) of the fp32 projection of the same stored values. Sums of 2 D
    interpolated samples kept in bf16 would be off by many ulps."""
    D = 8
    volume = smooth_volume(D)
    R = random_rotations(3, generator=torch.Generator().manual_seed(0)).float()
    with fieldkern.set_backend("triton"):
        out = ops.project_volume(volume.bfloat16(), R)
    ref = ops.project_volume(volume.bfloat16().float(), R)  # the same stored values, fp32 path
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-8 + 1e-5, atol=1e-6)  # elementwise


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rotation_gives_a_nan_image(bad):
    """A diverged pose must not project to a plausible (empty) image: NaN on both paths,
    the other images unchanged."""
    volume = smooth_volume(6)
    R = random_rotations(3, generator=torch.Generator().manual_seed(2)).float()
    good = ops.project_volume(volume, R)
    R[1, 2, 0] = bad
    for backend in ("torch", "triton"):
        with fieldkern.set_backend(backend):
            out = ops.project_volume(volume, R)
        assert out[1].isnan().all(), backend
        close(backend, out[[0, 2]], good[[0, 2]], rtol=1e-5, atol=1e-5)


def test_empty_batch():
    with fieldkern.set_backend("triton"):
        assert ops.project_volume(torch.zeros(4, 4, 4), torch.zeros(0, 3, 3)).shape == (0, 4, 4)


@settings(max_examples=6, deadline=None)
@given(half=st.integers(2, 6), B=st.integers(1, 4), seed=st.integers(0, 100))
def test_projection_hypothesis_shapes(half, B, seed):
    D = 2 * half
    volume = smooth_volume(D, seed)
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(seed)).float()
    with fieldkern.set_backend("triton"):
        out = ops.project_volume(volume, rotations)
    close("images", out, ops.project_volume(volume, rotations), RTOL, ATOL)


def _rot(axis, angle):
    """Rotation by ``angle`` about coordinate axis ``axis`` (0 = x), with exact 0/1 entries
    where the angle makes them so (cos/sin of multiples of 90 degrees rounded to integers)."""
    c, s = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
    if abs(angle) % (torch.pi / 2) < 1e-12 or abs(abs(angle) % (torch.pi / 2) - torch.pi / 2) < 1e-12:
        c, s = c.round(), s.round()
    i, j = [a for a in range(3) if a != axis]
    R = torch.eye(3, dtype=torch.float64)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


# Exact axis-aligned and 90/180-degree rotations (ray directions with components exactly 0,
# samples on voxel centres, rays along the box faces and exactly one voxel outside them),
# 45 degrees about one axis (whole rays outside the box, others leaving it early), and
# angles of 1e-6 (direction components tiny but not 0: huge slab parameters). At D = 22 the
# interpreter's 64-pixel programs hold about three rows, and x45 and tilted clip their loops
# at both ends (steps 2..20 of 22 for x45's first rows; tilted 1..22 and 0..21); at D <= 10
# no program's loop is clipped (``_clipped_loops``; the test checks the D = 22 case).
_EDGE_ROTATIONS = {
    "identity": torch.eye(3, dtype=torch.float64),
    "x90": _rot(0, torch.pi / 2),
    "y90": _rot(1, torch.pi / 2),
    "z90": _rot(2, torch.pi / 2),
    "z180": _rot(2, torch.pi),
    "cycle": torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64),
    "z45": _rot(2, torch.pi / 4),
    "x45": _rot(0, torch.pi / 4),
    "tiny": _rot(0, 1e-6) @ _rot(1, -1e-6),
    "tilted": _rot(0, 1.2) @ _rot(1, 0.5),
}
# Rotations that put every sample on a voxel face in some coordinate (exact integers).
_ON_FACES = ("identity", "x90", "y90", "z90", "z180", "cycle", "z45", "x45")


def _clipped_loops(D, rotation, block):
    """(programs whose loop starts after step 0, programs whose loop ends before step D) of
    the kernels' row-run programs of ``block`` pixels for one rotation: ``_k_range`` of
    fieldkern/kernels/project_volume.py in float64, which is the same for these rotations."""
    R = rotation.double()
    c = D // 2
    pix = torch.arange(D * D)
    p = torch.stack([(pix % D - c).double(), (pix // D - c).double(), torch.full((D * D,), -float(c))], 1)
    q0, d = p @ R + (c + 1), R[2].expand(D * D, 3)  # padded-index ray origins, per-step increment
    t1, t2 = (-0.5 - q0) / d, (D + 1.5 - q0) / d  # no component of d is 0 for x45 / tilted
    lo = torch.minimum(t1, t2).amax(1).clamp(min=0.0)
    hi = torch.maximum(t1, t2).amin(1).clamp(max=D - 1.0)
    starts, ends = 0, 0
    for lo_p, hi_p in zip(lo.split(block), hi.split(block)):
        keep = lo_p <= hi_p
        if keep.any():
            starts += int(lo_p[keep].min().floor()) > 0
            ends += int(hi_p[keep].max().floor()) + 2 < D
    return starts, ends


@pytest.mark.parametrize("D, names", [(8, None), (10, None), (22, ("x45", "tilted"))])
def test_projection_edge_rotations(D, names):
    """Ray clipping and the padded box at their edge cases (D = 22: the two rotations that
    clip at both ends, as the interpreter is slow there). At axis-aligned rotations, and in one
    coordinate at 45 degrees about an axis, every sample sits on a kink of the interpolant,
    where the rotation gradient is one-sided; the reference computes those positions exactly
    only for power-of-two D (see ``_project_block``; at other D it can land on the other side:
    at D = 34 it differed by ~10%, as did the previous kernel), so for D = 10 and 22 the rotation gradient
    is compared on the other rotations only. At the 1e-6 angles the samples lie within
    rounding of those kinks in both implementations: values and the volume gradient only."""
    from fieldkern.kernels.project_volume import _FWD_CONFIGS, BLOCK

    assert [(c.kwargs["BLOCK"], c.kwargs["TILE_W"]) for c in _FWD_CONFIGS] == [(BLOCK, 0)]  # row runs
    if names:  # the case exists to clip loops at both ends (forward and backward share _k_range)
        assert all(min(_clipped_loops(D, _EDGE_ROTATIONS[n], BLOCK)) > 0 for n in names)
    volume = smooth_volume(D, seed=D)
    names = list(names or _EDGE_ROTATIONS)
    rotations = torch.stack([_EDGE_ROTATIONS[n] for n in names]).float()
    grad_out = torch.randn(len(names), D, D, generator=torch.Generator().manual_seed(4))
    (out, gv, gr), (out_ref, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("images", out, out_ref, RTOL, ATOL)
    close("d volume", gv, gv_ref, RTOL, ATOL)
    compare = [i for i, n in enumerate(names)
               if n != "tiny" and (D & (D - 1) == 0 or n not in _ON_FACES)]
    close("d rotations", gr[compare], gr_ref[compare], 1e-4, 1e-4)
    # Axis-aligned projections are sums of voxels along an axis: exact up to rounding.
    if names[0] == "identity":
        close("identity = sum over z", out[0], volume.sum(0), RTOL, ATOL)


@pytest.fixture
def deterministic_algorithms():
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("D, B, edge", [(6, 2, False), (10, 3, False), (8, 0, True)])
def test_deterministic_volume_gradient(D, B, edge, deterministic_algorithms, monkeypatch):
    """Under torch.use_deterministic_algorithms the volume gradient comes from the gather
    kernel (no atomics): against the reference, random rotations with a non-power-of-two D,
    and the exact axis-aligned / 45-degree ones whose samples sit on voxel faces."""
    from fieldkern.kernels import project_volume as PV

    launches = spy_launches(monkeypatch, PV, "project_volume_bwd_gather_kernel")
    volume = smooth_volume(D, seed=D)
    if edge:
        rotations = torch.stack([_EDGE_ROTATIONS[n] for n in _EDGE_ROTATIONS if n != "tiny"]).float()
    else:
        rotations = random_rotations(B, generator=torch.Generator().manual_seed(D)).float()
    grad_out = torch.randn(len(rotations), D, D, generator=torch.Generator().manual_seed(2))
    (out, gv, gr), (out_ref, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("d volume (gather)", gv, gv_ref, RTOL, ATOL)
    # the gather kernel, not the atomics, made it (bitwise repeats: test_project_volume_deterministic_cuda;
    # the interpreter runs programs in turn, so a repeat here could not differ)
    assert len(launches) == 1


@pytest.mark.parametrize("method", ["auto", "scatter", "scatter_tiled", "gather"])
def test_volume_gradient_variants(method, monkeypatch):
    """Each volume-gradient variant, named (``auto``: the rule's ``scatter_tiled``), against
    the reference (D = 12: the rectangles' edge tiles are partly outside the image). The
    scatter kernel's grid shows the pixels it walked (3 row runs of 64 pixels per image, or
    2 x 2 rectangles of 8 x 8), also for the rotation gradient beside the gather; the gather
    kernel runs only when named."""
    from fieldkern.kernels import project_volume as PV

    D, B = 12, 2
    volume = smooth_volume(D)
    rotations = random_rotations(B, generator=torch.Generator().manual_seed(4)).float()
    grad_out = torch.randn(B, D, D, generator=torch.Generator().manual_seed(5))
    gathers = spy_launches(monkeypatch, PV, "project_volume_bwd_gather_kernel")
    scatters = spy_launches(monkeypatch, PV, "project_volume_bwd_kernel")
    with fieldkern.ops.set_variant(volume_gradient=method):
        (out, gv, gr), (out_ref, gv_ref, gr_ref) = projection_both_paths(volume, rotations, grad_out)
    close("d volume", gv, gv_ref, RTOL, ATOL)
    close("d rotations", gr, gr_ref, 1e-4, 1e-4)
    assert len(gathers) == (method == "gather")
    assert scatters == [(B, 4 if method in ("auto", "scatter_tiled") else 3)]


@pytest.mark.parametrize("method", ["scatter", "scatter_tiled"])
def test_named_scatter_refused_under_deterministic_algorithms(method, deterministic_algorithms):
    """A scatter named for the volume gradient raises under deterministic algorithms (its
    atomics vary run to run); a rotation gradient alone has no atomics and runs."""
    volume = smooth_volume(6)
    rotations = random_rotations(2, generator=torch.Generator().manual_seed(1)).float()
    with fieldkern.set_backend("triton"), fieldkern.ops.set_variant(volume_gradient=method):
        out = ops.project_volume(volume.clone().requires_grad_(), rotations)
        r = rotations.clone().requires_grad_()
        rotation_only = ops.project_volume(volume, r)
    with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
        out.sum().backward()
    rotation_only.sum().backward()
    assert r.grad is not None and r.grad.isfinite().all()
