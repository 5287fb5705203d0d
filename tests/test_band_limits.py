"""The central property of the method: scale k of a band-limited model carries no
spectral energy beyond its band B_k per axis.

Each output is a trigonometric polynomial, so its band does not depend on the domain it is
sampled on. We sample long axis-parallel lines (length T = 16 unit cells, 64 samples per
unit: 4x finer than the N = 16 training grid) for a fine frequency resolution (2 pi / T rad
per bin), window them with a Kaiser window (beta 12: sidelobes near -90 dB, main lobe about
4 bins wide) and measure the fraction of energy above B_k + 6 bins.
"""

import math

import pytest
import torch

from fieldkern import BACON, ResidualMFN

T = 16.0
M = 1024
MARGIN = 6 * 2 * math.pi / T
LEAK = 1e-8  # measured ~1e-10; energy beyond the previous band is ~0.1-0.3


def energy_beyond(model, scale: int, axis: int, band: float, n_lines: int = 24) -> float:
    dim = model.in_features
    gen = torch.Generator().manual_seed(axis)
    t = (torch.arange(M, dtype=torch.float64) + 0.5) / M * T - T / 2
    x = (torch.rand(n_lines, 1, dim, dtype=torch.float64, generator=gen) - 0.5).repeat(1, M, 1)
    x[..., axis] = t
    with torch.no_grad():
        y = model(x)[scale]  # (lines, M, out)
    y = (y - y.mean(1, keepdim=True)).transpose(1, 2)
    window = torch.kaiser_window(M, periodic=False, beta=12.0, dtype=torch.float64)
    power = torch.fft.rfft(y * window, dim=-1).abs() ** 2
    omega = 2 * math.pi * torch.arange(power.shape[-1], dtype=torch.float64) / T
    return (power[..., omega > band + MARGIN].sum() / power.sum()).item()


def models(dim: int, seed: int):
    torch.manual_seed(seed)
    yield "residual", ResidualMFN(dim, 32, 2, 3, 16).double()
    yield "residual-bacon-init", ResidualMFN(dim, 32, 2, 3, 16, init="bacon").double()
    yield "bacon", BACON(dim, 32, 2, 3, 16).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dim", [2, 3])
def test_every_scale_is_band_limited(dim, seed):
    for name, model in models(dim, seed):
        bands = model.band_limits
        assert bands[-1] <= math.pi * 16 + 1e-9, name  # the finest scale stays below Nyquist
        for k, band in enumerate(bands):
            for axis in range(dim):
                leak = energy_beyond(model, k, axis, band)
                assert leak < LEAK, f"{name} scale {k} axis {axis}: {leak:.2e} of the energy beyond B_k"
                if k > 0:
                    # Not trivially satisfied: the scale does use its band beyond the coarser one.
                    assert energy_beyond(model, k, axis, bands[k - 1]) > 1e-3, name


def test_check_detects_a_violation():
    torch.manual_seed(0)
    model = ResidualMFN(2, 32, 2, 3, 16).double()
    with torch.no_grad():
        model.filters[-1].weight.mul_(1.5)  # push the last layer past its budget
    leaks = [energy_beyond(model, 2, axis, model.band_limits[2]) for axis in range(2)]
    assert max(leaks) > 1e-4


def test_new_init_bands_follow_the_geometric_schedule():
    model = ResidualMFN(2, 8, 1, 4, 256)
    c = 1 + 0.3 + 2.0
    bands = model.band_limits
    assert bands[-1] == pytest.approx(math.pi * 256)
    for k in range(1, 4):
        assert bands[k] / bands[k - 1] == pytest.approx(c)
    # The frozen frequencies respect the budget per axis: sum_i max|W_i| <= B_k.
    per_layer = [f.weight.abs().amax(0) for f in model.filters]
    for k in range(4):
        assert torch.all(sum(per_layer[: k + 1]) <= bands[k] * (1 + 1e-6))


def test_bacon_bands_split_nyquist_equally():
    model = BACON(2, 8, 1, 4, 256)
    assert model.band_limits == pytest.approx([math.pi * 256 * (k + 1) / 4 for k in range(4)])
