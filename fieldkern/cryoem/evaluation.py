"""How good a reconstruction is: FSC resolution against a ground-truth map or between half
maps, after rigid alignment, and the pose errors.

Against a ground truth (:func:`evaluate`) every scale is measured at
:data:`GROUND_TRUTH_THRESHOLD` after one alignment of the finest map (the scales share a
frame). Without one, the particles are split in two halves (:func:`split_halves`), each is
reconstructed independently, and :func:`evaluate_half_maps` reports the FSC between the two
maps at :data:`HALF_MAP_THRESHOLD` (the "gold-standard" FSC of RELION and cryoSPARC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fieldkern.cryoem.alignment import FLIP_Z, align_volume
from fieldkern.cryoem.fsc import fourier_shell_correlation, resolution
from fieldkern.cryoem.io import ParticleDataset
from fieldkern.cryoem.poses import pose_errors_deg
from fieldkern.cryoem.projection import transform_volume

#: FSC threshold against a ground-truth map (the paper's criterion).
GROUND_TRUTH_THRESHOLD = 0.5
#: FSC threshold between independently refined half maps (Rosenthal & Henderson 2003; RELION,
#: cryoSPARC): the resolution of the map averaged from both halves.
HALF_MAP_THRESHOLD = 0.143


@dataclass
class Evaluation:
    """FSC resolution per scale (``fsc_threshold`` against ``fsc_against``: ``"ground truth"``
    or ``"half maps"``), the rigid alignment applied, pose errors, and the maps to write
    (aligned to the ground truth, or averaged from the aligned half maps)."""

    resolution_angstrom: list[float]
    fsc: list[list[float]]
    alignment: dict
    pose_error_deg: dict | None
    aligned_maps: list[torch.Tensor] = field(repr=False, default_factory=list)
    fsc_against: str = "ground truth"
    fsc_threshold: float = GROUND_TRUTH_THRESHOLD
    half_maps: list[list[torch.Tensor]] = field(repr=False, default_factory=list)
    #: The alignment's transform (``transform_volume``'s matrix and shift), None without one.
    transform: tuple[torch.Tensor, torch.Tensor] | None = field(repr=False, default=None)
    #: Half sets measured against a ground truth: the half maps' own resolutions (FSC 0.143).
    half_map_resolution: list[float] | None = None


def pose_error_summary(initial: torch.Tensor, final: torch.Tensor, truth: torch.Tensor | None,
                       aligned: torch.Tensor | None = None) -> dict | None:
    """Mean and median angle (degrees) of the initial and final poses from ``truth``, and of
    the final poses moved into the truth's frame (``aligned``, from
    :func:`poses_in_reference_frame`) when given."""
    if truth is None:
        return None

    def summary(poses):
        errors = pose_errors_deg(poses, truth)
        return {"mean": float(errors.mean()), "median": float(errors.median())}

    out = {"initial": summary(initial), "final": summary(final)}
    if aligned is not None:
        out["final_aligned"] = summary(aligned)
    return out


def poses_in_reference_frame(rotations: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Poses ``(N, 3, 3)`` of the map moved by ``transform_volume(V, matrix, t)`` (an alignment
    to a reference) that give the same images, as proper rotations: ``R M^T``, and for a
    mirroring ``M`` (det -1) ``F R M^T`` with ``F = diag(1, 1, -1)``: a flip along the
    projection axis leaves a projection unchanged. So the poses of a mirrored reconstruction
    can be compared with the truth's (the shift only moves the images)."""
    M = matrix.to(torch.float64)
    R = rotations.to(torch.float64) @ M.T
    if torch.linalg.det(M) < 0:
        R = FLIP_Z.to(R) @ R
    return R


def _alignment_dict(al) -> dict:
    eye = torch.eye(3, dtype=torch.float64)[None]
    return {
        "rotation_deg": float(pose_errors_deg(al.rotation[None], eye)[0]),
        "flipped": bool(al.flipped),
        "shift_voxels": [float(s) for s in al.shift],
        "score": float(al.score),
    }


def _aligned_fsc(maps: list[torch.Tensor], references: list[torch.Tensor], apix: float, threshold: float,
                 **align):
    """Align the finest of ``maps`` to the finest reference (``align_volume(**align)``), move
    every scale by that one transform (the scales share a frame) and measure each against its
    reference: ``(alignment result, moved maps, FSC curves, resolutions at threshold)``."""
    al = align_volume(maps[-1].to(torch.float64), references[-1], **align)
    moved, curves, res = [], [], []
    for v, ref in zip(maps, references):
        va = transform_volume(v.to(torch.float64), al.matrix, al.shift)
        _, f = fourier_shell_correlation(va, ref)
        moved.append(va)
        curves.append([float(x) for x in f])
        res.append(resolution(f, apix, threshold))
    return al, moved, curves, res


