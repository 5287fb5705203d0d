"""Figures of the cryo-EM experiment (matplotlib, imported on use)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fieldkern._files import save_figure_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fsc(path: Path, curves: list[list[float]], resolutions: list[float], apix: float, D: int,
             threshold: float = 0.5, against: str = "ground truth") -> None:
    """FSC per scale (against the ground truth, or between half maps), the threshold line,
    and each scale's resolution at it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    freq = [r / (D * apix) for r in range(len(curves[0]))]
    for k, (c, res) in enumerate(zip(curves, resolutions)):
        label = f"scale {k}: " + ("n/a" if not math.isfinite(res) else f"{res:.2f} A")
        ax.plot(freq, c, marker=".", label=label)
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel(f"FSC vs {against} (threshold {threshold:g})")
    ax.set_ylim(-0.1, 1.02)
    ax.set_title(f"FSC (Nyquist {2 * apix:.2f} A)")
    ax.legend()
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_slices(path: Path, maps: list[torch.Tensor], ground_truth: torch.Tensor | None) -> None:
    """Central slices (xy, xz, yz) and the projection along z of each map, one row per map."""
    plt = _pyplot()
    rows = ([("ground truth", ground_truth)] if ground_truth is not None else []) + [
        (f"scale {k}", m) for k, m in enumerate(maps)
    ]
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), dpi=100, squeeze=False)
    for r, (name, vol) in enumerate(rows):
        v = vol.detach().float().cpu()
        c = v.shape[0] // 2
        panels = [("z slice", v[c]), ("y slice", v[:, c]), ("x slice", v[:, :, c]), ("projection", v.sum(0))]
        for a, (title, img) in enumerate(panels):
            ax = axes[r, a]
            ax.imshow(img.numpy(), cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
            if a == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
