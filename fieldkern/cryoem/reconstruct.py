"""Cryo-EM reconstruction with a staged 3D residual MFN and per-image pose refinement.

One training step on a batch of particles (the paper's appendices B and D):

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
  oversampled 3D spectrum: one 3D FFT per step, then 8 trilinear taps per sample, computed
  once per batch and applied as a sparse product (its adjoint is the spectrum's gradient), on
  half of each plane since the volume's and the images' spectra are Hermitian. One spectrum
  serves every pose step of a batch, which differentiate the slices through the spectrum's
  gradient (a smooth gradient, where trilinear interpolation's own is piecewise constant).
  ``"grid_sample"`` takes the same slices by 3D ``grid_sample`` and ``"real"`` the FFT of
  :func:`fieldkern.cryoem.project_volume` (:mod:`fieldkern.cryoem.forward_model`).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fieldkern._files import torch_save_atomic
from fieldkern.cryoem._checks import check_finite
from fieldkern.cryoem.fourier import fft2_centered, frequency_indices
from fieldkern.cryoem.forward_model import FORWARD_MODELS, forward_model
from fieldkern.cryoem.fourier_slice import central_slices, volume_spectrum
from fieldkern.cryoem.projection import field_coordinates
from fieldkern.cryoem.rotations import (
    canonicalize_axis_angle,
    matrix_to_quaternion,
    perturb_rotations,
    quaternion_to_matrix,
)
from fieldkern.distributed import DistContext
from fieldkern.nn import ResidualMFN
from fieldkern.train import Callback, StageSchedule, run_stages

PROJECTORS = tuple(FORWARD_MODELS)
SUPPORTS = ("box", "sphere")


@dataclass
class ReconstructionConfig:
    """Settings of :class:`Reconstruction`; defaults are the authors' (the paper's appendix B).

    Attributes:
        hidden_features, n_scales, lambda1, lambda2: the 3D residual MFN (ReLU heads, new init).
        epochs: passes over the particles; stage_epochs: epochs at which scales 1, 2, ... start.
        batch_size: particles per batch.
        volume_steps, pose_steps: Adam steps per batch on the field and on the poses.
        volume_lr: field Adam learning rate; pose_lr, pose_betas: pose Adam.
        refine_poses: False keeps the poses fixed (known-pose reconstruction).
        pose_start_stage: first stage with pose steps.
        pose_search: rotations in a global search grid (super-Fibonacci; 0: no search). From
            the second stage on, every epoch starts by moving each pose to the grid rotation
            whose slice fits the particle best at the stage's band, where that beats its
            estimate (:func:`search_poses`): for starting poses far off (``coarse``), which
            local pose steps cannot bring back. Not in the paper. 4608 rotations: ~10 degree
            spacing.
        pose_lr_decay: the pose learning rate is multiplied by this every epoch after the
            first epoch with pose steps.
        support: "box" (the field fills the box) or "sphere" (it is evaluated, and the map
            non-zero, only within the sphere inscribed in the box: a compact support, as the
            spherical masks of cryo-EM packages; about half the voxels to evaluate). Not in the paper.
        projector: the forward model (:mod:`fieldkern.cryoem.forward_model`): "fourier"
            (central slices from precomputed taps), "grid_sample" (the same slices by 3D
            ``grid_sample``: the reference) or "real" (rotated-grid ray sums).
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
    pose_search: int = 0
    support: str = "box"
    projector: str = "fourier"
    seed: int = 0

    def __post_init__(self):
        self.stage_epochs = tuple(int(e) for e in self.stage_epochs)
        self.pose_betas = tuple(float(b) for b in self.pose_betas)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {self.support!r}")
        if len(self.stage_epochs) != self.n_scales - 1:
            raise ValueError(
                f"stage_epochs must hold n_scales - 1 = {self.n_scales - 1} epochs, got {self.stage_epochs}"
            )
        for name in ("epochs", "batch_size", "volume_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pose_steps < 0:
            raise ValueError(f"pose_steps must be >= 0, got {self.pose_steps}")
        if int(self.pose_search) < 0:
            raise ValueError(f"pose_search must be >= 0 (grid rotations; 0: off), got {self.pose_search}")


def lowpass_sigma(stage: int, n_scales: int, D: int, lambda1: float, lambda2: float) -> float:
    """Width (Fourier pixels) of the Gaussian low-pass applied to the data at ``stage``:
    ``sigma = band * D / 3`` with ``band = 1 / c^(L-1-stage)`` the scale's fraction of Nyquist."""
    c = 1 + lambda1 + lambda2
    return D / 3 / c ** (n_scales - 1 - stage)


def gaussian_filter(D: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``exp(-|k|^2 / (2 sigma^2))`` on the centred ``D x D`` frequency grid, ``|k|`` in Fourier pixels."""
    k = torch.arange(D, device=device, dtype=dtype) - D // 2
    return torch.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * sigma**2))


def shift_phases(shifts: torch.Tensor, D: int) -> torch.Tensor:
    """``(n, D, D)`` complex64 factors that move images by ``shifts`` ``(n, 2)`` pixels ``(x, y)``
    when multiplied into their centred spectra: ``fft2_centered(fourier_shift(img, t, 2))``
    equals ``shift_phases(t[None], D)[0] * fft2_centered(img)``."""
    k = frequency_indices(D, dtype=torch.float64)
    t = torch.as_tensor(shifts, dtype=torch.float64).reshape(-1, 2, 1, 1)
    phase = (k[None, None, :] * t[:, 0] + k[None, :, None] * t[:, 1]) / D
    return torch.polar(torch.ones_like(phase), -2 * math.pi * phase).to(torch.complex64)


@torch.no_grad()
def search_poses(spectrum: torch.Tensor, rotations: torch.Tensor, targets: torch.Tensor, ctfs: torch.Tensor,
                 grid: torch.Tensor, frequencies: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global pose search over ``grid`` ``(G, 3, 3)``: per image, the grid rotation whose
    central slice of ``spectrum`` (:func:`volume_spectrum`), times the image's CTF, is
    closest to its target spectrum, where that beats the current estimate.

    ``rotations (n, 3, 3)``, ``targets`` (complex) and ``ctfs`` ``(n, D, D)``; ``frequencies``:
    a ``(D, D)`` boolean mask of the frequencies compared (default all). The squared
    distances of every image to every grid slice come from two matrix products over the
    masked frequencies (``|C S - T|^2 = C^2 |S|^2 - 2 Re(conj(T) C S) + |T|^2``), so a search
    over thousands of rotations costs about as much as a few pose steps. Returns the new
    rotations (``rotations``' dtype) and a boolean ``(n,)`` of the images that moved.
    """
    D = targets.shape[-1]
    mask = torch.ones(D, D, dtype=torch.bool, device=targets.device) if frequencies is None else frequencies
    slices = central_slices(spectrum, grid.to(spectrum.real.dtype), D)[:, mask]          # (G, K)
    T, C = targets[:, mask], ctfs[:, mask].to(slices.real.dtype)
    fit = C.square() @ slices.abs().square().T - 2 * ((T.conj() * C).to(slices.dtype) @ slices.T).real
    best_fit, best = fit.min(dim=1)
    current = central_slices(spectrum, rotations.to(spectrum.real.dtype), D)[:, mask]
    current_fit = (C.square() * current.abs().square()).sum(1) - 2 * (T.conj() * C * current).sum(1).real
    moved = best_fit < current_fit
    out = rotations.clone()
    out[moved] = grid[best[moved]].to(out)
    return out, moved


def orthonormalize(R: torch.Tensor) -> torch.Tensor:
    """Nearest rotation, via a quaternion round trip: keeps folded-in updates on SO(3)."""
    q = matrix_to_quaternion(R)
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


def refine_poses(image_losses, rotations: torch.Tensor, steps: int, lr: float,
                 betas=(0.9, 0.9), generator: torch.Generator | None = None,
                 initial: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The paper's pose steps for one batch; returns the refined rotations ``(B, 3, 3)``.

    Optimises a perturbation ``(theta, u)`` per image of ``R <- rodrigues(theta, u) R`` with
    Adam on ``sum_b image_losses(R)_b`` (each image's term depends on its own pose only),
    keeping ``theta`` in ``[0, pi]`` and ``|u| = 1`` after every update by
    the rotation-preserving canonicalisation (module docstring). The perturbation starts at
    the authors' near-zero ``theta ~ U(0, 1e-6)``, ``u ~ N(0, 1e-6)``.

    Args:
        image_losses: ``(B, 3, 3) -> (B,)`` each image's loss against the fixed volume.
        rotations: ``(B, 3, 3)`` current estimates (float64 keeps repeated updates on SO(3)).
        generator: draws the starting perturbation (``theta`` first, then ``u``).
        initial: the starting ``(theta (B,), u (B, 3))`` instead (a data-parallel rank passes
            its images' rows of the draws for the whole batch).
    """
    B = rotations.shape[0]
    dev = rotations.device
    if initial is None:
        initial = initial_perturbation(B, generator)
    theta = initial[0].to(dev, torch.float64).clone().requires_grad_()
    axis = initial[1].to(dev, torch.float64).clone().requires_grad_()
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


def initial_perturbation(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' starting pose perturbation ``theta ~ U(0, 1e-6)``, ``u ~ N(0, 1e-6)``, float64."""
    theta = 1e-6 * torch.rand(n, generator=generator, dtype=torch.float64)
    axis = 1e-6 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return theta, axis


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, from other settings or data,
    or holding non-finite values. Nothing of it has been loaded."""


_UNSET = object()
CHECKPOINT_FORMAT = "fieldkern.cryoem.Reconstruction/3"
_CHECKPOINT_KEYS = ("config", "model", "stage", "optimizer", "rotations", "state", "rng")


@dataclass
class TrainingState:
    """What a checkpoint holds besides the model and optimiser."""

    epoch: int = 0
    losses: list[float] = field(default_factory=list)


class Reconstruction:
    """Staged residual-MFN reconstruction of one particle data set.

    Args:
        images: ``(N, D, D)`` particle images (any scale; normalised internally): a tensor, or
            anything that slices into one, such as a lazy :class:`fieldkern.cryoem.ImageStack`
            (each rank of a data-parallel run then reads only its own block).
        ctfs: ``(N, D, D)`` centred CTFs, or a callable ``indices -> (n, D, D)`` computing
            them per batch.
        rotations: ``(N, 3, 3)`` initial pose estimates (``I ~ ctf * project(V, R)``).
        config: :class:`ReconstructionConfig`.
        device: where to train.
        dist: a :class:`fieldkern.distributed.DistContext` for data-parallel training (from
            :func:`fieldkern.distributed.init_from_env` under ``torchrun``); None: one process.
        shifts: ``(N, 2)`` translations ``(x, y)`` in pixels that centre each image (RELION's
            ``rlnOriginX/YAngst / apix``): image ``i`` is moved by ``shifts[i]`` (a phase ramp
            on its spectrum, so sub-pixel shifts are exact) before anything is fitted to it.
            None: the images are centred already (simulated data).

    Data parallelism (``dist.world_size = W > 1``): rank ``r`` owns the contiguous block
    ``dist.shard(N)`` of particles: their images, spectra and pose updates. Every epoch
    draws the same global batch order as a single process; each rank takes the particles it
    owns out of each global batch, so the batches (and the alternation of volume and pose
    steps) are the single-process ones. The field is wrapped in
    ``DistributedDataParallel`` and its evaluation on the voxel grid is split too: each rank
    evaluates a block of z-planes and the blocks are all-gathered (differentiably) into the
    volume every rank projects. Each rank's loss is ``W / B`` times the sum of its images'
    losses for a global batch of ``B``; the gather's backward sums the volume gradients of
    all ranks, and DDP averages the parameter gradients over ranks, which together give the
    single-process batch mean's gradient whatever the shard sizes. Pose steps need no
    communication beyond that gather (each image's pose depends on its own loss, and the
    fixed volume is the same on every rank).
    After every epoch the owned poses are summed into ``rotations`` on every rank, so
    ``rotations``, checkpoints and results always hold all particles. Only rank 0 writes.
    Every method that communicates (the constructor, :meth:`train_epoch`, :meth:`fit`,
    :meth:`save`, :meth:`load`) must be called on every rank.
    """

    def __init__(self, images, ctfs, rotations, config: ReconstructionConfig, device="cpu",
                 dist: DistContext | None = None, shifts: torch.Tensor | None = None):
        shape = tuple(images.shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"images must have shape (N, D, D), got {shape}")
        N, D = shape[0], shape[-1]
        if tuple(rotations.shape) != (N, 3, 3):
            raise ValueError(f"rotations must have shape ({N}, 3, 3), got {tuple(rotations.shape)}")
        if shifts is not None:
            shifts = torch.as_tensor(shifts).detach().cpu()
            if tuple(shifts.shape) != (N, 2):
                raise ValueError(f"shifts must have shape ({N}, 2) (pixels, x then y), got {tuple(shifts.shape)}")
            check_finite("shifts", shifts)
        self.dist = dist if dist is not None else DistContext.single(device)
        self.config = config
        self.device = torch.device(device)
        self.D = D
        self.n_particles = N
        self._lo, self._hi = self.dist.shard(N)
        with self.dist.agree("reading the particle images"):
            local = images[self._lo:self._hi]
            local = torch.as_tensor(local).to(torch.float32)
            if not torch.isfinite(local).all():
                raise ValueError("images contain NaN or inf values")
        # Global mean and standard deviation over all ranks' images (two passes, float64),
        # the same numbers whatever the number of processes.
        n = N * D * D
        chunks = local.split(1024)  # float64 copies of at most 1024 images at a time
        mean = self.dist.all_reduce_sum(sum((c.sum(dtype=torch.float64) for c in chunks),
                                            torch.zeros((), dtype=torch.float64)).reshape(1))[0] / n
        ss = self.dist.all_reduce_sum(sum(((c.to(torch.float64) - mean).square().sum() for c in chunks),
                                          torch.zeros((), dtype=torch.float64)).reshape(1))[0]
        std = float((ss / max(n - 1, 1)).sqrt())
        if not std > 0:
            raise ValueError("images are constant: nothing to reconstruct")
        self._data_signature = {"n_particles": N, "box": D, "mean": float(mean), "std": std}
        # Particle spectra, once: every loss is computed in Fourier space.
        self.spectra = fft2_centered((local / torch.tensor(std, dtype=torch.float32)).to(self.device))
        if shifts is not None and bool(shifts[self._lo:self._hi].any()):
            for i, t in zip(range(0, len(self.spectra), 1024), shifts[self._lo:self._hi].split(1024)):
                self.spectra[i:i + len(t)] *= shift_phases(t, D).to(self.device)
        self._ctfs = ctfs
        self.rotations = rotations.to(self.device, torch.float64).clone()
        self.dist.broadcast_(self.rotations)  # every rank starts from rank 0's poses
        # What the run starts from besides the images: its poses and origins. A checkpoint
        # resumes only the run that began here (another --pose-init, seed or particle file
        # would train on, and report against, starting poses it never had).
        self._start = _fingerprint(self.rotations, shifts)
        torch.manual_seed(config.seed)
        self.model = ResidualMFN(
            3, config.hidden_features, 1, config.n_scales, D, lambda1=config.lambda1,
            lambda2=config.lambda2, init="residual", head_activation="relu",
        ).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.volume_lr)
        self.coords = field_coordinates(D, device=self.device)
        # Voxels within D/2 of the centre voxel D//2 (the sphere inscribed in the box).
        self._support = (self.coords.square().sum(-1) <= 0.25) if config.support == "sphere" else None
        self.forward_model = forward_model(config.projector, D, self.device)
        self.schedule = StageSchedule(config.stage_epochs or None) if config.n_scales > 1 else StageSchedule(None)
        self.state = TrainingState()
        self._ddp = None
        self._ddp_stage = _UNSET
        self._checkpoint_epoch: int | None = None  # epoch of the last checkpoint written or loaded

    # -- forward model --------------------------------------------------------------------

    def volume(self, all_scales: bool = False, module=None):
        """The field on the voxel grid, ``(D, D, D)`` at the active scale (or all scales)."""
        vols = self._planes(0, self.D, self.model if module is None else module)
        return vols if all_scales else vols[-1]

    def _planes(self, z0: int, z1: int, module) -> list[torch.Tensor]:
        """The field on z-planes ``z0..z1-1``, ``(z1 - z0, D, D)`` per evaluated scale; with a
        spherical support only its voxels are evaluated (the others are 0)."""
        if self._support is None:
            return [y[..., 0] / self.D for y in module(self.coords[z0:z1])]
        inside = self._support[z0:z1]
        ys = module(self.coords[z0:z1][inside])
        return [y.new_zeros(inside.shape).masked_scatter(inside, y[:, 0] / self.D) for y in ys]

    def _training_volume(self, module=None) -> torch.Tensor:
        """The field at the active scale on the voxel grid, as volume and pose steps use it.

        On one process, :meth:`volume`. Data parallel, each rank evaluates only its block of
        z-planes (the field is pointwise in its coordinates) and the blocks are gathered, so
        the cost and activation memory of the field are split across ranks; the gather's
        backward sums every rank's volume gradient, so each rank's parameters get the
        gradient of all losses through its own planes, and DDP's average over ranks then
        equals the single-process gradient (see :meth:`_volume_steps`). Every rank must call it.
        """
        if not self.dist.distributed:
            return self.volume(module=module)
        z0, z1 = self.dist.shard(self.D)
        slab = self._planes(z0, z1, self.model if module is None else module)[-1]
        return self.dist.gather_rows(slab, self.D)

    def _field(self):
        """The module volume steps differentiate: the model, or its DDP wrapper.

        DDP reduces the gradients of the parameters that required them when it was built,
        and ``set_stage`` freezes and unfreezes parameters, so the wrapper is rebuilt (one
        parameter broadcast) whenever the stage has changed.
        """
        if not self.dist.distributed:
            return self.model
        if self._ddp is None or self._ddp_stage != self.model.stage:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = None  # drop the old wrapper's gradient hooks first
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The buffers (frozen frequencies) are equal on every rank: no per-step broadcast.
            # torch >= 2.13 renames broadcast_buffers to forward_sync_buffers.
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")
            self._ddp = DistributedDataParallel(self.model, device_ids=ids, **{sync: False})
            self._ddp_stage = self.model.stage
        return self._ddp

    def ctf(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() == 0:
            return torch.zeros(0, self.D, self.D, device=self.device)
        # a CTF stack may live on the host while the indices are on the device
        c = self._ctfs(idx) if callable(self._ctfs) else self._ctfs[idx.to(self._ctfs.device)]
        if c.shape[-2:] != (self.D, self.D):
            raise ValueError(f"CTFs must be ({self.D}, {self.D}) per image, got {tuple(c.shape[-2:])}")
        return c.to(self.device, torch.float32)

    def lowpass(self, stage: int | None) -> torch.Tensor:
        """The data's Gaussian low-pass at ``stage`` (None: the finest)."""
        s = self.config.n_scales - 1 if stage is None else stage
        sigma = lowpass_sigma(s, self.config.n_scales, self.D, self.config.lambda1, self.config.lambda2)
        return gaussian_filter(self.D, sigma, self.device)

    # -- one epoch --------------------------------------------------------------------------

    def _volume_steps(self, idx, target, ctf, batch_size: int | None = None) -> float:
        """Adam steps on the field for this rank's particles ``idx`` of a global batch of
        ``batch_size`` (default ``len(idx)``); returns the global batch's mean loss (before the
        last step)."""
        batch_size = len(idx) if batch_size is None else batch_size
        model = self.forward_model
        poses = model.bind(self.rotations[idx]) if idx.numel() else None  # they hold still here
        if not self.dist.distributed:
            loss = torch.zeros(())
            for _ in range(self.config.volume_steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = model.per_image_loss(model.predict(model.prepare(self.volume()), poses, ctf), target).mean()
                loss.backward()
                self.optimizer.step()
            return float(loss.detach())
        field_module = self._field()
        # The gather's backward sums dL_r/dV over ranks (W x the mean-loss gradient on each
        # rank's planes); DDP then divides the parameter gradients summed over ranks by W.
        weight = self.dist.world_size / batch_size
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(self.config.volume_steps):
            self.optimizer.zero_grad(set_to_none=True)
            vol = self._training_volume(field_module)
            if idx.numel() == 0:
                # Nothing of this batch lives here; still join DDP's gradient reduction.
                loss = 0.0 * vol.sum()
                total = torch.zeros((), dtype=torch.float64)
            else:
                per_image = model.per_image_loss(model.predict(model.prepare(vol), poses, ctf), target)
                loss = weight * per_image.sum()
                total = per_image.detach().sum().to("cpu", torch.float64)
            loss.backward()
            self.optimizer.step()
        return float(self.dist.all_reduce_sum(total.reshape(1))[0]) / batch_size

    def _pose_steps(self, idx, target, ctf, lr: float, mine: torch.Tensor | None = None) -> None:
        """Pose steps for the particles of global batch ``idx`` selected by the mask ``mine``
        (all of them by default); ``target`` and ``ctf`` are those particles' rows."""
        cfg = self.config
        sel = idx if mine is None else idx[mine]
        with torch.no_grad():
            # collective: before any early return
            fixed = self.forward_model.prepare(self._training_volume(), for_poses=True)
        if sel.numel() == 0:
            return
        model = self.forward_model
        # The starting perturbation is drawn for the whole global batch, so a particle
        # starts from the same one whichever rank refines it.
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + self.state.epoch * 104729 + int(idx[0]))
        theta, axis = initial_perturbation(len(idx), gen)
        if mine is not None:
            m = mine.cpu()
            theta, axis = theta[m], axis[m]
        self.rotations[sel] = refine_poses(
            lambda R: model.per_image_loss(model.predict_posed(fixed, R, ctf), target), self.rotations[sel],
            cfg.pose_steps, lr, cfg.pose_betas, initial=(theta, axis),
        )

    def _search_poses(self, stage: int | None) -> None:
        """:func:`search_poses` for this rank's particles against the current map at the
        stage's band. Every rank must call it."""
        from fieldkern.cryoem.rotations import super_fibonacci_rotations

        with torch.no_grad():
            spectrum = volume_spectrum(self._training_volume())  # collective
        lowpass = self.lowpass(stage)
        mask = lowpass > 0.01  # beyond, the low-passed targets are ~0 and only add noise
        grid = super_fibonacci_rotations(int(self.config.pose_search), device=self.device)
        for lo in range(0, self._hi - self._lo, 1024):
            idx = torch.arange(self._lo + lo, min(self._hi, self._lo + lo + 1024), device=self.device)
            self.rotations[idx] = search_poses(spectrum, self.rotations[idx], self.spectra[idx - self._lo] * lowpass,
                                               self.ctf(idx), grid, mask)[0]

    def _first_pose_epoch(self) -> int:
        s = self.config.pose_start_stage
        switches = self.schedule.switches or ()
        return 0 if s <= 0 or not switches else switches[min(s, len(switches)) - 1]

    def train_epoch(self, epoch: int, stage: int | None) -> float:
        """One pass over the particles; returns the mean over batches of the batch loss.

        Raises FloatingPointError as soon as a batch's loss is NaN or inf.
        """
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_particles, generator=gen).to(self.device)
        lowpass = self.lowpass(stage)
        pose_on = (cfg.refine_poses and cfg.pose_steps > 0
                   and (stage is None or stage >= cfg.pose_start_stage))
        pose_lr = cfg.pose_lr * cfg.pose_lr_decay ** max(0, epoch - self._first_pose_epoch())
        if cfg.refine_poses and cfg.pose_search and (stage is None or stage >= 1):
            self._search_poses(stage)
        losses = []
        for b, idx in enumerate(order.split(cfg.batch_size)):
            if self.dist.distributed:
                mine = (idx >= self._lo) & (idx < self._hi)
                sel = idx[mine]
            else:
                mine, sel = None, idx
            select = self.forward_model.select
            target, ctf = select(self.spectra[sel - self._lo] * lowpass), select(self.ctf(sel))
            loss = self._volume_steps(sel, target, ctf, len(idx))
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} in epoch {epoch}, batch {b} (stage {stage})")
            losses.append(loss)
            if pose_on:
                self._pose_steps(idx, target, ctf, pose_lr, mine)
        self._gather_rotations()
        self.state.epoch = epoch + 1
        return sum(losses) / len(losses)

    def _gather_rotations(self) -> None:
        """Every rank's refined poses into ``rotations`` on every rank (exact: a sum with zeros)."""
        if not self.dist.distributed:
            return
        owned = torch.zeros_like(self.rotations)
        owned[self._lo:self._hi] = self.rotations[self._lo:self._hi]
        self.rotations = self.dist.all_reduce_sum(owned)

    def _check_finite(self) -> None:
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if not torch.isfinite(self.rotations).all():
            bad.append("poses")
        if bad:
            raise FloatingPointError(
                f"non-finite values after epoch {self.state.epoch} in {', '.join(bad[:5])}"
                + (" ..." if len(bad) > 5 else "")
            )

    def fit(self, checkpoint: str | os.PathLike | None = None, progress: bool = True, callbacks=()) -> list[float]:
        """Train from ``self.state.epoch`` to ``config.epochs``, saving ``checkpoint`` after
        every epoch (atomically: temporary file, then rename).

        A NaN or inf loss (or model parameter, or pose) stops training with a
        FloatingPointError that says so; the checkpoint is only ever written from finite
        states, so the last good one is kept. An OSError writing the checkpoint (disk full,
        permissions) stops training and names the path.
        """

        reconstruction = self
        progress = progress and self.dist.is_main

        class _Saver(Callback):
            def on_step_end(self, step, stage, loss):
                reconstruction.state.losses.append(loss)
                reconstruction._check_finite()
                if checkpoint is not None:
                    reconstruction.save(checkpoint)

        start = self.state.epoch
        if start >= self.config.epochs:
            return []
        try:
            return run_stages(
                self.train_epoch, self.config.epochs, self.schedule, self.model.set_stage,
                callbacks=[_Saver(), *callbacks], progress=progress, desc="epochs",
                postfix_every=1, start_step=start,
            )
        except FloatingPointError as exc:
            if checkpoint is not None and self._checkpoint_epoch is not None:
                kept = f"the last good checkpoint, {str(checkpoint)!r} (after epoch {self._checkpoint_epoch}), was kept"
            elif checkpoint is not None:
                kept = "no checkpoint had been written yet"
            else:
                kept = "no checkpoint was being written"
            raise FloatingPointError(f"training stopped: {exc}; {kept}") from exc

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write a checkpoint (rank 0 only; call it on every rank). Atomic: a temporary file
        next to ``path``, flushed, then renamed over it. OSError names the path."""
        path = Path(path)
        with self.dist.agree(f"writing checkpoint {path}"):
            if self.dist.is_main:
                torch_save_atomic(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "config": asdict(self.config),
                        "data": dict(self._data_signature),
                        "start": self._start,
                        "world_size": self.dist.world_size,
                        "model": self.model.state_dict(),
                        "stage": self.model.stage,
                        "optimizer": self.optimizer.state_dict(),
                        "rotations": self.rotations.cpu(),
                        "state": asdict(self.state),
                        "rng": torch.get_rng_state(),
                    },
                    path,
                )
                # Temporary files of writes that were killed (torch_save_atomic's naming).
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink(missing_ok=True)
        self._checkpoint_epoch = self.state.epoch

    def load(self, path) -> None:
        """Restore a checkpoint written by :meth:`save` for the same data and settings.

        Any number of processes may resume a checkpoint (it holds every particle's pose; the
        model and optimiser are the same on every rank); with another number than wrote it,
        the result matches an uninterrupted run to float rounding rather than bit for bit.

        Raises:
            CheckpointError: (a ValueError) the file is unreadable or truncated, is not a
                reconstruction checkpoint, was made with other settings or another data set,
                does not fit the model, or holds NaN/inf. Nothing is loaded then.
        """
        path = Path(path)
        with self.dist.agree(f"loading checkpoint {path}"):
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} could not be read ({_reason(e)}); it may be truncated or not a checkpoint"
            ) from e
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
            missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
            raise CheckpointError(f"{path} is not a fieldkern reconstruction checkpoint (missing {', '.join(missing)})")
        if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
        ours = {k: (tuple(v) if isinstance(v, list) else v) for k, v in asdict(self.config).items()}
        theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(ckpt["config"]).items()}
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise CheckpointError(f"checkpoint {path} was made with other settings ({', '.join(diff)})")
        rot = ckpt["rotations"]
        if not isinstance(rot, torch.Tensor) or tuple(rot.shape) != tuple(self.rotations.shape):
            n = rot.shape[0] if isinstance(rot, torch.Tensor) and rot.dim() else "?"
            raise CheckpointError(f"checkpoint {path} holds {n} poses, the data set has {self.n_particles}")
        data = ckpt.get("data")
        if data is not None:
            ours_d = self._data_signature
            same = (data.get("n_particles") == ours_d["n_particles"] and data.get("box") == ours_d["box"]
                    and all(abs(float(data.get(k, math.nan)) - ours_d[k]) <= 1e-6 * abs(ours_d[k]) + 1e-12
                            for k in ("mean", "std")))
            if not same:
                raise CheckpointError(
                    f"checkpoint {path} was made for another data set (images: {data}; these: {ours_d})"
                )
        if ckpt.get("start") != self._start:
            raise CheckpointError(
                f"checkpoint {path} was trained from other starting poses or origins (another --pose-init, "
                "--seed or particle file); resume it with the settings it was started with"
            )
        bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()
               and not torch.isfinite(v).all()]
        if not torch.isfinite(rot).all():
            bad.append("poses")
        if bad:
            raise CheckpointError(f"checkpoint {path} holds NaN/inf values ({', '.join(bad[:5])})")
        try:
            state = TrainingState(**ckpt["state"])
            if not 0 <= int(state.epoch) <= self.config.epochs:
                raise ValueError(f"epoch {state.epoch} outside 0..{self.config.epochs}")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} has an invalid training state ({e})") from e
        # Load model and optimiser; on any mismatch put everything back as it was.
        old_stage = self.model.stage
        old_model = {k: v.clone() for k, v in self.model.state_dict().items()}
        old_opt = copy.deepcopy(self.optimizer.state_dict())
        try:
            self.model.set_stage(ckpt["stage"])
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            rng = ckpt["rng"]
            if not (torch.is_tensor(rng) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
                raise ValueError("the random number generator state is not torch's")
        except Exception as e:
            self.model.set_stage(old_stage)
            self.model.load_state_dict(old_model)
            self.optimizer.load_state_dict(old_opt)
            raise CheckpointError(f"checkpoint {path} does not fit this model ({type(e).__name__}: {e})") from e
        self.rotations = rot.to(self.device, torch.float64)
        self.state = state
        torch.set_rng_state(rng)
        self._checkpoint_epoch = state.epoch

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


def _reason(exc: Exception) -> str:
    """Why ``torch.load`` failed, in a line: torch's weights-only message advises loading with
    ``weights_only=False``, which would run whatever code the file holds."""
    text = str(exc)
    if "weights_only" in text or "Weights only" in text:
        return "torch's safe loader refused it: not a file of tensors and plain data"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _fingerprint(rotations: torch.Tensor, shifts: torch.Tensor | None) -> str:
    """A digest of a run's starting poses ``(N, 3, 3)`` and origins ``(N, 2)`` (or None)."""
    import hashlib

    h = hashlib.sha256(rotations.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    if shifts is not None:
        h.update(torch.as_tensor(shifts).detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def pose_errors_deg(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between estimated and true rotations, degrees, ``(N,)``."""
    from fieldkern.cryoem.rotations import angular_distance_deg

    return angular_distance_deg(estimate.to(torch.float64), truth.to(torch.float64))


def summarize_errors(errors: torch.Tensor) -> dict[str, float]:
    return {"mean": float(errors.mean()), "median": float(errors.median())}


__all__ = [
    "CHECKPOINT_FORMAT",
    "PROJECTORS",
    "CheckpointError",
    "Reconstruction",
    "ReconstructionConfig",
    "gaussian_filter",
    "initial_perturbation",
    "lowpass_sigma",
    "orthonormalize",
    "pose_errors_deg",
    "refine_poses",
    "search_poses",
    "shift_phases",
    "summarize_errors",
]
