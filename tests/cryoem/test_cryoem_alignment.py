"""Rigid alignment of a map to a reference (rotation search + FFT translation + hand flip)."""

import pytest
import torch

import fieldkern.cryoem as cem


def _moved(v, seed, shift=(2.0, -1.0, 3.0)):
    R = cem.random_rotations(1, torch.Generator().manual_seed(seed))[0]
    return cem.transform_volume(v, R, torch.tensor(shift)), R


@pytest.mark.parametrize("seed", [3, 11])
def test_rotated_and_shifted_copy_is_realigned(map_1ol5, seed):
    moved, R = _moved(map_1ol5, seed)
    _, before = cem.fourier_shell_correlation(moved, map_1ol5)
    res = cem.align_volume(moved, map_1ol5)
    _, fsc = cem.fourier_shell_correlation(res.volume, map_1ol5)
    D = map_1ol5.shape[0]
    assert before[1 : D // 4 + 1].min() < 0.5  # the frames really differed
    assert fsc[: D // 4 + 1].min() > 0.9
    assert not res.flipped
    # The recovered transform undoes the applied one: M = R^T, t = -R^T t0.
    assert float(cem.angular_distance_deg(res.rotation.float(), R.T)) < 1.0
    assert torch.allclose(res.shift.float(), -(R.T @ torch.tensor([2.0, -1.0, 3.0])), atol=0.3)
    assert res.score > 0.9
    # And the result is described by the returned transform.
    again = cem.fourier_shift(cem.transform_volume(moved.double(), res.matrix), res.shift, 3)
    assert torch.allclose(again.float(), res.volume, atol=1e-5)


def test_mirror_image_is_found_with_flip(map_1ol5):
    mirror = torch.flip(map_1ol5, [0])  # z -> -z about the box centre (up to one slice)
    moved, _ = _moved(mirror, 5, shift=(1.0, 0.0, -2.0))
    res = cem.align_volume(moved, map_1ol5, flip=True)
    assert res.flipped
    assert torch.allclose(torch.linalg.det(res.matrix), torch.tensor(-1.0, dtype=torch.float64))
    _, fsc = cem.fourier_shell_correlation(res.volume, map_1ol5)
    assert fsc[: map_1ol5.shape[0] // 4 + 1].min() > 0.9


def test_align_errors(map_1ol5):
    with pytest.raises(ValueError, match="reference"):
        cem.align_volume(map_1ol5, torch.zeros(16, 16, 16))
    with pytest.raises(ValueError, match="cubic"):
        cem.align_volume(torch.zeros(32, 32, 30), map_1ol5)
    with pytest.raises(ValueError, match="search_size"):
        cem.align_volume(map_1ol5, map_1ol5, search_size=7)
