"""The trainer's forward model: a batch's CTF-modulated projection spectra from a volume.

Losses are computed in Fourier space, on flattened image spectra ``(n, K)`` at ``K`` compared
frequencies with loss weights (:attr:`ForwardModel.weight`). Three named variants compute the
same projections (``ReconstructionConfig.projector``):

* ``"fourier"`` (:class:`TapSlices`, the default): central slices of the volume's 2x
  oversampled spectrum from precomputed trilinear taps on half of each plane (weights 2 and
  1: the spectra are Hermitian), a sparse product forward and a scatter-add adjoint
  (:mod:`fieldkern.cryoem.slice_taps`). The taps of a batch's poses are made once and serve
  its volume steps.
* ``"grid_sample"`` (:class:`GridSampleSlices`): the same central slices on the full plane by
  3D ``grid_sample`` (:func:`fieldkern.cryoem.fourier_slice.central_slices`), differentiated by
  autograd: the reference, and the trainer's model before the taps (a finest-stage epoch of the
  quick default takes 2.8x as long with it on the CPU: ``bench/test_bench_epoch.py``).
* ``"real"`` (:class:`RealSpaceProjection`): the FFT of real-space ray sums
  (:func:`fieldkern.cryoem.project`).

Every variant has the same four steps: :meth:`~ForwardModel.select` brings centred ``(n, D,
D)`` data (image spectra, CTFs) to the ``(n, K)`` layout; :meth:`~ForwardModel.prepare` turns a
volume into what the projector reads (with ``for_poses``: what pose steps differentiate);
:meth:`~ForwardModel.bind` fixes a batch's poses; :meth:`~ForwardModel.predict` (volume steps,
differentiable in the volume) and :meth:`~ForwardModel.predict_posed` (pose steps,
differentiable in the rotations) give ``CTF * P(R)``.
"""

from __future__ import annotations

import torch

from fieldkern.cryoem.fourier import fft2_centered
from fieldkern.cryoem.fourier_slice import central_slices, padded_size, volume_spectrum
from fieldkern.cryoem.projection import project
from fieldkern.cryoem.slice_taps import (
    gradient_spectra,
    half_plane,
    sample_positions,
    sample_slices,
    slice_taps,
    spectrum_table,
    take_slices,
)


class ForwardModel:
    """Projections of a ``D``-voxel volume compared on the full ``D x D`` frequency grid."""

    weight: torch.Tensor | None = None  # per-frequency loss weights (None: all 1)

    def __init__(self, D: int, device=None):
        self.D = D
        self.device = device

    def select(self, spectra: torch.Tensor) -> torch.Tensor:
        """Centred ``(n, D, D)`` spectra (or CTFs) -> ``(n, K)`` at the compared frequencies."""
        return spectra.flatten(-2)

    def prepare(self, volume: torch.Tensor, for_poses: bool = False):
        return volume

    def bind(self, rotations: torch.Tensor):
        """A batch's poses, in the form :meth:`predict` takes (they hold still over its volume steps)."""
        return rotations.float()

    def predict(self, prepared, bound, ctf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_posed(self, prepared, rotations: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
        return self.predict(prepared, self.bind(rotations), ctf)

    def per_image_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image real-space MSE, by Parseval: ``sum_k w_k |dF_k|^2 / D^4`` (the mean over
        the ``D x D`` plane, divided by ``D^2``; the weights sum to ``D^2``)."""
        diff = (pred - target).abs().square()
        if self.weight is not None:
            diff = diff * self.weight
        return diff.sum(-1) / self.D**4


class RealSpaceProjection(ForwardModel):
    """``CTF * FFT(project(V, R))`` on the full plane."""

    def predict(self, volume, rotations, ctf):
        return ctf * fft2_centered(project(volume, rotations)).flatten(-2)


class GridSampleSlices(ForwardModel):
    """Central slices by ``grid_sample`` on the full plane, autograd for every gradient."""

    def prepare(self, volume, for_poses=False):
        return volume_spectrum(volume)

    def predict(self, spectrum, rotations, ctf):
        return ctf * central_slices(spectrum, rotations, self.D).flatten(-2)


class TapSlices(ForwardModel):
    """Central slices on the half plane from precomputed taps (:mod:`fieldkern.cryoem.slice_taps`)."""

    def __init__(self, D: int, device=None):
        super().__init__(D, device)
        self.plane = half_plane(D, device)
        self.weight = self.plane.weight
        self.P = padded_size(2, D)  # volume_spectrum's default oversampling

    def select(self, spectra):
        return self.plane.select(spectra)

    def prepare(self, volume, for_poses=False):
        """The spectrum as a tap table; for pose steps with its gradient columns."""
        return spectrum_table(volume_spectrum(volume), gradient_spectra(volume) if for_poses else None)

    def bind(self, rotations):
        return slice_taps(sample_positions(rotations.float(), self.plane, self.P), self.P)

    def predict(self, table, taps, ctf):
        return ctf * take_slices(table, taps)

    def predict_posed(self, table, rotations, ctf):
        positions = sample_positions(rotations.float(), self.plane, self.P)
        return ctf * sample_slices(table, positions, self.P)


FORWARD_MODELS = {"fourier": TapSlices, "grid_sample": GridSampleSlices, "real": RealSpaceProjection}


def forward_model(projector: str, D: int, device=None) -> ForwardModel:
    """The forward model named ``projector`` (a key of :data:`FORWARD_MODELS`) for ``D``-voxel volumes."""
    if projector not in FORWARD_MODELS:
        raise ValueError(f"projector must be one of {tuple(FORWARD_MODELS)}, got {projector!r}")
    return FORWARD_MODELS[projector](D, device)


__all__ = ["FORWARD_MODELS", "ForwardModel", "GridSampleSlices", "RealSpaceProjection", "TapSlices",
           "forward_model"]
