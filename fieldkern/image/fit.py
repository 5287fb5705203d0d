"""One method fitted to one image: the staged training run and its scores.

Protocol (the paper's appendix A): the image as loaded is the evaluation image
(``preset.eval_size``, 512 in the paper preset); it is Lanczos-downsampled to
``preset.train_size`` (256) for training. PSNR is computed on the final scale, unclipped,
at both resolutions. MAD (staged methods only) compares, for every scale but the last, the
magnitude spectrum of that scale's output on the *training* grid right at the end of its
stage with the one after all training (:func:`fieldkern.image.metrics.spectrum_mad`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fieldkern.coords import grid_coordinates
from fieldkern.image import metrics
from fieldkern.checks import to_numpy
from fieldkern.image._checks import check_layout, check_pixels
from fieldkern.image.methods import Method
from fieldkern.image.presets import ImagePreset
from fieldkern.train import Callback, StageSchedule, run_stages, stage_setter

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
    preset: ImagePreset,
    *,
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

    image = _evaluation_image(image, preset)
    device = torch.device(device)
    start = time.perf_counter()
    train_image = resize(image, preset.train_size)
    torch.manual_seed(seed)
    if model is None:
        model = method.build(image.shape[-1], preset)
    model = model.to(device)
    losses, snapshots = _train(method, model, train_image, preset, device, image_name=image_name,
                               progress=progress, callbacks=callbacks)
    return _score(method, model, preset, device, image=image, train_image=train_image, image_name=image_name,
                  snapshots=snapshots, losses=losses, start=start)


def _evaluation_image(image, preset: ImagePreset) -> np.ndarray:
    """``image`` as a float ``(eval_size, eval_size, C)`` numpy array, checked."""
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
    return image


def _train(method: Method, model, train_image: np.ndarray, preset: ImagePreset, device, *, image_name: str,
           progress: bool, callbacks: Sequence[Callback]) -> tuple[list[float], _StageSnapshots]:
    """Run the method's schedule on ``model``; returns the losses and the stage snapshots."""
    n = preset.train_size
    x = grid_coordinates((n, n), device=device).reshape(-1, 2)
    target = torch.from_numpy(train_image).to(device).reshape(-1, train_image.shape[-1])
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
    return losses, snapshots


def _score(method: Method, model, preset: ImagePreset, device, *, image: np.ndarray, train_image: np.ndarray,
           image_name: str, snapshots: _StageSnapshots, losses: list[float], start: float) -> FitResult:
    """Evaluate the trained ``model`` at both resolutions and compute PSNR and MAD."""
    if method.multiscale:
        model.set_stage(None)  # evaluate every scale
    model.eval()
    eval_outputs = evaluate(model, preset.eval_size, device)
    train_outputs = evaluate(model, preset.train_size, device)
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