def evaluate(volumes: list[torch.Tensor], ground_truth: torch.Tensor | None, apix: float,
             initial: torch.Tensor, final: torch.Tensor, truth: torch.Tensor | None,
             flip: bool = False) -> Evaluation:
    """FSC resolution (0.5 criterion) of every scale (``volumes``: ``(D, D, D)`` maps, coarsest
    first) against the ground truth (``apix`` A/voxel), after one rigid alignment of the finest
    map (applied to all scales: they share a frame), and pose errors of the ``initial`` and
    ``final`` poses ``(N, 3, 3)`` from ``truth`` (None: not known), the final ones also after
    moving them into the truth's frame by that alignment (``final_aligned``). ``flip``: the alignment may
    mirror the map, for reconstructions whose hand the data did not fix (a global pose search:
    projections determine a map only up to its mirror image)."""
    if ground_truth is None:
        return Evaluation([], [], {}, pose_error_summary(initial, final, truth), [v.clone() for v in volumes])
    gt = ground_truth.to(torch.float64)
    al, aligned, curves, res = _aligned_fsc(volumes, [gt] * len(volumes), apix, GROUND_TRUTH_THRESHOLD, flip=flip)
    poses = pose_error_summary(initial, final, truth, poses_in_reference_frame(final, al.matrix))
    # alignment: how far the reconstruction's frame drifted from the ground truth's.
    return Evaluation(res, curves, _alignment_dict(al), poses, aligned, transform=(al.matrix, al.shift))


def split_halves(ds: ParticleDataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Particle indices of the two half sets for a gold-standard FSC, each sorted.

    RELION's ``rlnRandomSubset`` column (1 or 2) when the STAR file has one, so the halves
    are those of the refinement that made the poses; otherwise a random split (seeded by
    ``seed``) into halves of ``ceil(N/2)`` and ``floor(N/2)`` particles.
    Raises ValueError for fewer than two particles or a subset column with other values or
    an empty half.
    """
    n = len(ds)
    if n < 2:
        raise ValueError(f"{ds.star_path}: half maps need at least 2 particles, got {n}")
    parts = ds.particles
    if parts is not None and "rlnRandomSubset" in parts.columns:
        subset = torch.as_tensor(parts["rlnRandomSubset"].to_numpy(dtype="float64"))
        halves = tuple(torch.nonzero(subset == h).flatten() for h in (1, 2))
        if len(halves[0]) + len(halves[1]) != n or not (len(halves[0]) and len(halves[1])):
            values = sorted({float(v) for v in subset.tolist()})[:5]
            raise ValueError(f"{ds.star_path}: rlnRandomSubset must be 1 or 2 with both halves non-empty, "
                             f"got values {values}")
        return halves
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 31))
    first = order[: (n + 1) // 2].sort().values
    second = order[(n + 1) // 2:].sort().values
    return first, second


def evaluate_half_maps(half1: list[torch.Tensor], half2: list[torch.Tensor], apix: float,
                       global_search: bool = False) -> Evaluation:
    """Gold-standard FSC of two independent reconstructions (lists of per-scale maps).

    Half 2's finest map is rigidly aligned to half 1's by a local refinement from the identity
    (the halves start from the same poses' frame but refine them independently, so the frames
    may drift apart by a degree or two; a global search could lock onto noise) and the same
    transform is applied to each of its scales (``global_search``: a global search that may
    mirror instead, for halves reconstructed ab initio, each in a frame and hand of its own); per scale, the FSC between the halves and the
    resolution at :data:`HALF_MAP_THRESHOLD`. The maps to write are the averages of half 1
    and aligned half 2. ``pose_error_deg`` is left None (see :func:`pose_error_summary`).
    """
    if len(half1) != len(half2):
        raise ValueError(f"half maps must have the same number of scales, got {len(half1)} and {len(half2)}")
    a = [v.to(torch.float64) for v in half1]
    align = {"flip": True} if global_search else {"local": True}
    al, b, curves, res = _aligned_fsc(half2, a, apix, HALF_MAP_THRESHOLD, **align)
    alignment = {**_alignment_dict(al), "matrix": al.matrix.tolist()}
    return Evaluation(res, curves, alignment, None, [(v1 + v2) / 2 for v1, v2 in zip(a, b)],
                      fsc_against="half maps", fsc_threshold=HALF_MAP_THRESHOLD, half_maps=[a, b],
                      transform=(al.matrix, al.shift))


def poses_in_aligned_frame(rotations: torch.Tensor, shifts_A: torch.Tensor, matrix: torch.Tensor,
                           shift: torch.Tensor, apix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses ``(N, 3, 3)`` and RELION origins ``(N, 2)`` (A) that explain the same images with
    the map moved by ``transform_volume(V, matrix, shift)`` (``shift`` in voxels, x y z).

    ``project(transform_volume(V, M, t), R M^T)`` is ``project(V, R)`` moved by
    ``(R M^T t)_xy``, so the pose becomes ``R M^T`` (made proper for a mirroring ``M``:
    :func:`poses_in_reference_frame`) and the origin (which centres the image when added)
    grows by that in-plane shift.
    """
    M = matrix.to(torch.float64)
    moved = ((rotations.to(torch.float64) @ M.T) @ shift.to(torch.float64))[:, :2]
    return poses_in_reference_frame(rotations, M), shifts_A.to(torch.float64) + moved * apix


__all__ = [
    "GROUND_TRUTH_THRESHOLD",
    "HALF_MAP_THRESHOLD",
    "Evaluation",
    "evaluate",
    "evaluate_half_maps",
    "pose_error_summary",
    "poses_in_aligned_frame",
    "poses_in_reference_frame",
    "split_halves",
]
