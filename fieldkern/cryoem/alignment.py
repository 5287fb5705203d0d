"""Rigid alignment of a map to a reference (for FSC against a ground truth).

A reconstruction from images is only determined up to the frame of its poses: with pose
refinement the frame can drift (a global rotation and a shift), and ab-initio methods can
also return the mirror image. :func:`align_volume` undoes that before the FSC is measured.

Transform convention: the aligned map is ``out(r) = V(M^T (r - t))`` (see
:func:`fieldkern.cryoem.transform_volume`), i.e. a point ``x`` of the input map goes to
``M x + t`` in the reference frame; ``M = R`` (proper rotation) or ``M = R diag(1, 1, -1)``
when the hand is flipped; ``t`` in voxels ``(x, y, z)``, about the centre voxel D//2.

Search: both maps are Fourier-cropped to a small box; a deterministic, near-uniform grid of
rotations (super-Fibonacci) is scored by normalised cross-correlation maximised over all
translations at once (FFT); the best few (rotation, integer shift) pairs are refined
continuously (L-BFGS on the correlation, rotation and sub-voxel shift together, through the
differentiable trilinear resampler), the winner once more on a larger (still reduced)
box; the final translation is found at full size by FFT cross-correlation with parabolic
sub-voxel refinement and applied as a Fourier shift.

``local=True`` skips both global searches and only refines from the identity: for maps that
are already in nearly the same frame (two half maps refined from the same starting poses),
where the peak of a global search over a noisy pair could lie anywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fieldkern.checks import check_count, check_finite, check_volume
from fieldkern.cryoem.fourier import fourier_crop, fourier_shift
from fieldkern.cryoem.projection import transform_volume
from fieldkern.cryoem.rotations import axis_angle_to_matrix, matmul3, super_fibonacci_rotations

#: The mirror along z (a hand flip), ``diag(1, 1, -1)`` float64.
FLIP_Z = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


@dataclass
class AlignmentResult:
    """Result of :func:`align_volume`.

    Attributes:
        volume: the aligned map ``(D, D, D)`` (input dtype/device).
        matrix: ``M`` (3, 3) float64, ``rotation @ diag(1, 1, -1)`` if ``flipped``.
        rotation: the proper rotation ``R`` (3, 3) float64.
        flipped: whether the hand was flipped.
        shift: ``t`` in voxels ``(x, y, z)`` float64; ``out(r) = V(M^T (r - t))``.
        score: normalised cross-correlation of the aligned map with the reference.
    """

    volume: torch.Tensor
    matrix: torch.Tensor
    rotation: torch.Tensor
    flipped: bool
    shift: torch.Tensor
    score: float


def _normalise(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(dim=(-3, -2, -1), keepdim=True)
    return v / v.flatten(-3).norm(dim=-1).clamp_min(1e-30)[..., None, None, None]


def _scores(
    vol: torch.Tensor, ref_f: torch.Tensor, mats: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best normalised cross-correlation over translations, and its integer shift, per matrix."""
    D = vol.shape[-1]
    best, shifts = [], []
    for i in range(0, mats.shape[0], chunk):
        w = _normalise(transform_volume(vol, mats[i : i + chunk]))
        cc = torch.fft.irfftn(
            ref_f * torch.fft.rfftn(w, dim=(-3, -2, -1)).conj(), s=(D, D, D), dim=(-3, -2, -1)
        )
        flat = cc.flatten(1)
        val, idx = flat.max(dim=1)
        best.append(val)
        shifts.append(idx)
    return torch.cat(best), torch.cat(shifts)


def _unravel_shift(idx: int, D: int) -> torch.Tensor:
    """Flat argmax of a circular cross-correlation -> signed shift (x, y, z) in voxels."""
    z, rem = divmod(idx, D * D)
    y, x = divmod(rem, D)
    wrap = lambda a: a - D if a >= D // 2 else a  # noqa: E731
    return torch.tensor([wrap(x), wrap(y), wrap(z)], dtype=torch.float64)


