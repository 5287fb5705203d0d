"""The 2D multiscale image-fitting experiment (paper Table 2, Figs. 11-13).

:func:`fit_image` trains one method on one image with the staged trainer of
:mod:`fieldkern.train`; :func:`run_experiment` loops over images and methods;
:func:`summarise` and :func:`write_results` produce ``results.json``, ``results.md`` and
the figures.

Protocol (the paper's appendix A): the image as loaded is the evaluation image
(``preset.eval_size``, 512 in the paper preset); it is Lanczos-downsampled to
``preset.train_size`` (256) for training. PSNR is computed on the final scale, unclipped,
at both resolutions. MAD (staged methods only) compares, for every scale but the last, the
magnitude spectrum of that scale's output on the *training* grid right at the end of its
stage with the one after all training (:func:`fieldkern.image.metrics.spectrum_mad`).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fieldkern._files import check_writable, write_atomic  # noqa: F401 - check_writable is re-exported
from fieldkern._files import prepare_output_dir as _prepare_output_dir
from fieldkern.coords import grid_coordinates
from fieldkern.distributed import DistContext
from fieldkern.image import metrics
from fieldkern.image._checks import check_layout, check_pixels, to_numpy
from fieldkern.image.methods import Method, Preset
from fieldkern.train import Callback, StageSchedule, run_stages, stage_setter

MAD_NORMALISATION = (
    "mean over channels and all frequencies of | |FFT2(before)| - |FFT2(after)| |, "
    "torch.fft.fft2(norm='ortho') of the scale's output on the training grid with intensities "
    "scaled to 0..255 (Parseval: an RMS change of d grey levels gives MAD of order d)"
)

# Points per forward pass when evaluating: bounds memory at 512^2 x 256 hidden.
_EVAL_CHUNK = 65536


@dataclass
class FitResult:
    """One method fitted to one image.

    Attributes:
        method, image: names.
        psnr: dB at the evaluation resolution, final scale, unclipped.
        psnr_train: dB on the training image.
        mad: per scale ``0..L-2`` spectrum MAD (staged methods), else None.
        seconds: wall time of training and evaluation.
        losses: training loss per iteration.
        eval_outputs: final output of every scale at the evaluation grid, ``(H, W, C)``
            numpy arrays, coarsest first (one entry for SAPE). Kept for figures only.
        stage_outputs / final_train_outputs: per scale ``0..L-2`` on the training grid,
            right after the scale's stage and after all training (staged methods).
    """

    method: str
    image: str
    psnr: float
    psnr_train: float
    mad: list[float] | None
    seconds: float
    losses: list[float] = field(repr=False)
    eval_outputs: list[np.ndarray] = field(repr=False, default_factory=list)
    stage_outputs: list[np.ndarray] = field(repr=False, default_factory=list)
    final_train_outputs: list[np.ndarray] = field(repr=False, default_factory=list)

    def drop_arrays(self) -> None:
        """Forget the image arrays (keeps memory flat over many images)."""
        self.eval_outputs, self.stage_outputs, self.final_train_outputs = [], [], []


def _as_list(out) -> list[torch.Tensor]:
    return out if isinstance(out, list) else [out]


@torch.no_grad()
def evaluate(model, size: int, device, chunk: int = _EVAL_CHUNK) -> list[np.ndarray]:
    """All outputs the model's current stage returns, on the ``size x size`` pixel-centre grid.

    Returns a list (coarsest first) of ``(size, size, C)`` float32 numpy arrays.
    """
    x = grid_coordinates((size, size), device=device).reshape(-1, 2)
    parts = [_as_list(model(x[i:i + chunk])) for i in range(0, x.shape[0], chunk)]
    return [
        torch.cat([p[k] for p in parts]).reshape(size, size, -1).float().cpu().numpy()
        for k in range(len(parts[0]))
    ]


class _StageSnapshots(Callback):
    """Keeps the output of each scale on the training grid at the end of its stage."""

    def __init__(self, model, size: int, device):
        self.model, self.size, self.device = model, size, device
        self.outputs: dict[int, np.ndarray] = {}

    def on_stage_end(self, stage: int, step: int) -> None:
        self.outputs[stage] = evaluate(self.model, self.size, self.device)[-1]


def fit_image(
    method: Method,
    image: np.ndarray,
    preset: Preset,
    device: str | torch.device = "cpu",
    seed: int = 0,
    image_name: str = "image",
    progress: bool = True,
    model=None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train ``method`` on ``image`` under ``preset`` and score it.

    Args:
        method: one of :data:`fieldkern.image.METHODS`.
        image: evaluation image ``(eval_size, eval_size, C)`` (``C`` 1 to 4, channels
            last) or grey ``(eval_size, eval_size)``, read as ``C = 1``; numpy or torch,
            values in [0, 1] (ValueError otherwise, e.g. for an 8-bit 0..255 image). It is
            Lanczos-downsampled to ``preset.train_size`` for training.
        preset: sizes, iterations, schedule, learning rate.
        device: torch device; on CUDA the models take the Triton path automatically.
        seed: torch seed of the model's initialisation (same for all methods of an image).
        image_name: for the result and the progress bar.
        progress: tqdm bar.
        model: a model from ``method.build`` to train (in place) instead of a fresh one,
            e.g. to inspect its parameters from a callback.
        callbacks: extra :class:`fieldkern.train.Callback` objects (e.g. logging).
    """
    from fieldkern.image.datasets import resize

    image = to_numpy(image)
    check_layout("image", image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[:2] != (preset.eval_size, preset.eval_size):
        raise ValueError(f"image must be {preset.eval_size}x{preset.eval_size} for preset "
                         f"{preset.name!r}, got {image.shape[:2]}")
    # Checked before training: a 0..255 image trains without complaint and only shows up
    # as a PSNR of about -40 dB at the end.
    check_pixels("image", image)
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float32)
    device = torch.device(device)
    start = time.perf_counter()
    train_image = resize(image, preset.train_size)
    channels = image.shape[-1]
    n = preset.train_size

    torch.manual_seed(seed)
    if model is None:
        model = method.build(channels, preset)
    model = model.to(device)
    x = grid_coordinates((n, n), device=device).reshape(-1, 2)
    target = torch.from_numpy(train_image).to(device).reshape(-1, channels)
    # One Adam over everything: parameters frozen by set_stage have grad None and are skipped.
    optimiser = torch.optim.Adam(model.parameters(), lr=preset.lr)
    schedule = (StageSchedule.from_fractions(preset.iterations, preset.stage_fractions)
                if method.staged else StageSchedule.vanilla())
    snapshots = _StageSnapshots(model, n, device)

    def step(it: int, stage: int | None) -> float:
        outputs = _as_list(model(x))
        if method.multiscale:
            loss = model.stage_loss(outputs, target)
        else:
            loss = torch.nn.functional.mse_loss(outputs[-1], target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if method.kind == "sape":
            model.update_progress(((outputs[-1].detach() - target) ** 2).mean(-1).reshape(n, n))
        return loss.item()

    losses = run_stages(
        step, preset.iterations, schedule, stage_setter(model, **method.stage_kwargs),
        callbacks=[*([snapshots] if method.staged else []), *callbacks], progress=progress,
        desc=f"{method.name} {image_name}",
    )
    if method.multiscale:
        model.set_stage(None)  # evaluate every scale
    model.eval()
    eval_outputs = evaluate(model, preset.eval_size, device)
    train_outputs = evaluate(model, n, device)
    # The metrics refuse non-finite input; name the run that diverged, not a metric argument.
    if not all(np.isfinite(a).all() for a in [*eval_outputs, *train_outputs, *snapshots.outputs.values()]):
        raise FloatingPointError(f"{method.name} on {image_name}: the trained model's outputs are not finite")
    mad = stage_outputs = final_train = None
    if method.staged:
        stages = range(preset.n_scales - 1)
        stage_outputs = [snapshots.outputs[s] for s in stages]
        final_train = [train_outputs[s] for s in stages]
        mad = [metrics.spectrum_mad(stage_outputs[s], final_train[s]) for s in stages]
    return FitResult(
        method=method.name,
        image=image_name,
        psnr=metrics.psnr(eval_outputs[-1], image),
        psnr_train=metrics.psnr(train_outputs[-1], train_image),
        mad=mad,
        seconds=time.perf_counter() - start,
        losses=losses,
        eval_outputs=eval_outputs,
        stage_outputs=stage_outputs or [],
        final_train_outputs=final_train or [],
    )


def run_experiment(
    images: list[np.ndarray],
    names: list[str],
    methods: list[Method],
    preset: Preset,
    device="cpu",
    seed: int = 0,
    progress: bool = True,
    keep_arrays: int = 2,
    dist: DistContext | None = None,
) -> list[list[FitResult]] | None:
    """Every method on every image; ``results[i][j]`` is image ``i``, method ``j``.

    Image ``i`` initialises every method's model with torch seed ``seed + i``. Arrays for
    figures are kept for the first ``keep_arrays`` images only.

    With a data-parallel ``dist`` (:func:`fieldkern.distributed.init_from_env` under
    ``torchrun``), rank ``r`` fits the block ``dist.shard(len(images))`` of images on its
    own device, and the results are gathered on rank 0, which returns the whole table;
    the other ranks return None. Each image is fitted exactly as a single process would.
    """
    from tqdm.auto import tqdm

    ctx = dist if dist is not None else DistContext.single(device)
    lo, hi = ctx.shard(len(images))
    results = []
    with ctx.agree("fitting the images"):
        with tqdm(total=(hi - lo) * len(methods), desc="runs" if not ctx.distributed else f"runs (rank {ctx.rank})",
                  disable=not progress, dynamic_ncols=True) as bar:
            for i in range(lo, hi):
                row = []
                for method in methods:
                    r = fit_image(method, images[i], preset, device, seed + i, names[i], progress)
                    if i >= keep_arrays:
                        r.drop_arrays()
                    row.append(r)
                    bar.set_postfix(method=method.name, psnr=f"{r.psnr:.2f}")
                    bar.update()
                results.append(row)
    if not ctx.distributed:
        return results
    gathered = ctx.gather_object(results)
    return None if gathered is None else [row for rows in gathered for row in rows]


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


def settings_dict(dataset: str, names: list[str], methods: list[Method], preset: Preset, device, seed: int) -> dict:
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


#: Everything a run writes to ``--out`` (globs): what ``--overwrite`` deletes first.
OUTPUTS = ("results.json", "results.md", "scales_*.png", "spectra_*.png", "reconstructions_*.png", ".*.tmp")


def prepare_output_dir(out, *, overwrite: bool = False) -> Path:
    """``--out`` checked before any work: a folder holding anything is refused unless
    ``overwrite`` (what a run writes is deleted first; :func:`fieldkern._files.prepare_output_dir`)."""
    return _prepare_output_dir(out, OUTPUTS, overwrite=overwrite)


def write_results(out_dir, summary: dict, results: list[list[FitResult]], methods: list[Method],
                  images: list[np.ndarray], preset: Preset) -> list[Path]:
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


def finite_or_raise(results: list[list[FitResult]]) -> None:
    """Refuse to report non-finite metrics (a diverged run)."""
    for row in results:
        for r in row:
            values = [r.psnr, r.psnr_train, *(r.mad or [])]
            if not all(math.isfinite(v) or v == math.inf for v in values):
                raise FloatingPointError(f"{r.method} on {r.image} produced non-finite metrics {values}")
