"""``--pose-init``: the starting poses' distributions (fieldkern.cryoem.poses.initial_poses)."""

from __future__ import annotations

import math

import pytest
import torch

from fieldkern.cryoem import random_rotations
from fieldkern.cryoem.poses import FAR_POSE_INITS, POSE_INITS, initial_poses, pose_errors_deg
from fieldkern.cryoem.presets import AB_INITIO_POSE_SEARCH, AB_INITIO_SEARCH_TEMPERATURE, cryoem_preset

N = 20000
PRESET = cryoem_preset("quick", "4ake")


def _truth():
    return random_rotations(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _ks_distance(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance of ``samples`` to the distribution ``cdf``."""
    x, _ = torch.sort(samples.double())
    n = len(x)
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum((i / n - f).abs(), (f - (i - 1) / n).abs()).max())


# KS distance at which a sample of N from the claimed law is rejected at the 0.1% level
# (1.95 / sqrt(N)); the wrong laws below are rejected by 10-50x more.
KS_LIMIT = 1.95 / math.sqrt(N)


def test_uniform_is_the_truth_rotated_by_an_angle_uniform_in_0_to_180_degrees():
    truth = _truth()
    start = initial_poses(truth, "uniform", PRESET, seed=0)
    angle = pose_errors_deg(start, truth)
    assert _ks_distance(angle, lambda a: a / 180.0) < KS_LIMIT
    # and about an axis uniform on the sphere: the rotation vector's z in the particle's frame
    rel = start @ truth.transpose(-1, -2)
    axis = torch.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], -1)
    z = (axis / axis.norm(dim=-1, keepdim=True))[:, 2]
    assert _ks_distance(z, lambda t: (t + 1) / 2) < KS_LIMIT


def test_random_is_uniform_on_so3_and_independent_of_the_truth():
    """Haar measure: the angle to any fixed rotation has density (1 - cos a) / pi on
    [0, pi]; to the truth the same (nothing of it is used); another seed, other poses."""
    truth = _truth()
    start = initial_poses(truth, "random", PRESET, seed=0)
    haar = lambda a: (torch.deg2rad(a) - torch.sin(torch.deg2rad(a))) / math.pi  # noqa: E731
    assert _ks_distance(pose_errors_deg(start, truth), haar) < KS_LIMIT
    assert _ks_distance(pose_errors_deg(start, torch.eye(3, dtype=torch.float64).expand(N, 3, 3)), haar) < KS_LIMIT
    assert torch.equal(start, initial_poses(truth.flip(0), "random", PRESET, seed=0))  # the truth is not read
    assert not torch.equal(start, initial_poses(truth, "random", PRESET, seed=1))
    # the uniform init's angle law is not Haar's, nor Haar's uniform: the checks can fail
    assert _ks_distance(pose_errors_deg(initial_poses(truth, "uniform", PRESET, 0), truth), haar) > 10 * KS_LIMIT
    assert _ks_distance(pose_errors_deg(start, truth), lambda a: a / 180.0) > 10 * KS_LIMIT


def test_far_inits_take_the_global_search_by_default():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cryoem_cli", Path(__file__).parents[2] / "examples" / "cryoem.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for init in FAR_POSE_INITS:
        args = cli.parse_args(["--pose-init", init])
        assert (args.pose_search, args.search_temperature) == (AB_INITIO_POSE_SEARCH, AB_INITIO_SEARCH_TEMPERATURE)
        args = cli.parse_args(["--pose-init", init, "--pose-search", "0"])
        assert (args.pose_search, args.search_temperature) == (0, None)
        assert cli.parse_args(["--pose-init", init, "--search-temperature", "0"]).search_temperature == 0
    args = cli.parse_args(["--pose-init", "coarse"])
    assert (args.pose_search, args.search_temperature) == (None, None)
    assert cli.parse_args(["--pose-init", "coarse", "--pose-search", "96",
                           "--search-temperature", "3"]).search_temperature == 3
    for bad in (["--search-temperature", "2"], ["--pose-search", "96", "--search-temperature", "-1"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["--pose-init", "coarse", *bad])
    with pytest.raises(SystemExit):
        cli.parse_args(["--pose-init", "ab-initio"])


def test_unknown_init_is_refused_by_name():
    assert set(FAR_POSE_INITS) < set(POSE_INITS)
    with pytest.raises(ValueError, match=r"pose init must be one of .*'uniform', 'random'\), got 'randm'"):
        initial_poses(_truth()[:3], "randm", PRESET, seed=0)
