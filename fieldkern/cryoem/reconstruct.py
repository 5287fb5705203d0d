"""Cryo-EM reconstruction with a staged 3D residual MFN and per-image pose refinement.

One training step on a batch of particles (REFERENCE.md section 4, the paper's appendix D):

1. *Volume steps*: evaluate the field on the ``D^3`` voxel grid at the active scale, project
   it under the current pose estimates, apply each particle's CTF, and take an Adam step
   on the MSE against the particle images low-passed to the scale's band.
2. *Pose steps*: with the volume fixed, optimise a per-image axis-angle perturbation
   ``(theta, u)`` of the current estimate, ``R <- rodrigues(theta, u) R``, with its own Adam,
   bringing ``theta`` back into ``[0, pi]`` and ``u`` to unit length after every update. After
   the batch's pose steps the perturbation is folded into the estimate and dropped with its
   optimiser state, as the authors do: momentum never moves images outside the batch.

Decisions, and why:

* The paper clamps ``theta`` to ``[0, pi]``. Clamping a negative ``theta`` to 0 makes the axis
  gradient vanish and can trap a pose at the identity perturbation, so we map
  ``theta < 0`` to ``(-theta, -u)`` (and ``theta > pi`` to ``(2 pi - theta, -u)``) instead:
  the same constraint set (``theta`` in ``[0, pi]``, ``|u| = 1``) and the same rotation, so it is
  the paper's rule without its trap (:func:`fieldkern.cryoem.canonicalize_axis_angle`).
* Pose steps start at stage ``pose_start_stage`` (default 1): at the coarsest band the
  low-passed loss barely depends on small rotations, and Adam, which moves each parameter
  by about ``lr`` per step whatever the gradient's size, then random-walks the poses.
* The field's output is divided by ``D``, so that a projection (a sum of D voxels) is of the
  order of one field value; particle images are divided by their global standard deviation.
  Both are fixed gains that keep Adam's default scales meaningful; FSC ignores them.
* Losses are computed in Fourier space on the image grid: ``mean |CTF * P(R) - G * F[I]|^2 /
  D^2``, equal to the real-space MSE by Parseval, with ``P(R)`` the projection's centred
  spectrum, ``F[I]`` the particle's and ``G`` the stage's Gaussian low-pass. The CTF is applied
  unpadded (a product on the ``D x D`` grid, as cryoDRGN does); the simulator applies it on a
  2x padded grid, which differs only by the part of the point-spread function that falls
  outside the box.
* ``projector="fourier"`` (default) takes ``P(R)`` as central slices of the volume's 2x
  oversampled 3D spectrum (:func:`fieldkern.cryoem.fourier_slice.central_slices`): one 3D FFT
  per step, then ``D^2`` taps per image, and one spectrum serves every pose step of a batch.
  ``"real"`` uses the FFT of :func:`fieldkern.cryoem.project_volume`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fieldkern.cryoem.fourier import fft2_centered
from fieldkern.cryoem.fourier_slice import central_slices, volume_spectrum
from fieldkern.cryoem.projection import field_coordinates, project_volume
from fieldkern.cryoem.rotations import (
    canonicalize_axis_angle,
    matrix_to_quaternion,
    perturb_rotations,
    quaternion_to_matrix,
)
from fieldkern.nn import ResidualMFN
from fieldkern.train import Callback, StageSchedule, run_stages

PROJECTORS = ("fourier", "real")


@dataclass
class ReconstructionConfig:
    """Settings of :class:`Reconstruction`; defaults are the authors' (REFERENCE.md section 4).

    Attributes:
        hidden_features, n_scales, lambda1, lambda2: the 3D residual MFN (ReLU heads, new init).
        epochs: passes over the particles; stage_epochs: epochs at which scales 1, 2, ... start.
        batch_size: particles per batch.
        volume_steps, pose_steps: Adam steps per batch on the field and on the poses.
        volume_lr: field Adam learning rate; pose_lr, pose_betas: pose Adam.
        refine_poses: False keeps the poses fixed (known-pose reconstruction).
        pose_start_stage: first stage with pose steps.
        pose_lr_decay: the pose learning rate is multiplied by this every epoch after the
            first epoch with pose steps.
        projector: "fourier" (central slices) or "real" (rotated-grid ray sums).
        seed: seeds the model initialisation and the batch order.
    """

    hidden_features: int = 128
    n_scales: int = 3
    lambda1: float = 0.3
    lambda2: float = 2.0
    epochs: int = 100
    stage_epochs: tuple[int, ...] = (25, 50)
    batch_size: int = 600
    volume_steps: int = 5
    pose_steps: int = 20
    volume_lr: float = 1e-3
    pose_lr: float = 1e-2
    pose_betas: tuple[float, float] = (0.9, 0.9)
    pose_lr_decay: float = 1.0
    refine_poses: bool = True
    pose_start_stage: int = 1
    projector: str = "fourier"
    seed: int = 0

    def __post_init__(self):
        self.stage_epochs = tuple(int(e) for e in self.stage_epochs)
        self.pose_betas = tuple(float(b) for b in self.pose_betas)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if len(self.stage_epochs) != self.n_scales - 1:
            raise ValueError(
                f"stage_epochs must hold n_scales - 1 = {self.n_scales - 1} epochs, got {self.stage_epochs}"
            )
        for name in ("epochs", "batch_size", "volume_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pose_steps < 0:
            raise ValueError(f"pose_steps must be >= 0, got {self.pose_steps}")


def lowpass_sigma(stage: int, n_scales: int, D: int, lambda1: float, lambda2: float) -> float:
    """Width (Fourier pixels) of the Gaussian low-pass applied to the data at ``stage``:
    ``sigma = band * D / 3`` with ``band = 1 / c^(L-1-stage)`` the scale's fraction of Nyquist."""
    c = 1 + lambda1 + lambda2
    return D / 3 / c ** (n_scales - 1 - stage)


