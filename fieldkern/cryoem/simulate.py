"""Simulated particle data sets, as in the paper (its appendix B).

Image formation per particle ``i``:
``I_i = apply_ctf(project(V, R_i), ctf(P, apix, dfU_i, dfV_i, dfang_i, ...)) + noise``
with ``R_i`` uniform on SO(3), no shifts, the CTF applied on a ``P = ctf_pad * D`` padded
grid, and white Gaussian noise at the given data-set SNR (``var`` of all clean pixels of
all images over the noise variance; :mod:`fieldkern.cryoem.noise`). The paper's settings:
50,000 particles, SNR 0.1, dfU ~ U(15000, 20000) A, dfU - dfV ~ U(100, 500) A, angle
~ U(0, 360) degrees, 300 kV, Cs 2.7 mm, w = 0.1. Box and pixel size were not published;
the default here is 80 pixels of 1.25 A (a 100 A box around structures reaching ~37 A from
their centre; Nyquist 2.5 A, finer than the reported 2.65-2.91 A).

The defocus U is the larger one (dfV = dfU - astigmatism), as CTFFIND reports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from fieldkern.checks import check_box_size, check_count, check_finite, check_positive, check_volume
from fieldkern.cryoem._checks import check_amplitude_contrast, check_defocus_angstrom, check_voltage_kv
from fieldkern.cryoem.ctf import apply_ctf, ctf
from fieldkern.cryoem.density import density_from_structure
from fieldkern.cryoem.io import CTFParams, write_mrc, write_particles_star
from fieldkern.cryoem.projection import project
from fieldkern.cryoem.rotations import matrix_to_relion_euler, random_rotations, relion_euler_to_matrix

#: The paper's data-set settings (box/apix are fieldkern's choice; see the module docstring).
PAPER_SETTINGS = {
    "n_particles": 50_000,
    "box": 80,
    "apix": 1.25,
    "snr": 0.1,
    "defocus_range": (15000.0, 20000.0),
    "astigmatism_range": (100.0, 500.0),
    "defocus_angle_range": (0.0, 360.0),
    "volt": 300.0,
    "cs": 2.7,
    "w": 0.1,
}

STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
VOLUME_NAME = "ground_truth.mrc"
METADATA_NAME = "simulation.json"


@dataclass
class SimulationResult:
    """What :func:`simulate` wrote, plus the ground truth it drew.

    Attributes:
        star_path, stack_path, volume_path, metadata_path: the files written.
        n_particles, box, apix: data-set size, image size D, pixel size (A).
        snr: target SNR (None: no noise); noise_sigma: the noise standard deviation used.
        ctf_pad: padding factor of the CTF application.
        rotations: ``(N, 3, 3)`` float64 true poses; euler_deg: their ``(N, 3)`` RELION angles.
        ctf_params: the per-particle CTF parameters written to the STAR file.
    """

    star_path: Path
    stack_path: Path
    volume_path: Path
    metadata_path: Path
    n_particles: int
    box: int
    apix: float
    snr: float | None
    noise_sigma: float
    ctf_pad: int
    rotations: torch.Tensor
    euler_deg: torch.Tensor
    ctf_params: CTFParams


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    if not lo <= hi:
        raise ValueError(f"range must satisfy low <= high, got ({lo}, {hi})")
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def simulate(
    structure,
    out_dir: str | PathLike,
    n_particles: int = PAPER_SETTINGS["n_particles"],
    box: int | None = None,
    apix: float | None = None,
    *,
    snr: float | None = PAPER_SETTINGS["snr"],
    seed: int = 0,
    defocus_range=PAPER_SETTINGS["defocus_range"],
    astigmatism_range=PAPER_SETTINGS["astigmatism_range"],
    defocus_angle_range=PAPER_SETTINGS["defocus_angle_range"],
    volt: float = PAPER_SETTINGS["volt"],
    cs: float = PAPER_SETTINGS["cs"],
    w: float = PAPER_SETTINGS["w"],
    ctf_pad: int = 2,
    resolution: float | None = None,
    batch_size: int = 256,
    device=None,
    progress: bool = True,
    overwrite: bool = False,
) -> SimulationResult:
    """Simulate a particle data set and write it as RELION files.

    Args:
        structure: packaged name (``"4ake"``, ``"1ol5"``), PDB/mmCIF path, or a ``(D, D, D)``
            volume tensor (then ``apix`` is required and ``box`` must be D or None).
        out_dir: folder for ``particles.mrcs`` (stack, pixel size in the header),
            ``particles.star`` (RELION 3.1, poses and CTF), ``ground_truth.mrc`` (the map,
            with its voxel size) and ``simulation.json`` (settings).
        n_particles: N; box: D (default 80 for structures); apix: A/pixel (default 1.25).
        snr: data-set SNR (None: no noise).
        seed: seeds the one ``torch.Generator`` that draws rotations, CTF parameters and
            noise (in that order), so a seed fixes the data set.
        defocus_range, astigmatism_range, defocus_angle_range: uniform ranges (A, A, degrees).
        volt, cs, w: kV, mm, amplitude contrast.
        ctf_pad: the CTF is applied on a ``ctf_pad * D`` grid (see :func:`apply_ctf`).
        resolution: of the density map from a structure (see :func:`density_from_structure`).
        batch_size: images projected per batch; device: where to project (default CPU).
        progress: tqdm progress bars; overwrite: replace existing files.

    Returns:
        :class:`SimulationResult` (paths, true poses and CTF parameters).
    """
    # Long by its signature and Args (17 settings); the steps are named helpers below.
    n_particles = check_count("n_particles", n_particles)
    ctf_pad = check_count("ctf_pad", ctf_pad)
    batch_size = check_count("batch_size", batch_size)
    # CTF units checked before any file is written (the per-batch CTF would catch them later)
    check_finite("defocus_range", defocus_range)
    check_defocus_angstrom("defocus_range", defocus_range)
    check_voltage_kv("volt", volt)
    check_amplitude_contrast("w", w)
    if snr is not None:
        snr = check_positive("snr", snr)
    device = torch.device("cpu") if device is None else torch.device(device)
    volume, D, apix, source = _volume(structure, box, apix, resolution)
    paths = _output_paths(Path(out_dir), overwrite)
    gen = torch.Generator().manual_seed(int(seed))
    # drawn in this order (rotations, then the CTFs, then the noise), so a seed fixes the data set
    rotations, euler = _draw_poses(n_particles, gen)
    params = _draw_ctf_params(n_particles, gen, defocus_range, astigmatism_range, defocus_angle_range,
                              optics=(volt, cs, w))
    meta = {
        "source": source, "n_particles": n_particles, "box": D, "apix": apix, "snr": snr,
        "snr_definition": "var(all clean pixels of all images) / var(noise)",
        "noise_sigma": None, "seed": int(seed), "ctf_pad": ctf_pad,
        "ctf_sign": "CTF(0) = -w (cryoDRGN convention; RELION's getCTF is the negative)",
        "defocus_range": list(defocus_range), "astigmatism_range": list(astigmatism_range),
        "defocus_angle_range": list(defocus_angle_range), "volt": volt, "cs": cs, "w": w,
        "resolution": resolution, "shifts": "none",
    }
    sigma = _write_files(paths, meta, volume, rotations, euler, params, gen=gen, batch_size=batch_size,
                         device=device, progress=progress)
    return SimulationResult(
        star_path=paths["star"], stack_path=paths["stack"], volume_path=paths["volume"],
        metadata_path=paths["meta"], n_particles=n_particles, box=D, apix=apix, snr=snr, noise_sigma=sigma,
        ctf_pad=ctf_pad, rotations=rotations, euler_deg=euler, ctf_params=params,
    )


def _draw_poses(N: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations ``(N, 3, 3)`` float64, uniform on SO(3), and their RELION Euler angles
    ``(N, 3)`` (degrees)."""
    rotations = random_rotations(N, generator=gen, dtype=torch.float64)
    # The STAR file stores Euler angles; the matrices they give back (not the drawn ones,
    # which differ by ~1e-16) are the poses the images are made with, so files and images
    # agree to rounding.
    euler = matrix_to_relion_euler(rotations)
    return relion_euler_to_matrix(euler), euler


