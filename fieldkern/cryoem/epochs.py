"""What the trainer draws and checks around its epochs (:mod:`fieldkern.cryoem.reconstruct`):
the inputs' shapes, the pose steps' starting perturbations and learning rate, and the
losses read back from the device.
"""

from __future__ import annotations

import math

import torch

from fieldkern.checks import check_finite
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.cryoem.poses import initial_perturbation


def check_inputs(images, rotations, shifts: torch.Tensor | None) -> tuple[int, int]:
    """``(N, D)`` of images ``(N, D, D)``, checking rotations ``(N, 3, 3)`` and finite shifts
    ``(N, 2)`` (or None). The images' values are checked as each rank reads its block."""
    shape = tuple(images.shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"images must have shape (N, D, D), got {shape}")
    N, D = shape[0], shape[-1]
    if tuple(rotations.shape) != (N, 3, 3):
        raise ValueError(f"rotations must have shape ({N}, 3, 3), got {tuple(rotations.shape)}")
    if shifts is not None:
        if tuple(shifts.shape) != (N, 2):
            raise ValueError(f"shifts must have shape ({N}, 2) (pixels, x then y), got {tuple(shifts.shape)}")
        check_finite("shifts", shifts)
    return N, D


def start_perturbations(batches: list[torch.Tensor], seed: int, epoch: int,
                        device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each global batch's starting pose perturbation (``initial_perturbation``) from the
    batches' host indices: drawn for the whole batch from a seed of the run, the epoch and
    its first particle, so a particle starts from the same one whichever rank refines it;
    moved to ``device`` once per epoch (angles and axes), not per batch."""
    draws = [initial_perturbation(len(idx), torch.Generator(device="cpu").manual_seed(
        seed * 7919 + epoch * 104729 + int(idx[0]))) for idx in batches]
    sizes = [len(idx) for idx in batches]
    theta = torch.cat([t for t, _ in draws]).to(device).split(sizes)
    axis = torch.cat([u for _, u in draws]).to(device).split(sizes)
    return list(zip(theta, axis))


def owned_positions(batches: list[torch.Tensor], lo: int, hi: int, device) -> list[torch.Tensor]:
    """For each global batch of host indices, the positions (long, increasing) of the
    particles in ``lo .. hi - 1`` (a rank's shard), found on the host and moved to ``device``
    in one copy per epoch: a boolean mask of a device batch would cost a wait for the GPU
    per use (indexing by a mask reads its count back)."""
    positions = [torch.nonzero((idx >= lo) & (idx < hi)).flatten() for idx in batches]
    return list(torch.cat(positions).to(device).split([len(p) for p in positions]))


def pose_learning_rate(config: ReconstructionConfig, epoch: int, switches) -> float:
    """The pose steps' learning rate at ``epoch``: ``pose_lr`` decayed by ``pose_lr_decay``
    per epoch since the first epoch of stage ``pose_start_stage`` (``switches``: the epochs
    at which stages 1, 2, ... began; the decay waits for a stage not begun yet)."""
    s = config.pose_start_stage
    switches = tuple(switches or ())
    if s <= 0 or not config.stage_epochs:
        first = 0
    elif len(switches) >= min(s, config.n_scales - 1):
        first = switches[min(s, len(switches)) - 1]
    else:
        first = epoch
    return config.pose_lr * config.pose_lr_decay ** max(0, epoch - first)


def check_losses(losses: list[torch.Tensor], epoch: int, stage: int | None, first: int = 0) -> list[float]:
    """The batch losses as floats (one read of all of them), FloatingPointError naming the
    first non-finite one (``first``: the batch number of ``losses[0]``)."""
    values = torch.stack(losses).tolist()
    for b, loss in enumerate(values, first):
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} in epoch {epoch}, batch {b} (stage {stage})")
    return values


__all__ = ["check_inputs", "check_losses", "owned_positions", "pose_learning_rate", "start_perturbations"]
