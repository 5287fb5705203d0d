"""Pose estimates: the starting poses of a run, the trainer's local pose steps and global
pose search, and pose errors.

The local steps optimise a per-image axis-angle perturbation ``(theta, u)`` of the current
estimate, ``R <- rodrigues(theta, u) R`` (the paper's appendix D); ``theta`` is kept in
``[0, pi]`` and ``u`` at unit length by the rotation-preserving canonicalisation
(:func:`fieldkern.cryoem.canonicalize_axis_angle`): clamping a negative ``theta`` to 0, the
paper's rule, makes the axis gradient vanish and can trap a pose at the identity
perturbation; mapping it to ``(-theta, -u)`` keeps the same constraint set and rotation
without the trap.
"""

from __future__ import annotations

import torch

from fieldkern.cryoem.fourier_slice import central_slices
from fieldkern.cryoem.rotations import (
    angular_distance_deg,
    canonicalize_axis_angle,
    jitter_rotations,
    matrix_to_quaternion,
    perturb_rotations,
    quaternion_to_matrix,
    random_rotations,
)
from fieldkern.train.optim import adam

#: ``--pose-init`` choices (:func:`initial_poses`).
POSE_INITS = ("gt", "refine", "perturbed", "coarse", "uniform", "random")
#: The inits that start far from the truth (more than 90 degrees on average) and so take
#: the global pose search by default (``presets.AB_INITIO_POSE_SEARCH``).
FAR_POSE_INITS = ("uniform", "random")


def initial_poses(true_rotations: torch.Tensor | None, mode: str, preset, seed: int,
                  n: int | None = None) -> torch.Tensor:
    """Starting pose estimates ``(N, 3, 3)``: the truth (``gt``, kept fixed in training;
    ``refine``, refined: a real particle set's poses), the truth rotated about a random axis
    by up to ``preset.perturb_deg`` degrees (``perturbed``), by an angle in
    ``preset.coarse_deg`` (``coarse``, the main text's [45, 90]) or in [0, 180] (``uniform``,
    the paper's appendix E), or rotations uniform on SO(3) that know nothing of the truth
    (``random``: ab initio; only its count is used). ``preset``: a
    :class:`fieldkern.cryoem.presets.CryoEMPreset`. Seeded by ``seed``. Particles without
    poses (``true_rotations`` None) start only from ``random``, ``n`` of them."""
    if mode not in POSE_INITS:
        raise ValueError(f"pose init must be one of {POSE_INITS}, got {mode!r}")
    if true_rotations is None:
        if mode != "random" or n is None:
            raise ValueError(f"the particles have no poses to start from (--pose-init {mode}): "
                             "--pose-init random starts from none (ab initio)")
        true_rotations = torch.empty(n, 3, 3, dtype=torch.float64)  # only its count is used
    if mode in ("gt", "refine"):
        return true_rotations.clone()
    gen = torch.Generator().manual_seed(seed + 17)
    if mode == "random":
        return random_rotations(true_rotations.shape[0], generator=gen, dtype=torch.float64)
    lo, hi = {"perturbed": (0.0, preset.perturb_deg), "coarse": preset.coarse_deg, "uniform": (0.0, 180.0)}[mode]
    return jitter_rotations(true_rotations.to(torch.float64), lo, hi, generator=gen)