def _draw_ctf_params(N: int, gen: torch.Generator, defocus_range, astigmatism_range, defocus_angle_range, *,
                     optics) -> CTFParams:
    """Per-particle CTFs: defocus U, astigmatism (dfV = dfU - it) and angle uniform on their
    ranges (A, A, degrees), drawn from ``gen`` in this order; ``optics = (volt, cs, w)`` (kV, mm,
    amplitude contrast) shared by all; no phase shift or B-factor."""
    dfu = _uniform(N, *defocus_range, gen)
    dfv = dfu - _uniform(N, *astigmatism_range, gen)
    dfang = _uniform(N, *defocus_angle_range, gen)
    volt, cs, w = (torch.full((N,), float(v), dtype=torch.float64) for v in optics)
    zeros = torch.zeros(N, dtype=torch.float64)
    return CTFParams(dfu=dfu, dfv=dfv, dfang=dfang, volt=volt, cs=cs, w=w, phase_shift=zeros, bfactor=zeros)


def _write_files(paths, meta, volume, rotations, euler, params: CTFParams, *, gen, batch_size, device,
                 progress) -> float:
    """Write the map, the stack, the STAR file and ``simulation.json`` (``meta`` with the noise
    sigma filled in); returns the noise sigma. A simulation that fails part-way (a device or
    backend that cannot run, a full disk, an interrupt) removes what it wrote: never an
    all-zero stack that looks like data. The stack is filled under a temporary name and
    renamed when complete, so a process killed outright leaves no partial stack by its name."""
    N, D, apix = meta["n_particles"], meta["box"], meta["apix"]
    partial = paths["stack"].with_name(paths["stack"].name + ".partial")
    try:
        write_mrc(paths["volume"], volume, apix)
        sigma = _write_stack(partial, volume, rotations, params, apix=apix, ctf_pad=meta["ctf_pad"],
                             snr=meta["snr"], gen=gen, batch_size=batch_size, device=device, progress=progress)
        os.replace(partial, paths["stack"])
        write_particles_star(
            paths["star"], image_names=[f"{i + 1:06d}@{STACK_NAME}" for i in range(N)], euler_deg=euler,
            dfu=params.dfu, dfv=params.dfv, dfang=params.dfang, apix=apix, box=D, volt=meta["volt"],
            cs=meta["cs"], w=meta["w"], extra_columns={"rlnRandomSubset": (torch.arange(N) % 2 + 1)},
        )
        paths["meta"].write_text(json.dumps({**meta, "noise_sigma": sigma}, indent=2) + "\n")
    except BaseException:
        for path in (*paths.values(), partial):
            path.unlink(missing_ok=True)
        raise
    return sigma


