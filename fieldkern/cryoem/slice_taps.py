"""Central slices as sparse trilinear interpolation: precomputed taps, a sparse product forward,
a scatter-add adjoint.

The training forward model samples a volume's oversampled 3D spectrum
(:func:`fieldkern.cryoem.fourier_slice.volume_spectrum`) on each image's central plane.
:func:`fieldkern.cryoem.fourier_slice.central_slices` does that with 3D ``grid_sample``; on a
CPU its backward (a scatter over the spectrum that recomputes every tap) took most of a
training epoch. Here the 8 trilinear taps of every sample are computed once per set of
rotations and held as a sparse matrix ``M`` (a row per sample, a column per spectrum voxel),
so that a batch's five volume steps reuse them:

* forward: ``M @ table``, one sparse-dense product (``table``: the spectrum as real columns);
* adjoint (the spectrum's gradient): each tap's weight times the output's gradient, summed
  into the table's rows: a weighted ``bincount`` on the CPU, ``index_add_`` elsewhere
  (:func:`scatter_taps`).

Only half of each image plane is sampled (:class:`HalfPlane`). The volume is real, so its
spectrum is Hermitian, ``S(-q) = conj(S(q))``; so are the particle images' spectra, and the
CTF is even. A frequency ``k`` and its mirror ``-k`` then contribute the same term to a
loss over the plane, which is the weighted sum over one half (weight 2 for a frequency whose
mirror is on the grid, 1 for the zero frequency and the unpaired row and column at
``-D/2``). For the mirror symmetry to hold exactly in the sampled spectrum, its planes at
index 0 (the padded grid's Nyquist frequency, which has no ``+P/2`` partner) are left out:
they are reached only by samples beyond ``|k| = D/2 - 1`` along an axis, in the plane's
corners beyond the Nyquist circle.

Pose refinement needs the slices' derivative with respect to the sample positions. For that
:func:`spectrum_table` can append the spectrum's gradient (the transforms of ``-2 pi i x_j /
P`` times the volume, interpolated with the same taps): one product gives each sample's
value and its smooth gradient (:func:`sample_slices`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from fieldkern.cryoem.fourier import frequency_indices

#: Zero voxels around the spectrum in the table: a sample outside the spectrum is clamped
#: into this border, where all 8 taps (and so the value and its gradient) are zero, as
#: ``grid_sample`` with zero padding gives.
_BORDER = 2


@dataclass(frozen=True)
class HalfPlane:
    """The frequencies of a ``D x D`` centred image spectrum that are sampled, and their weights.

    Attributes:
        k: ``(K, 2)`` frequencies ``(k_x, k_y)`` in Fourier pixels of the image.
        index: ``(K,)`` flat indices ``row * D + column`` of those frequencies in a centred
            ``(D, D)`` array (so ``spectra.flatten(-2)[..., index]`` selects them).
        weight: ``(K,)`` 2 where the mirror frequency ``-k`` is on the grid too, else 1;
            sums to ``D^2``, so ``(weight * |r|^2).sum() / D^2`` is the mean over the full plane.
    """

    D: int
    k: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return self.index.numel()

    def select(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(..., D, D)`` centred spectra -> ``(..., K)`` values at the plane's frequencies."""
        return spectra.flatten(-2)[..., self.index.to(spectra.device)]


