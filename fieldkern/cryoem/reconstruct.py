"""Cryo-EM reconstruction with a staged 3D residual MFN and per-image pose refinement.

One training step on a batch of particles (the paper's appendices B and D):

1. *Volume steps*: evaluate the field on the ``D^3`` voxel grid at the active scale
   (:mod:`fieldkern.cryoem.voxel_field`), project it under the current pose estimates, apply
   each particle's CTF (:mod:`fieldkern.cryoem.forward_model`), and take an Adam step on the
   MSE against the particle images low-passed to the scale's band
   (:mod:`fieldkern.cryoem.spectra`).
2. *Pose steps*: with the volume fixed, optimise a per-image axis-angle perturbation of the
   current estimate with its own Adam, folded into the estimate after the batch
   (:func:`fieldkern.cryoem.poses.refine_poses`). With ``pose_search``, every epoch from the
   second stage on first moves each pose to the best rotation of a global grid
   (:func:`fieldkern.cryoem.poses.search_poses`); before the last stage, with
   ``search_temperature``, each pose is drawn from the tempered posterior over the grid instead.

Decisions, and why:

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
  oversampled 3D spectrum, from trilinear taps computed once per batch. One spectrum serves
  every pose step of a batch, which differentiate the slices through the spectrum's gradient
  (a smooth gradient, where trilinear interpolation's own is piecewise constant).
  ``"grid_sample"`` takes the same slices by 3D ``grid_sample``, ``"real"`` the FFT of
  :func:`fieldkern.cryoem.project` (:mod:`fieldkern.cryoem.forward_model`).
"""

from __future__ import annotations

import functools
import os

import torch

from fieldkern.cryoem.checkpoint import TrainingState, load_checkpoint, save_checkpoint, start_fingerprint
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.cryoem.epochs import check_inputs, check_losses, owned_positions, pose_learning_rate, start_perturbations
from fieldkern.cryoem.forward_model import forward_model
from fieldkern.cryoem.fourier_slice import volume_spectrum
from fieldkern.cryoem.poses import refine_poses, search_poses
from fieldkern.cryoem.rotations import super_fibonacci_rotations
from fieldkern.cryoem.spectra import BAND_EDGE_SIGMAS, gaussian_filter, global_mean_std, lowpass_sigma, particle_spectra
from fieldkern.cryoem.voxel_field import VoxelField
from fieldkern.distributed import DistContext
from fieldkern.nn import ResidualMFN
from fieldkern.train import Callback, StageSchedule, TimeLimit, run_stages
from fieldkern.train.graphs import GraphedSteps
from fieldkern.train.optim import adam

#: Particles per block of the pose search (bounds its ``(block, grid)`` distance matrix).
_SEARCH_BLOCK = 1024
#: Offset of the search draws' seed from the batch order's (``seed * 1_000_003 + epoch``).
_SEARCH_SEED = 500_000


