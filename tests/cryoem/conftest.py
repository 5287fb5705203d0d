"""Fixtures shared by the cryo-EM tests (small, deterministic inputs)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """Run each cryo-EM test with one intra-op thread (restored afterwards).

    The tests use small tensors, for which threading does not pay; on a shared, loaded
    2-core machine every threaded op can cost milliseconds of synchronisation, which made
    the suite several times slower and its timing erratic.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _blobs(D: int, blobs, dtype=torch.float64) -> torch.Tensor:
    """Sum of isotropic Gaussians ``(x, y, z, sigma, amplitude)`` in centred voxel units."""
    g = torch.arange(D, dtype=dtype) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    v = torch.zeros(D, D, D, dtype=dtype)
    for cx, cy, cz, s, a in blobs:
        v += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return v


@pytest.fixture
def blob_volume():
    """Factory: a smooth, asymmetric volume (three Gaussian blobs) of size D."""

    def make(D: int = 32, dtype=torch.float64) -> torch.Tensor:
        s = D / 32
        return _blobs(
            D,
            [
                (3 * s, -2 * s, 1 * s, 2.0 * s, 1.0),
                (-4 * s, 3 * s, -2 * s, 1.5 * s, 0.7),
                (1 * s, 5 * s, 4 * s, 2.5 * s, 0.5),
            ],
            dtype,
        )

    return make


@pytest.fixture
def gaussian_blob():
    """Factory: one Gaussian blob at centred voxel position (x, y, z) with width sigma."""

    def make(D: int, pos, sigma: float = 1.0, dtype=torch.float64) -> torch.Tensor:
        return _blobs(D, [(*pos, sigma, 1.0)], dtype)

    return make


@pytest.fixture(scope="session")
def map_1ol5():
    """The 1OL5 density at D = 32, 3 A voxels (float32), shared across tests."""
    pytest.importorskip("gemmi")
    from fieldkern.cryoem import density_from_structure

    return density_from_structure("1ol5", 32, 3.0)