@torch.no_grad()
def search_poses(spectrum: torch.Tensor, rotations: torch.Tensor, targets: torch.Tensor, ctfs: torch.Tensor,
                 grid: torch.Tensor, frequencies: torch.Tensor | None = None, temperature: float = 0.0,
                 uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global pose search over ``grid`` ``(G, 3, 3)``: per image, the grid rotation whose
    central slice of ``spectrum`` (:func:`fieldkern.cryoem.fourier_slice.volume_spectrum`),
    times the image's CTF, is closest to its target spectrum, where that beats the current
    estimate; or, with ``temperature > 0``, a draw from the posterior (:func:`_draw_poses`).

    ``rotations (n, 3, 3)``, ``targets`` (complex) and ``ctfs`` ``(n, D, D)``; ``frequencies``:
    a ``(D, D)`` boolean mask of the frequencies compared (default all). The squared
    distances of every image to every grid slice come from two matrix products over the
    masked frequencies (``|C S - T|^2 = C^2 |S|^2 - 2 Re(conj(T) C S) + |T|^2``), so a search
    over thousands of rotations costs about as much as a few pose steps. ``uniforms (n,)``:
    one number in [0, 1) per image for the draws (needed with a temperature). Returns the new
    rotations (``rotations``' dtype) and a boolean ``(n,)`` of the images that moved.
    """
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0: the best fit), got {temperature}")
    if temperature > 0 and (uniforms is None or uniforms.shape != rotations.shape[:1]):
        raise ValueError(f"a draw at temperature {temperature} needs uniforms of shape ({rotations.shape[0]},)")
    D = targets.shape[-1]
    # The mask as indices, found once: each boolean-mask index is a nonzero, which waits for a GPU.
    index = None if frequencies is None else frequencies.flatten().nonzero().flatten()

    def compared(t):  # (m, D, D) -> (m, K)
        return t.flatten(-2) if index is None else t.flatten(-2)[:, index]

    slices = compared(central_slices(spectrum, grid.to(spectrum.real.dtype), D))          # (G, K)
    T, C = compared(targets), compared(ctfs).to(slices.real.dtype)
    # fit = |C S - T|^2 - |T|^2 for every (image, grid slice), then the current estimate's
    fit = C.square() @ slices.abs().square().T - 2 * ((T.conj() * C).to(slices.dtype) @ slices.T).real
    current = compared(central_slices(spectrum, rotations.to(spectrum.real.dtype), D))
    current_fit = (C.square() * current.abs().square()).sum(1) - 2 * (T.conj() * C * current).sum(1).real
    if temperature > 0:
        fit = torch.cat([fit, current_fit[:, None]], 1)                                   # (n, G + 1)
        # each image's noise variance per coefficient: its best residual per compared
        # frequency, an overestimate while the map is still wrong (so early draws are broad)
        noise = (fit.min(dim=1).values + T.abs().square().sum(1)) / T.shape[1]
        pick = _draw_poses(fit, noise, temperature, uniforms)
        moved = pick < grid.shape[0]
    else:
        best_fit, pick = fit.min(dim=1)
        moved = best_fit < current_fit
    # (a drawn pick of G is the current estimate: clamped to a valid row, which ``where`` discards)
    chosen = grid[pick.clamp_max(grid.shape[0] - 1)].to(rotations)
    return torch.where(moved[:, None, None], chosen, rotations), moved


def _draw_poses(fit: torch.Tensor, noise: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """The index of one candidate per image ``(n,)``, drawn with probability proportional to
    ``exp(-fit / (2 T noise))``: ``fit (n, M)``, each candidate's squared residual over the
    compared frequencies (up to a per-image constant), is the pose posterior's exponent under
    Gaussian noise of variance ``noise (n,)`` per complex coefficient (a full plane counts
    each coefficient twice), tempered by ``T = temperature``. Inverse-CDF draws from
    ``uniforms (n,)`` in [0, 1): an image's draw depends on its own row only, whichever block
    or rank searches it."""
    best = fit.min(dim=1, keepdim=True).values
    scale = 2 * temperature * noise.double().clamp_min(1e-30)[:, None]
    weights = torch.exp(-(fit - best).double() / scale)
    cdf = weights.cumsum(dim=1)
    # right=True: the first candidate whose cdf exceeds u, never one of weight 0
    return torch.searchsorted(cdf, uniforms.to(cdf)[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_max(fit.shape[1] - 1)


def orthonormalize(R: torch.Tensor) -> torch.Tensor:
    """Nearest rotation ``(..., 3, 3)``, via a quaternion round trip: keeps folded-in updates on SO(3)."""
    q = matrix_to_quaternion(R)
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


def initial_perturbation(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' starting pose perturbation: ``theta ~ U(0, 1e-6)`` ``(n,)`` radians and
    ``u ~ N(0, 1e-6)`` ``(n, 3)``, float64, drawn in that order."""
    theta = 1e-6 * torch.rand(n, generator=generator, dtype=torch.float64)
    axis = 1e-6 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return theta, axis


def refine_poses(image_losses, rotations: torch.Tensor, steps: int, lr: float,
                 betas=(0.9, 0.9), generator: torch.Generator | None = None,
                 initial: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The paper's pose steps for one batch; returns the refined rotations ``(B, 3, 3)``.

    Optimises a perturbation ``(theta, u)`` per image of ``R <- rodrigues(theta, u) R`` with
    Adam on ``sum_b image_losses(R)_b`` (each image's term depends on its own pose only),
    keeping ``theta`` in ``[0, pi]`` and ``|u| = 1`` after every update by the
    rotation-preserving canonicalisation (module docstring). The perturbation starts at
    :func:`initial_perturbation`; after the steps it is folded into the estimate and dropped
    with its optimiser state, as the authors do: momentum never moves images outside the batch.

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
    opt = adam([theta, axis], lr=lr, betas=tuple(betas))
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


def pose_errors_deg(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between estimated and true rotations ``(N, 3, 3)``, degrees, ``(N,)``."""
    return angular_distance_deg(estimate.to(torch.float64), truth.to(torch.float64))


__all__ = [
    "FAR_POSE_INITS",
    "POSE_INITS",
    "initial_perturbation",
    "initial_poses",
    "orthonormalize",
    "pose_errors_deg",
    "refine_poses",
    "search_poses",
]
