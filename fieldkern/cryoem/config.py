"""Settings of the reconstruction trainer (:class:`fieldkern.cryoem.reconstruct.Reconstruction`).

Kept apart from the trainer so that presets, memory estimates and checkpoints can name a run's
settings without building one.
"""

from __future__ import annotations

from dataclasses import dataclass

from fieldkern.cryoem.forward_model import FORWARD_MODELS

PROJECTORS = tuple(FORWARD_MODELS)
SUPPORTS = ("box", "sphere")
#: How stages switch: at ``stage_epochs`` ("fixed") or by the half-map FSC ("fsc",
#: :mod:`fieldkern.cryoem.marching`: two half sets trained side by side).
MARCHINGS = ("fixed", "fsc")


@dataclass
class ReconstructionConfig:
    """Settings of :class:`~fieldkern.cryoem.reconstruct.Reconstruction`; defaults are the
    authors' (the paper's appendix B).

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
            estimate (:func:`fieldkern.cryoem.poses.search_poses`): for starting poses far off
            (``coarse``), which local pose steps cannot bring back. Not in the paper. 4608
            rotations: a random rotation lies 7.4 degrees from the nearest on average, 13.1 at most.
        search_temperature: 0 (default): the search takes each image's best fit. ``T > 0``:
            before the last stage, each image's pose is drawn from its posterior over the grid
            and its estimate at ``T`` times its residual's noise level
            (:func:`fieldkern.cryoem.poses.search_poses`), the best fit at the last stage. Far
            from the truth, best fits to the first blob-like maps lock in a wrong assignment
            (on the quick 1OL5 data: a chimera of the structure and a copy rotated ~180 degrees);
            broad draws let the low-resolution map form first. Not in the paper.
        pose_lr_decay: the pose learning rate is multiplied by this every epoch after the
            first epoch with pose steps.
        support: "box" (the field fills the box) or "sphere" (it is evaluated, and the map
            non-zero, only within the sphere inscribed in the box: a compact support, as the
            spherical masks of cryo-EM packages; about half the voxels to evaluate). Not in the paper.
        projector: the forward model (:mod:`fieldkern.cryoem.forward_model`): "fourier"
            (central slices from precomputed taps), "grid_sample" (the same slices by 3D
            ``grid_sample``: the reference) or "real" (rotated-grid ray sums).
        marching: "fixed" (stages start at ``stage_epochs``) or "fsc": after every epoch the
            FSC between two half-set reconstructions decides whether to stay, go to the next
            stage, limit the band or stop (:mod:`fieldkern.cryoem.marching`; ``epochs`` is
            then the most it may take, ``stage_epochs`` unused; with ``pose_search`` the
            halves' maps are aligned, mirror allowed, before every comparison, and a coarse
            stage waits for its score to settle, with no band limit: ``marching_rule``). Not in the paper.
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
    search_temperature: float = 0.0
    support: str = "box"
    projector: str = "fourier"
    marching: str = "fixed"
    seed: int = 0

    def __post_init__(self):
        self.stage_epochs = tuple(int(e) for e in self.stage_epochs)
        self.pose_betas = tuple(float(b) for b in self.pose_betas)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {self.support!r}")
        if self.marching not in MARCHINGS:
            raise ValueError(f"marching must be one of {MARCHINGS}, got {self.marching!r}")
        if len(self.stage_epochs) != self.n_scales - 1:
            raise ValueError(
                f"stage_epochs must hold n_scales - 1 = {self.n_scales - 1} epochs, got {self.stage_epochs}"
            )
        for name in ("epochs", "batch_size", "volume_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pose_steps < 0:
            raise ValueError(f"pose_steps must be >= 0, got {self.pose_steps}")
        if not float(self.search_temperature) >= 0:  # also refuses NaN
            raise ValueError(f"search_temperature must be >= 0 (0: the best fit), got {self.search_temperature}")
        if int(self.pose_search) < 0:
            raise ValueError(f"pose_search must be >= 0 (grid rotations; 0: off), got {self.pose_search}")


__all__ = ["MARCHINGS", "PROJECTORS", "SUPPORTS", "ReconstructionConfig"]
