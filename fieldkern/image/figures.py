"""Figures in the style of the paper's Figs. 11 and 13 (matplotlib, imported on use).

For each of the first few images:

- ``scales_<image>.png`` (Fig. 11 left): one row per method, one column per scale, final
  outputs at the evaluation resolution, ground truth in the last column.
- ``spectra_<image>.png`` (Fig. 11 right): one row per staged method, one column per
  scale ``1..L-1`` (paper numbering): ``log(1 + |(|F_stage| - |F_final|)|)``, centred, mean
  over channels, with :func:`fieldkern.image.metrics.magnitude_spectrum`'s normalisation.
  Brighter = more of the scale's spectrum was changed by later stages.
- ``reconstructions_<image>.png`` (Fig. 13): ground truth and every method's final output.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fieldkern._files import save_figure_atomic
from fieldkern.image.metrics import magnitude_spectrum


def _display(img: np.ndarray) -> np.ndarray:
    img = np.clip(img, 0.0, 1.0)
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def spectrum_difference(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``log(1 + | |F(before)| - |F(after)| |)`` averaged over channels, DC centred, ``(H, W)``."""
    diff = (magnitude_spectrum(before) - magnitude_spectrum(after)).abs().mean(0)
    return torch.log1p(torch.fft.fftshift(diff)).numpy()


def write_figures(out_dir: Path, results, methods, images, preset) -> list[Path]:
    """Write the PNGs for every image whose results kept their arrays; returns their paths.

    ``results[i][j]`` is the :class:`fieldkern.image.FitResult` of ``methods[j]`` on
    ``images[i]`` (evaluation resolution, ``(H, W)`` or ``(H, W, C)`` in [0, 1]).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)

    written: list[Path] = []
    for image, row in zip(images, results):
        if not row or not row[0].eval_outputs:
            continue
        tag = _safe(row[0].image)
        # fit_image reads a grey (H, W) image as (H, W, 1); draw it the same way.
        grey = "gray" if image.ndim == 2 or image.shape[-1] == 1 else None
        written.append(_save(_scales_figure(image, row, methods, preset.n_scales, grey),
                             out_dir / f"scales_{tag}.png"))
        staged = [(m, r) for m, r in zip(methods, row) if m.staged]
        if staged:
            written.append(_save(_spectra_figure(staged, preset.n_scales), out_dir / f"spectra_{tag}.png"))
        written.append(_save(_reconstructions_figure(image, row, methods, grey),
                             out_dir / f"reconstructions_{tag}.png"))
    return written


def _scales_figure(image, row, methods, n_scales: int, grey):
    """Per-scale reconstructions: one row per method, ground truth in the last column."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(row), n_scales + 1, figsize=(2.2 * (n_scales + 1), 2.2 * len(row)),
                             squeeze=False)
    for i, (method, r) in enumerate(zip(methods, row)):
        outs = r.eval_outputs
        # SAPE has one output: show it under the last scale.
        cells = [None] * (n_scales - len(outs)) + outs
        for k, out in enumerate(cells):
            ax = axes[i, k]
            ax.axis("off")
            if out is not None:
                ax.imshow(_display(out), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
            if i == 0:
                ax.set_title(f"scale {k + 1}", fontsize=9)
        axes[i, 0].text(-0.05, 0.5, method.label, transform=axes[i, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=7)
        axes[i, -1].imshow(_display(image), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
        axes[i, -1].axis("off")
    axes[0, -1].set_title("ground truth", fontsize=9)
    fig.tight_layout()
    return fig


def _spectra_figure(staged, n_scales: int):
    """Spectrum differences of the staged methods (``staged``: (method, result) pairs)."""
    import matplotlib.pyplot as plt

    diffs = [[spectrum_difference(b, a) for b, a in zip(r.stage_outputs, r.final_train_outputs)]
             for _, r in staged]
    vmax = max(float(d.max()) for ds in diffs for d in ds) or 1.0
    fig, axes = plt.subplots(len(staged), n_scales - 1, figsize=(2.4 * (n_scales - 1), 2.3 * len(staged)),
                             squeeze=False)
    for i, ((method, r), ds) in enumerate(zip(staged, diffs)):
        for k, d in enumerate(ds):
            ax = axes[i, k]
            ax.imshow(d, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"MAD {r.mad[k]:.2f}", fontsize=8)
            if i == 0:
                ax.set_title(f"scale {k + 1}", fontsize=9)
        axes[i, 0].set_ylabel(method.label, fontsize=7)
    fig.suptitle("log(1 + |spectrum after stage - after training|)", fontsize=9)
    fig.tight_layout()
    return fig


def _reconstructions_figure(image, row, methods, grey):
    """Final reconstructions (generalisation to the evaluation grid), 4 panels per row."""
    import matplotlib.pyplot as plt

    panels = [("ground truth", image), *((f"{m.label}\n{r.psnr:.2f} dB", r.eval_outputs[-1])
                                         for m, r in zip(methods, row))]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 3.1 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(_display(img), cmap=grey, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return save_figure_atomic(fig, path, dpi=110)
    finally:
        plt.close(fig)