def _refine(vol: torch.Tensor, ref_n: torch.Tensor, M0: torch.Tensor, t0: torch.Tensor, max_iter: int):
    """Continuous local refinement of (rotation, translation) by L-BFGS on the correlation.

    The rotation is ``exp([w]_x) M0``; ``w`` is scaled so that one unit moves a point at a
    quarter of the box by about one voxel, like one unit of ``t``.
    """
    D = vol.shape[-1]
    scale = D / 4
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    t = t0.clone().to(torch.float64).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, t],
        lr=1,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
    )

    def closure():
        opt.zero_grad()
        M = matmul3(axis_angle_to_matrix(w / scale), M0)
        loss = -(_normalise(transform_volume(vol, M, t)) * ref_n).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        M = matmul3(axis_angle_to_matrix(w / scale), M0)
        score = float((_normalise(transform_volume(vol, M, t)) * ref_n).sum())
    return M.detach(), t.detach(), score


def _subvoxel_peak(cc: torch.Tensor, idx: int) -> torch.Tensor:
    """Parabolic refinement of the circular cross-correlation peak, shift (x, y, z)."""
    D = cc.shape[-1]
    base = _unravel_shift(idx, D)
    z, rem = divmod(idx, D * D)
    y, x = divmod(rem, D)
    pos = [x, y, z]
    out = base.clone()
    for axis in range(3):  # axis 0 = x = last array dim

        def val(o, axis=axis):
            p = list(pos)
            p[axis] = (p[axis] + o) % D
            return float(cc[p[2], p[1], p[0]])

        ym, y0, yp = val(-1), val(0), val(1)
        den = ym - 2 * y0 + yp
        if den < 0:
            out[axis] += max(-0.5, min(0.5, 0.5 * (ym - yp) / den))
    return out


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """Temporarily set torch's intra-op thread count (restored on exit).

    The search runs thousands of ops on tensors of 10^3-10^5 elements: too small for
    threading to pay, and on a busy CPU each threaded op can cost milliseconds of
    synchronisation (measured: a 32^3 refinement went from ~10 s to well under 1 s on a
    loaded 2-core machine with one thread).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def align_volume(
    volume: torch.Tensor,
    reference: torch.Tensor,
    *,
    flip: bool = False,
    search_size: int = 16,
    refine_size: int = 32,
    n_rotations: int = 1536,
    n_candidates: int = 4,
    max_iter: int = 50,
    chunk: int = 256,
    local: bool = False,
) -> AlignmentResult:
    """Rigidly align ``volume`` to ``reference`` (both ``(D, D, D)``, same voxel size).

    Args:
        volume: map to move; reference: fixed map.
        flip: also try the mirror image (handedness flip) and keep the better hand.
        search_size: box of the coarse rotation search (Fourier-cropped, even, <= D).
        refine_size: box of the local refinement (even, <= D).
        n_rotations: coarse grid size (1536: neighbours ~18 degrees apart, a rotation at most ~19
            from the nearest).
        n_candidates: coarse maxima refined locally (per hand).
        max_iter: L-BFGS iterations per local refinement.
        chunk: rotations scored per batch (memory ~ chunk * search_size^3).
        local: refine rotation and shift from the identity only (no global rotation or
            translation search; ``flip`` must be False).

    Returns:
        :class:`AlignmentResult`: aligned map, transform ``out(r) = V(M^T (r - t))``, score.
        Seconds on 2 CPU cores at D = 32-64 with the defaults.
    """
    n_rotations = check_count("n_rotations", n_rotations)
    n_candidates = check_count("n_candidates", n_candidates)
    max_iter = check_count("max_iter", max_iter)
    chunk = check_count("chunk", chunk)
    if local and flip:
        raise ValueError("local=True refines from the identity and cannot flip the hand; pass flip=False")
    search = _Search(flip, search_size, refine_size, n_rotations, n_candidates, max_iter, chunk, local)
    with _intra_op_threads(1):
        return _align_volume(volume, reference, search)


@dataclass(frozen=True)
class _Search:
    """:func:`align_volume`'s search settings (its arguments of the same names)."""

    flip: bool
    search_size: int
    refine_size: int
    n_rotations: int
    n_candidates: int
    max_iter: int
    chunk: int
    local: bool