def _volume(structure, box, apix, resolution) -> tuple[torch.Tensor, int, float, str]:
    """The map to project ``(D, D, D)`` float32, its box D and voxel size (A), and its source."""
    if isinstance(structure, torch.Tensor):
        D = check_volume("structure", structure)
        if box is not None and box != D:
            raise ValueError(f"box ({box}) must match the volume's size {D} (or be None)")
        if apix is None:
            raise ValueError("apix is required when structure is a volume tensor")
        apix = check_positive("apix", apix)
        volume = structure.detach().to(torch.float32)
        # NaN/inf would make every image NaN; load_particles would only notice much later
        check_finite("structure", volume)
        return volume, D, apix, "volume tensor"
    D = check_box_size("box", PAPER_SETTINGS["box"] if box is None else box)
    apix = check_positive("apix", PAPER_SETTINGS["apix"] if apix is None else apix)
    return density_from_structure(structure, D, apix, resolution=resolution), D, apix, str(structure)


def _output_paths(out: Path, overwrite: bool) -> dict[str, Path]:
    """The files of a simulation in ``out`` (created); FileExistsError unless ``overwrite``."""
    out.mkdir(parents=True, exist_ok=True)
    names = (("stack", STACK_NAME), ("star", STAR_NAME), ("volume", VOLUME_NAME), ("meta", METADATA_NAME))
    paths = {k: out / v for k, v in names}
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"files exist (pass overwrite=True): {', '.join(existing)}")
    return paths