def half_plane(D: int, device=None) -> HalfPlane:
    """The half of a ``D x D`` frequency grid that a Hermitian spectrum is determined by.

    Kept: ``k_y > 0``, the positive ``k_x`` of the row ``k_y = 0``, the zero frequency, and the
    row and column at ``-D/2`` (whose mirrors ``+D/2`` are not on the grid), ``D^2 / 2 + D``
    frequencies in all.
    """
    k = frequency_indices(D, dtype=torch.float64)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    ky, kx = ky.flatten(), kx.flatten()
    unpaired = (kx == -(D // 2)) | (ky == -(D // 2))
    zero = (kx == 0) & (ky == 0)
    positive = (ky > 0) | ((ky == 0) & (kx > 0))
    keep = unpaired | zero | positive
    weight = torch.where(unpaired | zero, 1.0, 2.0)[keep]
    index = torch.nonzero(keep).flatten()
    return HalfPlane(D, torch.stack([kx[keep], ky[keep]], -1).to(device, torch.float32), index.to(device),
                     weight.to(device, torch.float32))


def spectrum_table(spectrum: torch.Tensor, gradient: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The spectrum ``(P, P, P)`` (complex, centred) as the real table the taps index:
    ``(Q^3, C)`` with ``Q = P + 4`` (the planes at index 0 dropped, a zero border added) and
    ``C = 2`` (real, imaginary), or 8 with the three gradient spectra ``gradient`` appended.
    Differentiable (autograd) with respect to the spectrum."""
    parts = [spectrum] + list(gradient or [])
    table = torch.cat([torch.view_as_real(s[1:, 1:, 1:]) for s in parts], dim=-1)  # (P-1,)*3 x C
    # Index i >= 1 of the spectrum goes to i - 1 + _BORDER + 1 = i + 2: index 0's place, and
    # the border, are zero on both sides.
    lo, hi = _BORDER + 1, _BORDER
    table = torch.nn.functional.pad(table, (0, 0, lo, hi, lo, hi, lo, hi))
    return table.reshape(-1, table.shape[-1])


def table_size(P: int) -> int:
    """Points per axis of :func:`spectrum_table`'s grid for a ``P``-point spectrum."""
    return P - 1 + 2 * _BORDER + 1


@dataclass
class SliceTaps:
    """Trilinear taps of ``n`` samples: 8 flat table indices and weights per sample.

    ``matrix`` is the ``(n, Q^3)`` sparse CSR matrix of them (the forward product);
    ``columns`` and ``weights`` ``(n, 8)`` serve the adjoint.
    """

    columns: torch.Tensor
    weights: torch.Tensor
    matrix: torch.Tensor
    shape: tuple[int, ...]


def sample_positions(rotations: torch.Tensor, plane: HalfPlane, P: int) -> torch.Tensor:
    """Where each image's plane frequencies sit in the spectrum: ``(B, K, 3)`` ``(x, y, z)`` in
    spectrum index units, ``P/2 + (P/D) R^T (k_x, k_y, 0)``."""
    # (R^T k)_j = R[0, j] k_x + R[1, j] k_y: one batched product, in the rotations' dtype
    k = plane.k.to(rotations.device, rotations.dtype)
    return P // 2 + (P / plane.D) * torch.matmul(k, rotations[:, :2, :])


def tap_index_dtype(Q: int, n: int) -> torch.dtype:
    """The taps' index type for ``n`` samples of a table of ``Q^3`` rows: int32 where every
    column and row offset fits (the sparse product runs ~1.7x faster than with int64)."""
    return torch.int32 if max(Q**3, 8 * n + 1) < 2**31 else torch.int64


def slice_taps(positions: torch.Tensor, P: int) -> SliceTaps:
    """The taps of samples at ``positions`` ``(..., 3)`` (spectrum index units, ``(x, y, z)``)."""
    Q = table_size(P)
    shape = tuple(positions.shape[:-1])
    # Into table coordinates (+2, see spectrum_table), clamped inside the zero border.
    p = (positions.reshape(-1, 3) + _BORDER).clamp(0.5, Q - 1.5)
    base = p.floor()
    fx, fy, fz = (p - base).unbind(-1)
    # Computed in the index type from the start: converting (n, 8) int64 columns afterwards
    # is an extra pass over the largest array here, and halved the speed of this function on the CPU.
    n = p.shape[0]
    index = tap_index_dtype(Q, n)
    base = base.to(index)
    flat = (base[:, 2] * Q + base[:, 1]) * Q + base[:, 0]
    # Made on the device: a tensor from host data would be a copy that waits on a GPU.
    corner = torch.arange(8, device=positions.device, dtype=index)
    offsets = (corner >> 2) * (Q * Q) + ((corner >> 1) & 1) * Q + (corner & 1)
    columns = flat[:, None] + offsets  # (n, 8), corners ordered (dz, dy, dx)
    # One product per corner on (n,) vectors: broadcasting over tiny trailing axes is slow.
    zy = [a * b for a in (1 - fz, fz) for b in (1 - fy, fy)]
    weights = torch.stack([a * b for a in zy for b in (1 - fx, fx)], 1)
    crow = torch.arange(0, 8 * n + 1, 8, device=positions.device, dtype=index)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products are all we use
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(crow, columns.reshape(-1), weights.reshape(-1), (n, Q**3),
                                         check_invariants=False)
    return SliceTaps(columns, weights, matrix, shape)


class _TakeTaps(torch.autograd.Function):
    """``taps.matrix @ table`` with the adjoint (a scatter-add) as the table's gradient."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, taps: SliceTaps) -> torch.Tensor:
        ctx.taps = taps
        ctx.rows = table.shape[0]
        return taps.matrix @ table

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return scatter_taps(ctx.taps, grad, ctx.rows), None


#: How :func:`scatter_taps` sums, by device type: ``"bincount"`` (a sequential sum, bitwise
#: repeatable; on the 2-core CPU 20x faster than ``index_add_`` on ``(rows, 2)`` for 100
#: images of D = 32) or ``"index_add"`` (on a GPU ``bincount`` reads its input's extremes
#: back to the host to size its output, a wait per volume step that also forbids CUDA-graph
#: capture; ``index_add_`` does not, and is deterministic under
#: ``torch.use_deterministic_algorithms``).
SCATTER_METHODS = {"cpu": "bincount"}


def scatter_taps(taps: SliceTaps, grad: torch.Tensor, rows: int, method: str | None = None) -> torch.Tensor:
    """The adjoint of ``taps.matrix @ table``: ``(rows, C)`` sums of each tap's weight times
    ``grad`` ``(n, C)`` of its sample. ``method``: ``"bincount"`` or ``"index_add"``; None
    picks by device (:data:`SCATTER_METHODS`, ``"index_add"`` where not listed)."""
    method = SCATTER_METHODS.get(grad.device.type, "index_add") if method is None else method
    columns = taps.columns.reshape(-1)
    if method == "bincount":
        # One weighted bincount per column of the table.
        out = [torch.bincount(columns, (taps.weights * grad[:, c, None]).reshape(-1), minlength=rows)
               for c in range(grad.shape[-1])]
        return torch.stack(out, -1)
    if method == "index_add":
        values = (taps.weights[:, :, None] * grad[:, None, :]).reshape(-1, grad.shape[-1])
        return grad.new_zeros(rows, grad.shape[-1]).index_add_(0, columns, values)
    raise ValueError(f"method must be 'bincount' or 'index_add', got {method!r}")


def take_slices(table: torch.Tensor, taps: SliceTaps) -> torch.Tensor:
    """Complex samples ``(*taps.shape)`` of a 2-column :func:`spectrum_table` at the taps;
    differentiable with respect to the table (the spectrum), not the positions."""
    if table.shape[-1] != 2:
        raise ValueError(f"take_slices needs a value table (2 columns), got {table.shape[-1]}")
    out = _TakeTaps.apply(table, taps)
    return torch.view_as_complex(out.reshape(*taps.shape, 2).contiguous())


def gradient_spectra(volume: torch.Tensor, oversampling: int = 2) -> list[torch.Tensor]:
    """``d S / d q_j`` for ``j = x, y, z`` of ``S = volume_spectrum(volume)``: the transforms of
    ``-2 pi i x_j / P`` times the volume (``x_j`` voxels from the centre ``D // 2``), each
    ``(P, P, P)`` complex, gridding-corrected like ``S`` so that the same taps interpolate them."""
    from fieldkern.cryoem.fourier_slice import padded_size, volume_spectrum

    D = volume.shape[-1]
    P = padded_size(oversampling, D)
    x = frequency_indices(D, device=volume.device, dtype=volume.dtype)
    coords = (x[None, None, :], x[None, :, None], x[:, None, None])  # x, y, z on [z, y, x]
    return [volume_spectrum(volume * c, oversampling) * (-2j * math.pi / P) for c in coords]


class _SmoothSample(torch.autograd.Function):
    """Values of an 8-column table at ``positions``, differentiable with respect to the
    positions through the table's gradient columns (the table itself is held fixed)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, positions: torch.Tensor, P: int) -> torch.Tensor:
        out = slice_taps(positions, P).matrix @ table  # (n, 8): value, d/dx, d/dy, d/dz (re, im)
        ctx.save_for_backward(out)
        return out[:, :2].reshape(*positions.shape[:-1], 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        n = out.shape[0]
        # d loss / d position_j = g_re d re / d q_j + g_im d im / d q_j = Re(conj(g) dS / d q_j)
        dS = torch.view_as_complex(out[:, 2:].reshape(n, 3, 2))
        g = torch.view_as_complex(grad.reshape(n, 2).contiguous())
        return None, (dS * g.conj()[:, None]).real.reshape(*grad.shape[:-1], 3), None


def sample_slices(table: torch.Tensor, positions: torch.Tensor, P: int) -> torch.Tensor:
    """Complex values ``(...)`` of the spectrum at ``positions`` ``(..., 3)`` from an 8-column
    :func:`spectrum_table`, differentiable with respect to the positions (by the smooth gradient
    columns), not the table: pose steps against a fixed map."""
    if table.shape[-1] != 8:
        raise ValueError(f"sample_slices needs a table with gradient columns (8), got {table.shape[-1]}")
    if table.requires_grad:
        raise ValueError("sample_slices holds the table fixed; detach it (pose steps use a fixed map)")
    return torch.view_as_complex(_SmoothSample.apply(table, positions, P).contiguous())


__all__ = [
    "HalfPlane",
    "SliceTaps",
    "gradient_spectra",
    "half_plane",
    "sample_positions",
    "sample_slices",
    "scatter_taps",
    "slice_taps",
    "spectrum_table",
    "table_size",
    "take_slices",
    "tap_index_dtype",
]
