"""SAPE: spatially-adaptive progressive encoding (Hertz et al., NeurIPS 2021), compact form.

The paper's coarse-to-fine baseline. A ReLU MLP reads Fourier features of the coordinate,
``[x, sin(B x), cos(B x)]``, whose frequency rows are sorted from low to high norm. Every
point ``p`` has a progress level ``alpha(p)`` in [0, 1]; frequency ``j`` (of ``n``) enters
with weight ``clamp(alpha(p) n - j, 0, 1)``, so higher frequencies fade in one after the
other. After each training step ``alpha`` advances by ``1 / progress_steps`` at every
training pixel whose squared error is still above ``threshold``, and stays where it is
where the fit is already good enough: smooth regions keep a low-frequency encoding (no
high-frequency noise when generalising), edges and text unlock the full spectrum.

Simplifications versus the authors' code, documented here so results are read correctly:
``alpha`` lives on the training grid (one value per training pixel, as in their 2D image
experiments) and is bilinearly interpolated at other points (e.g. the 512 evaluation
grid); frequencies are Gaussian random Fourier features (Tancik et al. 2020) with
standard deviation ``sigma`` rad per unit length; the reveal is per frequency rather than
per block of frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fieldkern.checks import check_count


class SAPE(nn.Module):
    """ReLU MLP on a progressively, spatially masked Fourier-feature encoding.

    ``model(x)``: coordinates ``(..., in_features)`` on [-0.5, 0.5) -> ``(..., out_features)``.

    Args:
        in_features: coordinate dimension (2 for images; the mask grid is 2D).
        hidden_features: MLP width.
        out_features: channels.
        resolution: training grid size per axis; the mask has ``resolution^2`` cells.
        n_frequencies: Fourier feature frequencies (each gives a sin and a cos).
        sigma: standard deviation of the frequencies, rad per unit length. Default
            ``2 pi * 10 * resolution / 256`` (Tancik et al.'s scale 10 for 256 images).
        n_hidden_layers: ReLU layers.
        threshold: per-pixel squared error (mean over channels) below which a pixel's
            encoding stops advancing. 1e-3 is 30 dB PSNR.
        progress_steps: steps for ``alpha`` to go from its start to 1 where the error stays
            high; set it to a fraction of training (the image trainer uses half).
        start_fraction: initial ``alpha``: this fraction of the frequencies is on at step 0.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        resolution: int,
        n_frequencies: int = 256,
        sigma: float | None = None,
        n_hidden_layers: int = 3,
        threshold: float = 1e-3,
        progress_steps: int = 1000,
        start_fraction: float = 0.1,
    ):
        super().__init__()
        if in_features != 2:
            raise ValueError(f"SAPE here keeps a 2D mask grid; in_features must be 2, got {in_features}")
        progress_steps = check_count("progress_steps", progress_steps)
        resolution = check_count("resolution", resolution)
        self.in_features = in_features
        self.out_features = out_features
        self.resolution = resolution
        self.threshold = float(threshold)
        self.progress_steps = int(progress_steps)
        sigma = 2 * math.pi * 10.0 * resolution / 256 if sigma is None else sigma
        freqs = torch.randn(n_frequencies, in_features) * sigma
        freqs = freqs[freqs.norm(dim=1).argsort()]  # low to high: the order they are revealed in
        self.register_buffer("frequencies", freqs)
        self.register_buffer("alpha", torch.full((resolution, resolution), float(start_fraction)))
        layers: list[nn.Module] = []
        width = in_features + 2 * n_frequencies
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden_features), nn.ReLU()]
            width = hidden_features
        layers.append(nn.Linear(width, out_features))
        self.mlp = nn.Sequential(*layers)

    def progress(self, x: torch.Tensor) -> torch.Tensor:
        """``alpha`` at coordinates ``(..., 2)`` -> ``(...)``, bilinear between pixel centres."""
        lead = x.shape[:-1]
        # grid_sample with align_corners=False puts -1/+1 at the outer pixel edges, i.e.
        # our [-0.5, 0.5) pixel-centre convention scaled by 2; x is already (x, y) ordered.
        grid = (2.0 * x.reshape(1, 1, -1, 2)).to(self.alpha.dtype)
        a = torch.nn.functional.grid_sample(
            self.alpha[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return a.reshape(lead)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Weight of each frequency at each point, ``(..., n_frequencies)`` in [0, 1]."""
        n = self.frequencies.shape[0]
        j = torch.arange(n, device=x.device, dtype=x.dtype)
        return (self.progress(x).unsqueeze(-1) * n - j).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = x @ self.frequencies.T
        m = self.mask(x)
        features = torch.cat([x, m * torch.sin(phase), m * torch.cos(phase)], dim=-1)
        return self.mlp(features)

    @torch.no_grad()
    def update_progress(self, pixel_error: torch.Tensor) -> None:
        """Advance ``alpha`` where the training error is still high.

        Args:
            pixel_error: ``(resolution, resolution)`` squared error per training pixel (mean
                over channels) of the prediction of the step just taken.
        """
        if pixel_error.shape != self.alpha.shape:
            raise ValueError(f"pixel_error must be {tuple(self.alpha.shape)}, got {tuple(pixel_error.shape)}")
        high = (pixel_error > self.threshold).to(self.alpha.dtype)
        self.alpha.add_(high / self.progress_steps).clamp_(max=1.0)
