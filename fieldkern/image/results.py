"""What an image-experiment run reports: the ``results.json`` summary, the Table 2
markdown, the settings that produced them, and the output folder they are written to."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np
import torch

from fieldkern._files import check_writable, write_atomic  # noqa: F401 - check_writable is re-exported
from fieldkern._files import prepare_output_dir as _prepare_output_dir
from fieldkern.image.fit import FitResult
from fieldkern.image.methods import Method
from fieldkern.image.presets import ImagePreset

MAD_NORMALISATION = (
    "mean over channels and all frequencies of | |FFT2(before)| - |FFT2(after)| |, "
    "torch.fft.fft2(norm='ortho') of the scale's output on the training grid with intensities "
    "scaled to 0..255 (Parseval: an RMS change of d grey levels gives MAD of order d)"
)

#: Everything a run writes to ``--out`` (globs): what ``--overwrite`` deletes first.
OUTPUTS = ("results.json", "results.md", "scales_*.png", "spectra_*.png", "reconstructions_*.png", ".*.tmp")


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std())}


def summarise(results: list[list[FitResult]], methods: list[Method], settings: dict) -> dict:
    """The ``results.json`` content: per method mean/std (population, ddof 0) over images of
    PSNR (eval and train resolution) and of MAD per scale, plus per-image values and settings."""
    summary = {"settings": settings, "methods": {}}
    for j, method in enumerate(methods):
        runs = [row[j] for row in results]
        entry = {
            "label": method.label,
            "staged": method.staged,
            "psnr": _mean_std([r.psnr for r in runs]),
            "psnr_train": _mean_std([r.psnr_train for r in runs]),
            "mad": None,
            "seconds": _mean_std([r.seconds for r in runs]),
            "per_image": [
                {"image": r.image, "psnr": r.psnr, "psnr_train": r.psnr_train, "mad": r.mad,
                 "seconds": r.seconds, "final_loss": r.losses[-1]}
                for r in runs
            ],
        }
        if method.staged:
            entry["mad"] = [_mean_std([r.mad[s] for r in runs]) for s in range(len(runs[0].mad))]
        summary["methods"][method.name] = entry
    return summary


def _fmt(ms: dict | None, digits: int = 2) -> str:
    if ms is None:
        return "-"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def results_markdown(summary: dict) -> str:
    """Table 2's layout: MAD at scales 1..L-1 (paper numbering), PSNR at scale L; then a
    second table with PSNR at the training resolution and time per run."""
    s = summary["settings"]
    n_scales = s["preset"]["n_scales"]
    head = ["Method", *[f"MAD scale {k}" for k in range(1, n_scales)], f"PSNR (dB) scale {n_scales}"]
    lines = [
        f"Dataset: {s['dataset']} ({s['n_images']} images), preset {s['preset']['name']!r}: "
        f"hidden {s['preset']['hidden']}, {s['preset']['iterations']} iterations, "
        f"train {s['preset']['train_size']}^2, evaluate {s['preset']['eval_size']}^2, device {s['device']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    for entry in summary["methods"].values():
        mads = entry["mad"] or [None] * (n_scales - 1)
        lines.append("| " + " | ".join([entry["label"], *[_fmt(m) for m in mads], _fmt(entry["psnr"])]) + " |")
    lines += [
        "",
        "| Method | PSNR (dB) at training resolution | seconds per image |",
        "|---|---|---|",
    ]
    for entry in summary["methods"].values():
        lines.append(f"| {entry['label']} | {_fmt(entry['psnr_train'])} | {_fmt(entry['seconds'], 1)} |")
    lines += ["", f"MAD: {MAD_NORMALISATION}. Mean ± std (ddof 0) over images.", ""]
    return "\n".join(lines)


def image_settings(dataset: str, names: list[str], methods: list[Method], preset: ImagePreset, device,
                   seed: int) -> dict:
    """What produced a result, for ``results.json``."""
    from fieldkern.backend import get_backend

    return {
        "dataset": dataset,
        "n_images": len(names),
        "images": names,
        "methods": [m.name for m in methods],
        "preset": preset.to_dict(),
        "seed": seed,
        "device": str(device),
        "backend": get_backend(),
        "mad_normalisation": MAD_NORMALISATION,
        "psnr": "final scale, unclipped, images in [0, 1], at eval_size (psnr) and train_size (psnr_train)",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def finite_or_raise(results: list[list[FitResult]]) -> None:
    """Refuse to report non-finite metrics (a diverged run)."""
    for row in results:
        for r in row:
            values = [r.psnr, r.psnr_train, *(r.mad or [])]
            if not all(math.isfinite(v) or v == math.inf for v in values):
                raise FloatingPointError(f"{r.method} on {r.image} produced non-finite metrics {values}")


def prepare_output_dir(out, *, overwrite: bool = False) -> Path:
    """``--out`` checked before any work: a folder holding anything is refused unless
    ``overwrite`` (what a run writes is deleted first; :func:`fieldkern._files.prepare_output_dir`)."""
    return _prepare_output_dir(out, OUTPUTS, overwrite=overwrite)


def write_results(out_dir, summary: dict, results: list[list[FitResult]], methods: list[Method],
                  images: list[np.ndarray], preset: ImagePreset) -> list[Path]:
    """Figures first, then ``results.json`` and ``results.md`` (each written atomically).

    Returns the paths written.
    """
    from fieldkern.image import figures

    out = Path(out_dir)
    written = figures.write_figures(out, results, methods, images, preset)
    json_text = json.dumps(summary, indent=2, allow_nan=True, default=_json_default)
    write_atomic(out / "results.json", json_text + "\n")
    write_atomic(out / "results.md", results_markdown(summary))
    return [*written, out / "results.json", out / "results.md"]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
