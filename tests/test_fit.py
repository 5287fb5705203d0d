"""A tiny end-to-end fit: staged residual MFN on a 32x32 image reaches a stated PSNR."""

import math

import pytest
import torch

from fieldkern import ResidualMFN, grid_coordinates

N = 32


def image():
    x = grid_coordinates((N, N))
    X, Y = x[..., 0], x[..., 1]
    smooth = 0.3 * torch.sin(2 * math.pi * 3 * X) * torch.cos(2 * math.pi * 2 * Y)
    disc = 0.2 * (X**2 + Y**2 < 0.09).float()  # a sharp edge needs the fine scales
    return x, (0.5 + smooth + disc).unsqueeze(-1)


def psnr(a, b):
    return (-10 * torch.log10(((a - b) ** 2).mean())).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_staged_residual_mfn_fits_a_small_image(seed):
    torch.manual_seed(seed)
    x, target = image()
    model = ResidualMFN(2, 64, 1, 3, N)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for it in range(300):
        model.set_stage(0 if it < 30 else 1 if it < 60 else 2)  # the paper's 5%/10% switches
        optimizer.zero_grad()
        model.stage_loss(model(x), target).backward()
        optimizer.step()
    model.set_stage(None)
    with torch.no_grad():
        scores = [psnr(y, target) for y in model(x)]
    assert scores[-1] > 35.0, scores  # measured 42.5 dB (seed 0) on a 2-core CPU
    assert scores[0] < scores[1] < scores[2], scores  # finer scales fit better
