"""Checkpoints of a :class:`~fieldkern.cryoem.reconstruct.Reconstruction`: written atomically,
checked in full before anything of them is loaded.

A checkpoint holds the settings, the model and optimiser, every particle's pose, the training
state and torch's random number generator state, together with what identifies the run: the
data set's signature (particle count, box, image mean and standard deviation) and a digest of
the starting poses and origins (:func:`start_fingerprint`). Only a checkpoint of the same run
is resumed; any other raises :class:`CheckpointError` and leaves the reconstruction as it was.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fieldkern._files import torch_save_atomic
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.train.optim import keep_capturable

if TYPE_CHECKING:
    from fieldkern.cryoem.reconstruct import Reconstruction

CHECKPOINT_FORMAT = "fieldkern.cryoem.Reconstruction/3"
_CHECKPOINT_KEYS = ("config", "model", "stage", "optimizer", "rotations", "state", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, from other settings or data,
    or holding non-finite values. Nothing of it has been loaded."""


@dataclass
class TrainingState:
    """What a checkpoint holds besides the model and optimiser: the epochs done and the mean
    loss of each; under FSC marching (:mod:`fieldkern.cryoem.marching`) also the epochs at
    which stages began, the decisions so far (:meth:`MarchingStep.as_dict` rows), the
    support limit in Fourier shells (None: none) and whether marching ended the run."""

    epoch: int = 0
    losses: list[float] = field(default_factory=list)
    stage_switches: list[int] = field(default_factory=list)
    marching: list[dict] = field(default_factory=list)
    support_limit: float | None = None
    finished: bool = False


def start_fingerprint(rotations: torch.Tensor, shifts: torch.Tensor | None) -> str:
    """A digest of a run's starting poses ``(N, 3, 3)`` and origins ``(N, 2)`` (or None): a
    checkpoint resumes only the run that began from them (another ``--pose-init``, seed or
    particle file would train on, and report against, starting poses it never had)."""
    h = hashlib.sha256(rotations.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    if shifts is not None:
        h.update(torch.as_tensor(shifts).detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(rec: Reconstruction, path) -> None:
    """Write ``rec``'s checkpoint to ``path`` (rank 0 writes; call it on every rank). Atomic:
    a temporary file next to ``path``, flushed, then renamed over it. OSError names the path."""
    path = Path(path)
    with rec.dist.agree(f"writing checkpoint {path}"):
        if rec.dist.is_main:
            torch_save_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": asdict(rec.config),
                    "data": dict(rec.data_signature),
                    "start": rec.start_fingerprint,
                    "world_size": rec.dist.world_size,
                    "model": rec.model.state_dict(),
                    "stage": rec.model.stage,
                    "optimizer": rec.optimizer.state_dict(),
                    "rotations": rec.rotations.cpu(),
                    "state": asdict(rec.state),
                    "rng": torch.get_rng_state(),
                },
                path,
            )
            # Temporary files of writes that were killed (torch_save_atomic's naming).
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)


def load_checkpoint(rec: Reconstruction, path) -> None:
    """Restore into ``rec`` a checkpoint written by :func:`save_checkpoint` for the same data,
    settings and starting poses (call it on every rank).

    Raises:
        CheckpointError: (a ValueError) the file is unreadable or truncated, is not a
            reconstruction checkpoint, was made with other settings or another data set,
            does not fit the model, or holds NaN/inf. Nothing is loaded then.
    """
    path = Path(path)
    with rec.dist.agree(f"loading checkpoint {path}"):
        ckpt = _read(path, rec.device)
        _check_same_run(ckpt, rec, path)
        state = _check_values(ckpt, rec, path)
        _restore(rec, ckpt, state, path)


def _read(path: Path, device) -> dict:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({_reason(e)}); it may be truncated or not a checkpoint"
        ) from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path} is not a fieldkern reconstruction checkpoint (missing {', '.join(missing)})")
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    return ckpt


def _check_same_run(ckpt: dict, rec: Reconstruction, path: Path) -> None:
    """The checkpoint's settings, particle count, data signature and starting poses are ``rec``'s."""
    ours = {k: (tuple(v) if isinstance(v, list) else v) for k, v in asdict(rec.config).items()}
    # a setting added after the checkpoint was written ran at its default then
    defaults = {f.name: f.default for f in fields(ReconstructionConfig)}
    theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in {**defaults, **dict(ckpt["config"])}.items()}
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise CheckpointError(f"checkpoint {path} was made with other settings ({', '.join(diff)})")
    rot = ckpt["rotations"]
    if not isinstance(rot, torch.Tensor) or tuple(rot.shape) != tuple(rec.rotations.shape):
        n = rot.shape[0] if isinstance(rot, torch.Tensor) and rot.dim() else "?"
        raise CheckpointError(f"checkpoint {path} holds {n} poses, the data set has {rec.n_particles}")
    data = ckpt.get("data")
    if data is not None:
        ours_d = rec.data_signature
        same = (data.get("n_particles") == ours_d["n_particles"] and data.get("box") == ours_d["box"]
                and all(abs(float(data.get(k, math.nan)) - ours_d[k]) <= 1e-6 * abs(ours_d[k]) + 1e-12
                        for k in ("mean", "std")))
        if not same:
            raise CheckpointError(
                f"checkpoint {path} was made for another data set (images: {data}; these: {ours_d})"
            )
    if ckpt.get("start") != rec.start_fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained from other starting poses or origins (another --pose-init, "
            "--seed or particle file); resume it with the settings it was started with"
        )


def _check_values(ckpt: dict, rec: Reconstruction, path: Path) -> TrainingState:
    """No NaN/inf in the model or poses, and a training state within the run's epochs."""
    bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if not torch.isfinite(ckpt["rotations"]).all():
        bad.append("poses")
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN/inf values ({', '.join(bad[:5])})")
    try:
        state = TrainingState(**ckpt["state"])
        if not 0 <= int(state.epoch) <= rec.config.epochs:
            raise ValueError(f"epoch {state.epoch} outside 0..{rec.config.epochs}")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid training state ({e})") from e
    return state


def _restore(rec: Reconstruction, ckpt: dict, state: TrainingState, path: Path) -> None:
    """Load model and optimiser; on any mismatch put everything back as it was."""
    old_stage = rec.model.stage
    old_model = {k: v.clone() for k, v in rec.model.state_dict().items()}
    old_opt = copy.deepcopy(rec.optimizer.state_dict())
    try:
        rec.model.set_stage(ckpt["stage"])
        rec.model.load_state_dict(ckpt["model"])
        rec.optimizer.load_state_dict(ckpt["optimizer"])
        keep_capturable(rec.optimizer)
        rng = ckpt["rng"]
        if not (torch.is_tensor(rng) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
            raise ValueError("the random number generator state is not torch's")
    except Exception as e:
        rec.model.set_stage(old_stage)
        rec.model.load_state_dict(old_model)
        rec.optimizer.load_state_dict(old_opt)
        raise CheckpointError(f"checkpoint {path} does not fit this model ({type(e).__name__}: {e})") from e
    rec.rotations = ckpt["rotations"].to(rec.device, torch.float64)
    rec.state = state
    torch.set_rng_state(rng)


def _reason(exc: Exception) -> str:
    """Why ``torch.load`` failed, in a line: torch's weights-only message advises loading with
    ``weights_only=False``, which would run whatever code the file holds."""
    text = str(exc)
    if "weights_only" in text or "Weights only" in text:
        return "torch's safe loader refused it: not a file of tensors and plain data"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "TrainingState",
    "load_checkpoint",
    "save_checkpoint",
    "start_fingerprint",
]