def gaussian_filter(D: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``exp(-|k|^2 / (2 sigma^2))`` on the centred ``D x D`` frequency grid, ``|k|`` in Fourier pixels."""
    k = torch.arange(D, device=device, dtype=dtype) - D // 2
    return torch.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * sigma**2))


def orthonormalize(R: torch.Tensor) -> torch.Tensor:
    """Nearest rotation, via a quaternion round trip: keeps folded-in updates on SO(3)."""
    q = matrix_to_quaternion(R)
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


def refine_poses(image_losses, rotations: torch.Tensor, steps: int, lr: float,
                 betas=(0.9, 0.9), generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's pose steps for one batch; returns the refined rotations ``(B, 3, 3)``.

    Optimises a perturbation ``(theta, u)`` per image of ``R <- rodrigues(theta, u) R`` with
    Adam on ``sum_b image_losses(R)_b`` (each image's term depends on its own pose only),
    keeping ``theta`` in ``[0, pi]`` and ``|u| = 1`` after every update by
    the rotation-preserving canonicalisation (module docstring). The perturbation starts at
    the authors' near-zero ``theta ~ U(0, 1e-6)``, ``u ~ N(0, 1e-6)``.

    Args:
        image_losses: ``(B, 3, 3) -> (B,)`` each image's loss against the fixed volume.
        rotations: ``(B, 3, 3)`` current estimates (float64 keeps repeated updates on SO(3)).
    """
    B = rotations.shape[0]
    dev = rotations.device
    theta = (1e-6 * torch.rand(B, generator=generator, dtype=torch.float64)).to(dev).requires_grad_()
    axis = (1e-6 * torch.randn(B, 3, generator=generator, dtype=torch.float64)).to(dev).requires_grad_()
    opt = torch.optim.Adam([theta, axis], lr=lr, betas=tuple(betas))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        image_losses(perturb_rotations(rotations, theta, axis)).sum().backward()
        opt.step()
        with torch.no_grad():
            t, u = canonicalize_axis_angle(theta, axis)
            theta.copy_(t)
            axis.copy_(u)
    with torch.no_grad():
        return orthonormalize(perturb_rotations(rotations, theta, axis))


@dataclass
class TrainingState:
    """What a checkpoint holds besides the model and optimiser."""

    epoch: int = 0
    losses: list[float] = field(default_factory=list)


class Reconstruction:
    """Staged residual-MFN reconstruction of one particle data set.

    Args:
        images: ``(N, D, D)`` particle images (any scale; normalised internally).
        ctfs: ``(N, D, D)`` centred CTFs, or a callable ``indices -> (n, D, D)`` computing
            them per batch.
        rotations: ``(N, 3, 3)`` initial pose estimates (``I ~ ctf * project(V, R)``).
        config: :class:`ReconstructionConfig`.
        device: where to train.
    """

    def __init__(self, images, ctfs, rotations, config: ReconstructionConfig, device="cpu"):
        if images.dim() != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"images must have shape (N, D, D), got {tuple(images.shape)}")
        N, D = images.shape[0], images.shape[-1]
        if rotations.shape != (N, 3, 3):
            raise ValueError(f"rotations must have shape ({N}, 3, 3), got {tuple(rotations.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf values")
        self.config = config
        self.device = torch.device(device)
        self.D = D
        scale = images.float().std()
        if not scale > 0:
            raise ValueError("images are constant: nothing to reconstruct")
        # Particle spectra, once: every loss is computed in Fourier space.
        self.spectra = fft2_centered((images.float() / scale).to(self.device))
        self._ctfs = ctfs
        self.rotations = rotations.to(self.device, torch.float64).clone()
        torch.manual_seed(config.seed)
        self.model = ResidualMFN(
            3, config.hidden_features, 1, config.n_scales, D, lambda1=config.lambda1,
            lambda2=config.lambda2, init="residual", head_activation="relu",
        ).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.volume_lr)
        self.coords = field_coordinates(D, device=self.device)
        self.schedule = StageSchedule(config.stage_epochs or None) if config.n_scales > 1 else StageSchedule(None)
        self.state = TrainingState()

    # -- forward model --------------------------------------------------------------------

    def volume(self, all_scales: bool = False):
        """The field on the voxel grid, ``(D, D, D)`` at the active scale (or all scales)."""
        ys = self.model(self.coords)
        vols = [y[..., 0] / self.D for y in ys]
        return vols if all_scales else vols[-1]

    def ctf(self, idx: torch.Tensor) -> torch.Tensor:
        c = self._ctfs(idx) if callable(self._ctfs) else self._ctfs[idx]
        if c.shape[-2:] != (self.D, self.D):
            raise ValueError(f"CTFs must be ({self.D}, {self.D}) per image, got {tuple(c.shape[-2:])}")
        return c.to(self.device, torch.float32)

    def _prepare(self, volume):
        """What the projector needs of a volume: its spectrum, or the volume itself."""
        return volume_spectrum(volume) if self.config.projector == "fourier" else volume

    def _predict(self, prepared, rotations, ctf):
        """CTF-modulated projection spectra ``(B, D, D)``."""
        if self.config.projector == "fourier":
            spectra = central_slices(prepared, rotations.float(), self.D)
        else:
            spectra = fft2_centered(project_volume(prepared, rotations.float()))
        return ctf * spectra

    def lowpass(self, stage: int | None) -> torch.Tensor:
        """The data's Gaussian low-pass at ``stage`` (None: the finest)."""
        s = self.config.n_scales - 1 if stage is None else stage
        sigma = lowpass_sigma(s, self.config.n_scales, self.D, self.config.lambda1, self.config.lambda2)
        return gaussian_filter(self.D, sigma, self.device)

    def _per_image_loss(self, pred, target):
        """Per-image real-space MSE, by Parseval: ``mean |dF|^2 / D^2``."""
        return (pred - target).abs().square().mean((-2, -1)) / self.D**2

    # -- one epoch --------------------------------------------------------------------------

    def _volume_steps(self, idx, target, ctf) -> float:
        R = self.rotations[idx]
        loss = torch.zeros(())
        for _ in range(self.config.volume_steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._per_image_loss(self._predict(self._prepare(self.volume()), R, ctf), target).mean()
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    def _pose_steps(self, idx, target, ctf, lr: float) -> None:
        cfg = self.config
        with torch.no_grad():
            fixed = self._prepare(self.volume())
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + self.state.epoch * 104729 + int(idx[0]))
        self.rotations[idx] = refine_poses(
            lambda R: self._per_image_loss(self._predict(fixed, R, ctf), target), self.rotations[idx],
            cfg.pose_steps, lr, cfg.pose_betas, gen,
        )

    def _first_pose_epoch(self) -> int:
        s = self.config.pose_start_stage
        switches = self.schedule.switches or ()
        return 0 if s <= 0 or not switches else switches[min(s, len(switches)) - 1]

    def train_epoch(self, epoch: int, stage: int | None) -> float:
        cfg = self.config
        N = self.spectra.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(N, generator=gen).to(self.device)
        lowpass = self.lowpass(stage)
        pose_on = (cfg.refine_poses and cfg.pose_steps > 0
                   and (stage is None or stage >= cfg.pose_start_stage))
        pose_lr = cfg.pose_lr * cfg.pose_lr_decay ** max(0, epoch - self._first_pose_epoch())
        losses = []
        for idx in order.split(cfg.batch_size):
            target, ctf = self.spectra[idx] * lowpass, self.ctf(idx)
            losses.append(self._volume_steps(idx, target, ctf))
            if pose_on:
                self._pose_steps(idx, target, ctf, pose_lr)
        self.state.epoch = epoch + 1
        return sum(losses) / len(losses)

    def fit(self, checkpoint: str | os.PathLike | None = None, progress: bool = True, callbacks=()) -> list[float]:
        """Train from ``self.state.epoch`` to ``config.epochs``, saving ``checkpoint`` after
        every epoch (atomically: temporary file, then rename)."""

        reconstruction = self

        class _Saver(Callback):
            def on_step_end(self, step, stage, loss):
                reconstruction.state.losses.append(loss)
                if checkpoint is not None:
                    reconstruction.save(checkpoint)

        start = self.state.epoch
        if start >= self.config.epochs:
            return []
        return run_stages(
            self.train_epoch, self.config.epochs, self.schedule, self.model.set_stage,
            callbacks=[_Saver(), *callbacks], progress=progress, desc="epochs",
            postfix_every=1, start_step=start,
        )

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "config": asdict(self.config),
                "model": self.model.state_dict(),
                "stage": self.model.stage,
                "optimizer": self.optimizer.state_dict(),
                "rotations": self.rotations.cpu(),
                "state": asdict(self.state),
                "rng": torch.get_rng_state(),
            },
            tmp,
        )
        os.replace(tmp, path)

    def load(self, path) -> None:
        """Restore a checkpoint written by :meth:`save` for the same data and settings."""
        path = Path(path)
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            raise ValueError(f"checkpoint {str(path)!r} could not be read ({e})") from e
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise ValueError(f"{path} is not a fieldkern reconstruction checkpoint")
        ours = asdict(self.config)
        theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ckpt["config"].items()}
        ours = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ours.items()}
        if ours != theirs:
            diff = sorted(k for k in ours if ours.get(k) != theirs.get(k))
            raise ValueError(f"checkpoint {path} was made with other settings ({', '.join(diff)})")
        if ckpt["rotations"].shape != self.rotations.shape:
            raise ValueError(
                f"checkpoint {path} holds {ckpt['rotations'].shape[0]} poses, the data set has {self.rotations.shape[0]}"
            )
        self.model.set_stage(ckpt["stage"])
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rotations = ckpt["rotations"].to(self.device, torch.float64)
        self.state = TrainingState(**ckpt["state"])
        torch.set_rng_state(ckpt["rng"])

    # -- results ----------------------------------------------------------------------------

    @torch.no_grad()
    def volumes(self) -> list[torch.Tensor]:
        """Maps of every scale ``(D, D, D)``, coarsest first (in the field's units / D)."""
        stage = self.model.stage
        self.model.set_stage(None)
        try:
            return [v.detach().cpu() for v in self.volume(all_scales=True)]
        finally:
            self.model.set_stage(stage)


def pose_errors_deg(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between estimated and true rotations, degrees, ``(N,)``."""
    from fieldkern.cryoem.rotations import angular_distance_deg

    return angular_distance_deg(estimate.to(torch.float64), truth.to(torch.float64))


def summarize_errors(errors: torch.Tensor) -> dict[str, float]:
    return {"mean": float(errors.mean()), "median": float(errors.median())}


__all__ = [
    "PROJECTORS",
    "Reconstruction",
    "ReconstructionConfig",
    "gaussian_filter",
    "lowpass_sigma",
    "orthonormalize",
    "pose_errors_deg",
    "refine_poses",
    "summarize_errors",
]