def _write_stack(path: Path, volume: torch.Tensor, rotations: torch.Tensor, params: CTFParams, *, apix: float,
                 ctf_pad: int, snr: float | None, gen: torch.Generator, batch_size: int, device,
                 progress: bool) -> float:
    """The images ``apply_ctf(project(V, R_i), CTF_i)`` plus noise at the data-set ``snr``
    (drawn from ``gen`` after all clean images), written to the MRC stack ``path`` in batches;
    returns the noise standard deviation (0 without noise)."""
    import mrcfile

    N, D = rotations.shape[0], volume.shape[-1]
    with mrcfile.new_mmap(path, shape=(N, D, D), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = apix
        with torch.no_grad():
            total, total_sq = _write_clean_images(mrc.data, volume, rotations, params, apix=apix, ctf_pad=ctf_pad,
                                                  batch_size=batch_size, device=device, progress=progress)
            count = N * D * D
            var = max(total_sq / count - (total / count) ** 2, 0.0)
            sigma = 0.0 if snr is None else (var / snr) ** 0.5
            if snr is not None:
                _add_noise(mrc.data, sigma, gen, batch_size=batch_size, progress=progress)
        mrc.update_header_stats()
    return sigma


def _batches(N: int, batch_size: int, desc: str, progress: bool):
    """``(b0, b1)`` bounds of consecutive batches of ``range(N)``, with a tqdm bar."""
    from tqdm.auto import tqdm

    for b0 in tqdm(range(0, N, batch_size), desc=desc, disable=not progress):
        yield b0, min(N, b0 + batch_size)


def _write_clean_images(data, volume, rotations, params: CTFParams, *, apix, ctf_pad, batch_size, device,
                        progress) -> tuple[float, float]:
    """Fill ``data`` ``(N, D, D)`` with the CTF-filtered projections (the CTF on a
    ``ctf_pad * D`` grid); returns the sum and the sum of squares of all pixels (float64)."""
    vol_dev = volume.to(device)
    P = ctf_pad * volume.shape[-1]
    total, total_sq = 0.0, 0.0
    for b0, b1 in _batches(rotations.shape[0], batch_size, "project + CTF", progress):
        proj = project(vol_dev, rotations[b0:b1].to(device=device, dtype=torch.float32))
        img = apply_ctf(proj, ctf(P, apix, **params.select(slice(b0, b1)), device=device)).cpu()
        x = img.to(torch.float64)
        total += float(x.sum())
        total_sq += float((x * x).sum())
        data[b0:b1] = img.numpy()
    return total, total_sq


def _add_noise(data, sigma: float, gen: torch.Generator, *, batch_size, progress) -> None:
    """Add white Gaussian noise of standard deviation ``sigma`` to ``data`` ``(N, D, D)``, drawn
    from ``gen`` batch by batch (float32)."""
    N, D = data.shape[0], data.shape[-1]
    for b0, b1 in _batches(N, batch_size, "noise", progress):
        noise = torch.randn((b1 - b0, D, D), generator=gen, dtype=torch.float32)
        data[b0:b1] += (sigma * noise).numpy()
