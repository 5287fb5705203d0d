"""Projection convention, exactness, gradients, chunking and memory of cryoem.project (and of the
chunked reference projector, whose block sizes are its own knobs)."""

import math

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fieldkern.cryoem as cem
from fieldkern.ops.project_volume import project_volume_reference


def cflip(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Mirror about the centre index D//2: out[i] = a[D - i], out[0] = 0 (D is outside the box)."""
    D = a.shape[dim]
    out = torch.zeros_like(a)
    src = torch.flip(a.narrow(dim, 1, D - 1), [dim])  # a[D-1], ..., a[1]
    out.narrow(dim, 1, D - 1).copy_(src)
    return out


def test_identity_rotation_is_the_sum_over_z():
    v = torch.randn(8, 8, 8, dtype=torch.float64)
    img = cem.project(v, torch.eye(3, dtype=torch.float64)[None])
    assert img.shape == (1, 8, 8)
    assert torch.allclose(img[0], v.sum(0), atol=1e-12)


# Exact 90/180-degree rotations about the axes, and the array operation each must equal
# for a volume S-summed along the right axis (centre = index D//2, so a mirror is cflip).
R90Z = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
R90X = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]
R90Y = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]
R180Z = [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]


@pytest.mark.parametrize(
    "R, expected",
    [
        # R^T (x, y, z) = (y, -x, z): I[y, x] = sum_z V[z, -x, y]
        (R90Z, lambda v: cflip(v.sum(0), 0).T),
        # R^T (x, y, z) = (x, z, -y): I[y, x] = sum_y' V[-y, y', x]
        (R90X, lambda v: cflip(v.sum(1), 0)),
        # R^T (x, y, z) = (-z, y, x): I[y, x] = sum_k V[x, y, -z_k]; -z_k never reaches index 0
        (R90Y, lambda v: v[:, :, 1:].sum(2).T),
        # R^T (x, y, z) = (-x, -y, z)
        (R180Z, lambda v: cflip(cflip(v.sum(0), 0), 1)),
    ],
)
def test_axis_rotations_are_exact_array_permutations(R, expected):
    v = torch.randint(0, 100, (8, 8, 8)).to(torch.float64)
    img = cem.project(v, torch.tensor(R, dtype=torch.float64)[None])[0]
    assert torch.equal(img, expected(v))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_off_centre_blob_lands_where_R_predicts(gaussian_blob, seed):
    D = 32
    r0 = torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64)  # (x, y, z) voxels from the centre
    v = gaussian_blob(D, r0.tolist(), sigma=1.2)
    R = cem.random_rotations(1, torch.Generator().manual_seed(seed), dtype=torch.float64)
    img = cem.project(v, R)[0]
    expect = R[0] @ r0  # image-frame position; (x, y) are the first two entries
    idx = torch.arange(D, dtype=torch.float64) - D // 2
    mass = img.sum()
    cx = (img.sum(0) * idx).sum() / mass
    cy = (img.sum(1) * idx).sum() / mass
    assert abs(cx - expect[0]) < 0.05 and abs(cy - expect[1]) < 0.05
    peak = divmod(int(img.argmax()), D)
    assert peak == (round(float(expect[1])) + D // 2, round(float(expect[0])) + D // 2)
    # The mass of the blob is conserved (it is well inside the box).
    assert torch.allclose(mass, v.sum(), rtol=1e-3)


def test_transform_volume_then_identity_equals_projection():
    v = torch.randint(0, 100, (8, 8, 8)).to(torch.float64)
    R = torch.tensor(R90Y, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)[None]
    assert torch.equal(cem.project(cem.transform_volume(v, R), eye), cem.project(v, R[None]))


def test_transform_volume_matches_projection_for_smooth_volume(blob_volume):
    v = blob_volume(24)
    R = cem.random_rotations(1, torch.Generator().manual_seed(5), dtype=torch.float64)
    direct = cem.project(v, R)
    via = cem.project(cem.transform_volume(v, R[0]), torch.eye(3, dtype=torch.float64)[None])
    # Not two interpolations: the identity projection samples the transformed volume at its
    # voxel centres, i.e. V at the very points project samples (as documented, they are
    # equal): measured 2e-16 of the max in float64. A 0.025-voxel offset gives 1.3e-2.
    assert torch.allclose(via, direct, rtol=0, atol=1e-12 * float(direct.abs().max()))


def test_gradcheck_volume_and_rotations():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(4, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    R = cem.random_rotations(3, g, dtype=torch.float64).requires_grad_()
    # chunk_size=1 and slice_chunk=2 run the checkpointed, blocked path.
    f = lambda v, R: project_volume_reference(v, R, chunk_size=1, slice_chunk=2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (v, R), eps=1e-6, atol=1e-5)


def test_chunking_gives_the_same_values_and_gradients(blob_volume):
    v0 = blob_volume(12, torch.float32)
    R0 = cem.random_rotations(7, torch.Generator().manual_seed(3))
    results = []
    for kw in ({}, {"chunk_size": 2}, {"chunk_size": 3, "slice_chunk": 5}, {"slice_chunk": 1}):
        v = v0.clone().requires_grad_()
        R = R0.clone().requires_grad_()
        img = project_volume_reference(v, R, **kw)
        (img * torch.linspace(-1, 1, img.numel()).reshape(img.shape)).sum().backward()
        results.append((img.detach(), v.grad, R.grad))
    for img, gv, gR in results[1:]:
        assert torch.allclose(img, results[0][0], atol=1e-5)
        assert torch.allclose(gv, results[0][1], atol=1e-5)
        assert torch.allclose(gR, results[0][2], atol=1e-4)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ops (forward and backward) and still alive."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= n
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    n = t.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, n)
                    self.current += n
        self.peak = max(self.peak, self.current)
        return out


def _peak_bytes(B: int, D: int, **kw) -> int:
    v = torch.randn(D, D, D, requires_grad=True)
    R = cem.random_rotations(B, torch.Generator().manual_seed(0)).requires_grad_()
    with PeakLiveBytes() as m:
        img = project_volume_reference(v, R, chunk_size=4, **kw)
        img.square().sum().backward()
    return m.peak


def test_memory_does_not_grow_with_batch_beyond_the_output():
    D, b_small, b_big = 16, 8, 64
    grow = _peak_bytes(b_big, D) - _peak_bytes(b_small, D)
    image_bytes = (b_big - b_small) * D * D * 4
    # Output, its gradient and a few (B, D, D)/(B, 3, 3) temporaries: a small multiple of
    # the images, far below one rotated grid per extra image ((B, D^3, 3) floats).
    assert grow <= 4 * image_bytes
    # The check can fail: without checkpointing, autograd keeps every chunk's grid.
    grow_unbounded = _peak_bytes(b_big, D, use_checkpoint=False) - _peak_bytes(
        b_small, D, use_checkpoint=False
    )
    assert grow_unbounded > (b_big - b_small) * D**3 * 4


def test_fourier_slice_theorem(blob_volume):
    """2D DFT of a projection == 3D DFT of the volume on the plane R^T (kx, ky, 0)."""
    D = 32
    v = blob_volume(D)
    R = cem.random_rotations(1, torch.Generator().manual_seed(0), dtype=torch.float64)[0]
    f2 = cem.fft2_centered(cem.project(v, R[None])[0])
    k = torch.arange(D, dtype=torch.float64) - D // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    pos = torch.stack([x, y, z], -1).reshape(-1, 3)
    keep = (kx**2 + ky**2) <= (D / 4) ** 2  # trilinear interpolation damps higher frequencies

    def dft_on_plane(M):
        q = torch.stack([kx[keep], ky[keep], torch.zeros_like(kx[keep])], -1) @ M  # rows (M^T k)^T
        return torch.exp(-2j * math.pi * (q @ pos.T) / D) @ v.reshape(-1).to(torch.complex128)

    def rel_err(M):
        f3 = dft_on_plane(M)
        return float((f2[keep] - f3).abs().norm() / f3.abs().norm())

    assert rel_err(R) < 0.04  # measured 0.023: interpolation error only
    assert rel_err(R.T) > 0.5  # the transposed convention is clearly wrong


def test_field_coordinates():
    c = cem.field_coordinates(8)
    assert c.shape == (8, 8, 8, 3)
    assert torch.equal(c[4, 4, 4], torch.zeros(3))
    assert torch.equal(c[0, 0, 0], torch.full((3,), -0.5))
    assert torch.allclose(c[1, 2, 7], torch.tensor([3 / 8, -2 / 8, -3 / 8]))  # (x, y, z) from [z, y, x]


@pytest.mark.parametrize(
    "volume, rotations, exc, match",
    [
        (torch.zeros(8, 8, 6), torch.eye(3)[None], ValueError, "cubic"),
        (torch.zeros(7, 7, 7), torch.eye(3)[None], ValueError, "even"),
        (torch.zeros(8, 8, 8, dtype=torch.int32), torch.eye(3)[None], TypeError, "floating"),
        (torch.zeros(8, 8), torch.eye(3)[None], ValueError, "volume"),
        (torch.zeros(8, 8, 8), torch.eye(3), ValueError, r"rotations.*\(B, 3, 3\)"),
        (torch.zeros(8, 8, 8), torch.zeros(2, 3, 4), ValueError, r"rotations.*\(B, 3, 3\)"),
        (torch.zeros(8, 8, 8), torch.eye(3, dtype=torch.int64)[None], TypeError, "rotations"),
        ([[0.0]], torch.eye(3)[None], TypeError, "volume"),
    ],
)
def test_bad_arguments_raise_clear_errors(volume, rotations, exc, match):
    with pytest.raises(exc, match=match):
        cem.project(volume, rotations)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        project_volume_reference(torch.zeros(4, 4, 4), torch.eye(3)[None], chunk_size=0)


def test_empty_batch():
    assert cem.project(torch.zeros(4, 4, 4), torch.zeros(0, 3, 3)).shape == (0, 4, 4)