class Reconstruction:
    """Staged residual-MFN reconstruction of one particle data set.

    Args:
        images: ``(N, D, D)`` particle images (any scale; normalised internally): a tensor, or
            anything that slices into one, such as a lazy :class:`fieldkern.cryoem.ImageStack`
            (each rank of a data-parallel run then reads only its own block).
        ctfs: ``(N, D, D)`` centred CTFs, or a callable ``indices -> (n, D, D)`` computing
            them per batch.
        rotations: ``(N, 3, 3)`` initial pose estimates (``I ~ ctf * project(V, R)``).
        config: :class:`~fieldkern.cryoem.config.ReconstructionConfig`.
        device: where to train.
        dist: a :class:`fieldkern.distributed.DistContext` for data-parallel training (from
            :func:`fieldkern.distributed.init_from_env` under ``torchrun``); None: one process.
        shifts: ``(N, 2)`` translations ``(x, y)`` in pixels that centre each image (RELION's
            ``rlnOriginX/YAngst / apix``): image ``i`` is moved by ``shifts[i]`` (a phase ramp
            on its spectrum, so sub-pixel shifts are exact) before anything is fitted to it.
            None: the images are centred already (simulated data).
        cuda_graphs: replay each batch's volume steps and pose steps from CUDA graphs
            (:mod:`fieldkern.train.graphs`; one process on a CUDA device). Off by default:
            not yet run on a device (``tests/cryoem/test_step_graphs.py`` has its GPU test).

    Data parallelism (``dist.world_size = W > 1``): rank ``r`` owns the contiguous block
    ``dist.shard(N)`` of particles: their images, spectra and pose updates. Every epoch
    draws the same global batch order as a single process; each rank takes the particles it
    owns out of each global batch, so the batches (and the alternation of volume and pose
    steps) are the single-process ones. The field is wrapped in
    ``DistributedDataParallel`` and its evaluation on the voxel grid is split too
    (:class:`~fieldkern.cryoem.voxel_field.VoxelField`). Each rank's loss is ``W / B`` times
    the sum of its images' losses for a global batch of ``B``; the gather's backward sums the
    volume gradients of all ranks, and DDP averages the parameter gradients over ranks, which
    together give the single-process batch mean's gradient whatever the shard sizes. Pose
    steps need no communication beyond that gather (each image's pose depends on its own
    loss, and the fixed volume is the same on every rank).
    After every epoch the owned poses are summed into ``rotations`` on every rank, so
    ``rotations``, checkpoints and results always hold all particles. Only rank 0 writes.
    Every method that communicates (the constructor, :meth:`train_epoch`, :meth:`fit`,
    :meth:`save`, :meth:`load`) must be called on every rank.
    """

    def __init__(self, images, ctfs, rotations, config: ReconstructionConfig, device="cpu",
                 dist: DistContext | None = None, shifts: torch.Tensor | None = None, cuda_graphs: bool = False):
        shifts = None if shifts is None else torch.as_tensor(shifts).detach().cpu()
        N, D = check_inputs(images, rotations, shifts)
        self.dist = dist if dist is not None else DistContext.single(device)
        self.config = config
        self.device = torch.device(device)
        self.D = D
        self.n_particles = N
        self._lo, self._hi = self.dist.shard(N)
        with self.dist.agree("reading the particle images"):
            local = torch.as_tensor(images[self._lo:self._hi]).to(torch.float32)
            if not torch.isfinite(local).all():
                raise ValueError("images contain NaN or inf values")
        mean, std = global_mean_std(local, N * D * D, self.dist)
        if not std > 0:
            raise ValueError("images are constant: nothing to reconstruct")
        #: What identifies the data set in a checkpoint.
        self.data_signature = {"n_particles": N, "box": D, "mean": mean, "std": std}
        self.spectra = particle_spectra(local, std, None if shifts is None else shifts[self._lo:self._hi],
                                        self.device)
        self._ctfs = ctfs
        self.rotations = rotations.to(self.device, torch.float64).clone()
        self.dist.broadcast_(self.rotations)  # every rank starts from rank 0's poses
        #: What the run starts from besides the images (a checkpoint resumes only this run).
        self.start_fingerprint = start_fingerprint(self.rotations, shifts)
        torch.manual_seed(config.seed)
        self.model = ResidualMFN(
            3, config.hidden_features, 1, config.n_scales, D, lambda1=config.lambda1,
            lambda2=config.lambda2, init="residual", head_activation="relu",
        ).to(self.device)
        self.optimizer = adam(self.model.parameters(), lr=config.volume_lr)
        self.field = VoxelField(self.model, D, config.support, self.dist, self.device)
        self.forward_model = forward_model(config.projector, D, self.device)
        self.schedule = StageSchedule(config.stage_epochs or None) if config.n_scales > 1 else StageSchedule(None)
        self.state = TrainingState()
        self._checkpoint_epoch: int | None = None  # epoch of the last checkpoint written or loaded
        #: Read each batch's loss as it is made (the CPU: free there, and a diverged batch
        #: stops the epoch at once), or all of an epoch's at its end (CUDA: a read waits for
        #: the device, so one per epoch keeps the GPU's queue full).
        self.read_losses_every_batch = self.device.type == "cpu"
        if cuda_graphs and (self.device.type != "cuda" or self.dist.distributed):
            raise ValueError("cuda_graphs needs one process on a CUDA device "
                             f"(device {self.device}, {self.dist.world_size} processes)")
        #: The graphs the batches' steps are replayed from (None: launched from Python).
        self.graphs = GraphedSteps() if cuda_graphs else None

    # -- data at a batch and stage ----------------------------------------------------------

    def volume(self, all_scales: bool = False, module=None):
        """The field on the voxel grid, ``(D, D, D)`` at the active scale (or all scales)."""
        return self.field.volume(all_scales, module)

    def ctf(self, idx: torch.Tensor) -> torch.Tensor:
        """The CTFs ``(n, D, D)`` float32 of particles ``idx``, on the training device."""
        if idx.numel() == 0:
            return torch.zeros(0, self.D, self.D, device=self.device)
        # a CTF stack may live on the host while the indices are on the device
        c = self._ctfs(idx) if callable(self._ctfs) else self._ctfs[idx.to(self._ctfs.device)]
        if c.shape[-2:] != (self.D, self.D):
            raise ValueError(f"CTFs must be ({self.D}, {self.D}) per image, got {tuple(c.shape[-2:])}")
        return c.to(self.device, torch.float32)

    def lowpass(self, stage: int | None) -> torch.Tensor:
        """The data's Gaussian low-pass ``(D, D)`` at ``stage`` (None: the finest), narrowed
        to a support limit set by FSC marching (its edge at ``state.support_limit`` shells)."""
        s = self.config.n_scales - 1 if stage is None else stage
        sigma = lowpass_sigma(s, self.config.n_scales, self.D, self.config.lambda1, self.config.lambda2)
        if self.state.support_limit is not None:
            sigma = min(sigma, self.state.support_limit / BAND_EDGE_SIGMAS)
        return gaussian_filter(self.D, sigma, self.device)

    # -- one epoch --------------------------------------------------------------------------

    def _volume_steps(self, idx, target, ctf, batch_size: int | None = None) -> torch.Tensor:
        """Adam steps on the field for this rank's particles ``idx`` of a global batch of
        ``batch_size`` (default ``len(idx)``); returns the global batch's mean loss (before the
        last step), a 0-d tensor on the training device: reading it is the caller's choice
        (nothing in here waits for the device; data parallel, the loss's sum over ranks is a
        collective on the device under NCCL)."""
        batch_size = len(idx) if batch_size is None else batch_size
        if not self.dist.distributed:
            if self.graphs is None:
                return self._volume_batch(self.rotations[idx], target, ctf)
            # a graph per batch size (a short last batch keeps its own), recaptured per stage
            return self.graphs(("volume", len(idx)), self.model.stage, self._volume_batch, self.rotations[idx],
                               target, ctf)[0]
        model = self.forward_model
        poses = model.bind(self.rotations[idx]) if idx.numel() else None  # they hold still here
        field_module = self.field.module()
        # The gather's backward sums dL_r/dV over ranks (W x the mean-loss gradient on each
        # rank's planes); DDP then divides the parameter gradients summed over ranks by W.
        weight = self.dist.world_size / batch_size
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(self.config.volume_steps):
            self.optimizer.zero_grad(set_to_none=True)
            vol = self.field.training_volume(field_module)
            if idx.numel() == 0:
                # Nothing of this batch lives here; still join DDP's gradient reduction.
                loss = 0.0 * vol.sum()
            else:
                per_image = model.per_image_loss(model.predict(model.prepare(vol), poses, ctf), target)
                loss = weight * per_image.sum()
                total = per_image.detach().sum().to(torch.float64)
            loss.backward()
            self.optimizer.step()
        # The sum over ranks stays on the device (NCCL: no host read; reading it is the caller's choice).
        return (self.dist.all_reduce_sum(total.reshape(1))[0] / batch_size).float()

    def _pose_steps(self, idx, target, ctf, lr: float, start, mine: torch.Tensor | None = None) -> None:
        """Pose steps for the particles of global batch ``idx`` at the positions ``mine``
        (long, on the device; all of them by default); ``target`` and ``ctf`` are those particles' rows, ``start``
        the whole batch's starting perturbation ``(theta (B,), axis (B, 3))`` on the device
        (:func:`~fieldkern.cryoem.epochs.start_perturbations`)."""
        if not self.dist.distributed:
            step = functools.partial(self._pose_batch, lr=lr)
            args = (self.rotations[idx], target, ctf, *start)
            self.rotations[idx] = step(*args) if self.graphs is None else \
                self.graphs(("pose", len(idx)), (self.model.stage, lr), step, *args)[0]
            return
        sel = idx if mine is None else idx[mine]
        with torch.no_grad():
            # collective: before any early return
            fixed = self.forward_model.prepare(self.field.training_volume(), for_poses=True)
        if sel.numel() == 0:
            return
        theta, axis = start if mine is None else (start[0][mine], start[1][mine])
        self.rotations[sel] = self._refine(fixed, self.rotations[sel], target, ctf, theta, axis, lr)

    def _volume_batch(self, rotations, target, ctf) -> torch.Tensor:
        """One process's volume steps on a batch posed at ``rotations`` ``(n, 3, 3)``: the
        last step's loss before its update (a 0-d device tensor). A step function of
        :attr:`graphs`: it reads only its inputs, the model and the optimiser."""
        model = self.forward_model
        poses = model.bind(rotations)  # they hold still here
        loss = torch.zeros((), device=self.device)
        for _ in range(self.config.volume_steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = model.per_image_loss(model.predict(model.prepare(self.volume()), poses, ctf), target).mean()
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def _pose_batch(self, rotations, target, ctf, theta, axis, lr: float) -> torch.Tensor:
        """One process's pose steps on a batch against the current map: :meth:`_refine`. A step
        function of :attr:`graphs` (``lr`` is fixed at its capture: part of its key)."""
        with torch.no_grad():
            fixed = self.forward_model.prepare(self.volume(), for_poses=True)
        return self._refine(fixed, rotations, target, ctf, theta, axis, lr)

    def _refine(self, fixed, rotations, target, ctf, theta, axis, lr: float) -> torch.Tensor:
        """:func:`~fieldkern.cryoem.poses.refine_poses` of ``rotations`` ``(n, 3, 3)`` against the
        map ``fixed`` (prepared for pose steps) from the perturbation ``theta (n,)``, ``axis (n, 3)``."""
        model, cfg = self.forward_model, self.config
        return refine_poses(lambda R: model.per_image_loss(model.predict_posed(fixed, R, ctf), target), rotations,
                            cfg.pose_steps, lr, cfg.pose_betas, initial=(theta, axis))

    def _search_poses(self, stage: int | None, epoch: int) -> None:
        """:func:`~fieldkern.cryoem.poses.search_poses` for this rank's particles against the
        current map at the stage's band: drawn at ``search_temperature`` before the last
        stage, the best fit at the last. Every rank must call it."""
        cfg = self.config
        with torch.no_grad():
            spectrum = volume_spectrum(self.field.training_volume())  # collective
        lowpass = self.lowpass(stage)
        mask = lowpass > 0.01  # beyond, the low-passed targets are ~0 and only add noise
        grid = super_fibonacci_rotations(int(cfg.pose_search), device=self.device)
        temperature = cfg.search_temperature if stage is not None and stage < cfg.n_scales - 1 else 0.0
        uniforms = None
        if temperature > 0:  # one draw per particle and epoch, whatever the blocks and ranks
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + epoch + _SEARCH_SEED)
            uniforms = torch.rand(self.n_particles, generator=gen, dtype=torch.float64).to(self.device)
        for lo in range(0, self._hi - self._lo, _SEARCH_BLOCK):
            idx = torch.arange(self._lo + lo, min(self._hi, self._lo + lo + _SEARCH_BLOCK), device=self.device)
            self.rotations[idx] = search_poses(spectrum, self.rotations[idx], self.spectra[idx - self._lo] * lowpass,
                                               self.ctf(idx), grid, mask, temperature,
                                               None if uniforms is None else uniforms[idx])[0]

    def train_epoch(self, epoch: int, stage: int | None) -> float:
        """One pass over the particles; returns the mean over batches of the batch loss.

        Raises FloatingPointError when a batch's loss is NaN or inf: at once with
        ``read_losses_every_batch`` (the CPU), else at the end of the epoch.
        """
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + epoch)
        order_host = torch.randperm(self.n_particles, generator=gen)
        order = order_host.to(self.device)
        lowpass = self.lowpass(stage)
        pose_on = (cfg.refine_poses and cfg.pose_steps > 0
                   and (stage is None or stage >= cfg.pose_start_stage))
        pose_lr = pose_learning_rate(cfg, epoch, self.schedule.switches)
        if cfg.refine_poses and cfg.pose_search and (stage is None or stage >= 1):
            self._search_poses(stage, epoch)
        starts = (start_perturbations(order_host.split(cfg.batch_size), cfg.seed, epoch, self.device)
                  if pose_on else None)
        owned = (owned_positions(order_host.split(cfg.batch_size), self._lo, self._hi, self.device)
                 if self.dist.distributed else None)
        losses = []
        for b, idx in enumerate(order.split(cfg.batch_size)):
            mine = None if owned is None else owned[b]
            sel = idx if mine is None else idx[mine]
            select = self.forward_model.select
            target, ctf = select(self.spectra[sel - self._lo] * lowpass), select(self.ctf(sel))
            losses.append(self._volume_steps(sel, target, ctf, len(idx)))
            if self.read_losses_every_batch:
                check_losses(losses[-1:], epoch, stage, first=b)
            if pose_on:
                self._pose_steps(idx, target, ctf, pose_lr, starts[b], mine)
        values = check_losses(losses, epoch, stage)
        self._gather_rotations()
        self.state.epoch = epoch + 1
        return sum(values) / len(values)

    def _gather_rotations(self) -> None:
        """Every rank's refined poses into ``rotations`` on every rank (exact: a sum with zeros)."""
        if not self.dist.distributed:
            return
        owned = torch.zeros_like(self.rotations)
        owned[self._lo:self._hi] = self.rotations[self._lo:self._hi]
        self.rotations = self.dist.all_reduce_sum(owned)

    def check_finite(self) -> None:
        """FloatingPointError naming the model parameters (or the poses) that are NaN or inf."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if not torch.isfinite(self.rotations).all():
            bad.append("poses")
        if bad:
            raise FloatingPointError(
                f"non-finite values after epoch {self.state.epoch} in {', '.join(bad[:5])}"
                + (" ..." if len(bad) > 5 else "")
            )

    # -- training, checkpoints, results -----------------------------------------------------

    def fit(self, checkpoint: str | os.PathLike | None = None, progress: bool = True, callbacks=(),
            time_limit: float | None = None) -> list[float]:
        """Train from ``self.state.epoch`` to ``config.epochs``, saving ``checkpoint`` after
        every epoch (atomically: temporary file, then rename); returns the epochs' losses.

        A NaN or inf loss (or model parameter, or pose) stops training with a
        FloatingPointError that says so; the checkpoint is only ever written from finite
        states, so the last good one is kept. An OSError writing the checkpoint (disk full,
        permissions) stops training and names the path. ``time_limit`` (seconds): stop after
        the epoch (and its checkpoint) that ends past it, raising
        :class:`~fieldkern.train.TimeLimitReached`; ``fit`` again (after :meth:`load`) goes on.
        """
        if self.config.marching != "fixed":
            raise ValueError(f"marching {self.config.marching!r} trains two half sets side by side: "
                             "use fieldkern.cryoem.marching.fit_halves")
        reconstruction = self
        progress = progress and self.dist.is_main

        class _Saver(Callback):
            def on_step_end(self, step, stage, loss):
                reconstruction.end_epoch(loss, checkpoint)

        start = self.state.epoch
        if start >= self.config.epochs:
            return []
        try:
            return run_stages(
                self.train_epoch, self.config.epochs, self.schedule, self.model.set_stage,
                callbacks=[_Saver(), *callbacks, *self.time_limit(time_limit)], progress=progress, desc="epochs",
                postfix_every=1, start_step=start,
            )
        except FloatingPointError as exc:
            raise FloatingPointError(f"training stopped: {exc}; {self.kept_checkpoint(checkpoint)}") from exc

    def end_epoch(self, loss: float, checkpoint=None, checked: bool = False) -> None:
        """Book an epoch's mean ``loss``, check the model and poses are finite
        (FloatingPointError; ``checked``: the caller just did) and save ``checkpoint`` (None:
        none)."""
        self.state.losses.append(loss)
        if not checked:
            self.check_finite()
        if checkpoint is not None:
            self.save(checkpoint)

    def kept_checkpoint(self, checkpoint) -> str:
        """What a stopped run left of ``checkpoint`` (for its error message)."""
        if checkpoint is None:
            return "no checkpoint was being written"
        if self._checkpoint_epoch is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint, {str(checkpoint)!r} (after epoch {self._checkpoint_epoch}), was kept"

    def time_limit(self, seconds: float | None) -> list[Callback]:
        """The :class:`~fieldkern.train.TimeLimit` callback for ``seconds`` (none for None);
        every rank stops when any rank's clock ran out."""
        if seconds is None:
            return []
        agree = None
        if self.dist.distributed:  # stop on every rank when any rank's clock ran out
            agree = lambda up: bool(self.dist.all_reduce_sum(torch.tensor([float(up)], device=self.device))[0] > 0)  # noqa: E731
        return [TimeLimit(seconds, self.config.epochs, agree)]

    def save(self, path) -> None:
        """Write a checkpoint (:func:`~fieldkern.cryoem.checkpoint.save_checkpoint`: rank 0
        writes, atomically; call it on every rank). OSError names the path."""
        save_checkpoint(self, path)
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
        load_checkpoint(self, path)
        if self.graphs is not None:  # the optimiser's state tensors were replaced
            self.graphs.clear()
        self._checkpoint_epoch = self.state.epoch

    @torch.no_grad()
    def volumes(self) -> list[torch.Tensor]:
        """Maps of every scale ``(D, D, D)``, coarsest first (in the field's units / D)."""
        stage = self.model.stage
        self.model.set_stage(None)
        try:
            return [v.detach().cpu() for v in self.volume(all_scales=True)]
        finally:
            self.model.set_stage(stage)


__all__ = ["Reconstruction"]