def _box_sizes(volume, reference, search_size, refine_size) -> tuple[int, int, int]:
    """The maps' box D and the (checked) boxes of the search and of the refinement."""
    D = check_volume("volume", volume)
    D_ref = check_volume("reference", reference)
    if D_ref != D:
        raise ValueError(
            f"reference must have the volume's shape {tuple(volume.shape)}, got {tuple(reference.shape)}"
        )
    s_size = min(int(search_size), D)
    r_size = min(max(int(refine_size), s_size), D)
    for name, n in (("search_size", s_size), ("refine_size", r_size)):
        if n < 4 or n % 2:
            raise ValueError(f"{name} must be an even number >= 4, got {n}")
    return D, s_size, r_size


def _align_volume(volume: torch.Tensor, reference: torch.Tensor, search: _Search) -> AlignmentResult:
    D, s_size, r_size = _box_sizes(volume, reference, search.search_size, search.refine_size)
    v64 = volume.detach().to(torch.float64).cpu()
    r64 = reference.detach().to(torch.float64).cpu()
    # A NaN map scores 0 everywhere and would come back as a finite all-zero "alignment".
    check_finite("volume", v64)
    check_finite("reference", r64)
    v_s, r_s = fourier_crop(v64, s_size, 3), fourier_crop(r64, s_size, 3)
    v_r, r_r = fourier_crop(v64, r_size, 3), fourier_crop(r64, r_size, 3)
    if search.local:
        cands = [(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), False)]
    else:
        cands = _global_candidates(v_s, r_s, search)

    # Refine every candidate on the search box, then the best one on the refine box.
    ref_s_n = _normalise(r_s)
    refined = []
    for M0, t0, h in cands:
        M, t, score = _refine(v_s, ref_s_n, M0, t0, search.max_iter)
        refined.append((score, M, t, h))
    _, M, t, flipped = max(refined, key=lambda c: c[0])
    if r_size != s_size:
        M, t, _ = _refine(v_r, _normalise(r_r), M, t * (r_size / s_size), search.max_iter)

    rotated = transform_volume(v64, M)
    if search.local:
        t = t * (D / r_size)  # the refined shift, from the refine box's voxels to the map's
    else:
        t = _full_size_shift(rotated, r64)
    aligned = fourier_shift(rotated, t, 3)
    score = float((_normalise(aligned) * _normalise(r64)).sum())
    R = matmul3(M, FLIP_Z) if flipped else M
    return AlignmentResult(
        volume=aligned.to(dtype=volume.dtype, device=volume.device),
        matrix=M.clone(),
        rotation=R.clone(),
        flipped=flipped,
        shift=t,
        score=score,
    )


def _global_candidates(v_s: torch.Tensor, r_s: torch.Tensor, search: _Search) -> list:
    """The ``search.n_candidates`` best ``(matrix, integer shift, flipped)`` of the rotation grid
    per hand, for the maps cropped to the search box."""
    ref_s_f = torch.fft.rfftn(_normalise(r_s))
    grid = super_fibonacci_rotations(search.n_rotations)
    cands = []
    for h in [False, True] if search.flip else [False]:
        mats = matmul3(grid, FLIP_Z) if h else grid
        scores, peaks = _scores(v_s, ref_s_f, mats, search.chunk)
        top = torch.topk(scores, min(search.n_candidates, scores.numel())).indices
        cands += [(mats[i], _unravel_shift(int(peaks[i]), v_s.shape[-1]), h) for i in top.tolist()]
    return cands


def _full_size_shift(rotated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The shift ``(x, y, z)`` (voxels) that best overlays ``rotated`` on ``reference``: the peak
    of their full-size FFT cross-correlation, refined to a sub-voxel one."""
    D = rotated.shape[-1]
    ref_f = torch.fft.rfftn(_normalise(reference))
    cc = torch.fft.irfftn(ref_f * torch.fft.rfftn(_normalise(rotated)).conj(), s=(D, D, D))
    return _subvoxel_peak(cc, int(cc.flatten().argmax()))
