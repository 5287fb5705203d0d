#!/usr/bin/env python
"""Cryo-EM reconstruction with a staged residual MFN and pose refinement (the paper's experiment).

Examples:
    python examples/cryoem.py                                   # quick default: 4AKE, CPU, about a minute
    python examples/cryoem.py --structure 1ol5 --pose-init coarse --epochs 30
    python examples/cryoem.py --particles my.star --reference map.mrc --pose-init gt
    python examples/cryoem.py --particles relion.star --invert       # real data: half maps, FSC 0.143
    python examples/cryoem.py --preset paper --device cuda      # 50,000 particles (GPU)

Several GPUs or nodes (data parallel; see docs/cryoem.md, "Several GPUs and clusters"):
    torchrun --nproc_per_node 4 examples/cryoem.py --preset paper --out runs/paper

Writes to ``--out``: ``ground_truth.mrc``, ``reconstruction_scale{k}.mrc`` (every scale at the
end, aligned to the ground truth), ``stage{k}_scale{k}.mrc`` (scale k as its stage ended), ``fsc.csv``,
``fsc.png``, ``slices.png``, ``poses.star``, ``results.json`` and ``checkpoint.pt`` (every
epoch; ``--resume`` continues from it). ``--particles`` without ``--reference``: two half-set
reconstructions and their FSC at 0.143 (``half{1,2}_*.mrc``, ``checkpoint_half{1,2}.pt``).
Exit status 0 on success, 1 on bad input or failure, 2 on bad arguments, 3 when ``--time-limit``
stopped the run (resume it with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    import torch

    from fieldkern.cryoem.config import MARCHINGS, PROJECTORS, SUPPORTS
    from fieldkern.cryoem.poses import POSE_INITS
    from fieldkern.cryoem.presets import CRYOEM_PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structure", default="4ake", help="4ake | 1ol5 | PATH.pdb | PATH.cif | PATH.mrc | PATH.map (default 4ake; "
                        "a map brings its own box and pixel size)")
    p.add_argument("--particles", metavar="STAR", help="reconstruct this RELION particle set instead of simulating")
    p.add_argument("--invert", action="store_true", help="multiply the --particles images by -1 (RELION extracts white "
                   "particles; refused when their contrast disagrees with the CTF model)")
    p.add_argument("--downsample", type=int, metavar="D", help="Fourier-crop the --particles images to D pixels "
                   "(even; a reference map of their box too): real sets of 200-400 pixels are far more than needed")
    p.add_argument("--reference", metavar="MRC", help="ground-truth map for FSC with --particles "
                   "(without it: FSC 0.143 between two independently reconstructed half sets)")
    p.add_argument("--preset", choices=tuple(CRYOEM_PRESETS), default="quick",
                   help="quick: minutes on a CPU (default); paper: the authors' settings (GPU); tiny: smoke test")
    p.add_argument("--box", type=int, help="box size D of the simulation (even)")
    p.add_argument("--apix", type=float, help="pixel size of the simulation (A)")
    p.add_argument("--n-particles", type=int, help="particles to simulate")
    p.add_argument("--snr", type=float, help="signal-to-noise ratio of the simulation")
    p.add_argument("--pose-init", choices=POSE_INITS,
                   help="gt: true (or the file's) poses, kept fixed; refine: those poses, refined (default with "
                   "--particles); perturbed: up to 20 deg off (default otherwise); coarse: 45-90 deg off; "
                   "uniform: 0-180 deg off (appendix E); random: uniform on SO(3), ab initio, also for --particles "
                   "without angles (both with --pose-search 4608, --search-temperature 10 and more coarse-scale epochs "
                   "unless given)")
    p.add_argument("--pose-search", type=int, metavar="N", help="global pose search over N grid rotations at the "
                   "start of every epoch from the second stage (not in the paper; for --pose-init coarse, e.g. 4608)")
    p.add_argument("--search-temperature", type=float, metavar="T", help="before the last stage, draw each pose "
                   "from its posterior over the search grid at T times its noise level instead of taking the best "
                   "fit (0: the best fit; default 10 with --pose-init uniform or random, else 0)")
    p.add_argument("--epochs", type=int, help="training epochs (stage switches scale with it)")
    p.add_argument("--projector", choices=PROJECTORS, help="the trainer's forward model: fourier (central slices "
                   "from precomputed taps, the default), grid_sample (the same slices by grid_sample, the reference) "
                   "or real (real-space ray sums)")
    p.add_argument("--support", choices=SUPPORTS, help="where the field may be non-zero: sphere (inscribed in the "
                   "box; the quick preset's) or box (the paper's)")
    p.add_argument("--marching", choices=MARCHINGS, help="fixed: stages start at the preset's epochs (default); fsc: "
                   "two half sets train side by side and their FSC decides after every epoch to stay, go to the next "
                   "stage, limit the band or stop, within --epochs (not in the paper; with --pose-search the halves' maps are "
                   "aligned, mirror allowed, before every comparison, a coarse stage waits for its score to settle "
                   "and nothing limits the band)")
    p.add_argument("--seed", type=int, default=0, help="seeds the simulation (poses, CTFs, noise), the initial poses, "
                   "the half-set split and the training (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train (default cuda when available, else cpu)")
    p.add_argument("--out", default="runs/cryoem", metavar="DIR", help="output folder (default runs/cryoem)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (a folder holding anything "
                   "is refused without --resume or --overwrite)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each batch's volume and pose steps from CUDA "
                   "graphs (one process on a CUDA device; not yet run on a device: docs/cryoem.md)")
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="stop after the epoch that ends past this "
                   "many minutes of training, checkpoints written, with exit status 3; --resume goes on")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: exit status 2 with a message for arguments that cannot go together."""
    from fieldkern.cryoem.data import check_map_geometry, is_map
    from fieldkern.cryoem.poses import FAR_POSE_INITS
    from fieldkern.cryoem.presets import (
        AB_INITIO_POSE_SEARCH,
        AB_INITIO_SEARCH_TEMPERATURE,
    )

    p = _parser()
    args = p.parse_args(argv)
    if args.pose_init is None:  # a real set's poses are the best start; the paper perturbs simulated ones
        args.pose_init = "refine" if args.particles else "perturbed"
    if args.pose_init in FAR_POSE_INITS and args.pose_search is None:
        args.pose_search = AB_INITIO_POSE_SEARCH  # far from the truth: the global search by default
    if args.pose_init in FAR_POSE_INITS and args.search_temperature is None and args.pose_search:
        args.search_temperature = AB_INITIO_SEARCH_TEMPERATURE  # and broad draws before the last stage
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if args.reference and not args.particles:
        p.error("--reference needs --particles")
    for flag in ("invert", "downsample"):
        if getattr(args, flag) and not args.particles:
            p.error(f"--{flag} needs --particles")
    if args.downsample is not None and (args.downsample < 2 or args.downsample % 2):
        p.error("--downsample must be an even number of pixels >= 2")
    if args.particles:  # a particle set brings its own box, pixel size, count and noise
        given = [f"--{n.replace('_', '-')}" for n in ("box", "apix", "n_particles", "snr") if getattr(args, n) is not None]
        if given:
            p.error(f"{', '.join(given)}: simulation settings, which do not apply to --particles")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        p.error(f"--cuda-graphs replays CUDA graphs: it needs a CUDA --device, got {args.device!r}")
    if args.time_limit is not None and not args.time_limit > 0:
        p.error("--time-limit must be a positive number of minutes")
    if args.pose_search is not None and args.pose_search < 0:
        p.error("--pose-search must be >= 0")
    if args.search_temperature is not None and not args.search_temperature >= 0:
        p.error("--search-temperature must be >= 0")
    if args.search_temperature and not args.pose_search:
        p.error("--search-temperature draws the poses of a global search: it needs --pose-search N")
    for name in ("box", "n_particles", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.particles and is_map(args.structure):
        try:
            check_map_geometry(args.structure, args.box, args.apix)
        except ValueError as exc:
            p.error(str(exc))
    return args


def run(args: argparse.Namespace, argv: list[str], dist) -> dict | None:
    """The experiment on this rank; returns the results on rank 0 (None on the others)."""

    from fieldkern.cryoem import experiment
    from fieldkern.cryoem.data import is_map, prepare_data
    from fieldkern.cryoem.memory import check_memory, memory_needs
    from fieldkern.cryoem.outputs import (
        cryoem_settings,
        prepare_output_dir,
        write_outputs,
    )
    from fieldkern.cryoem.poses import initial_poses
    from fieldkern.cryoem.presets import cryoem_preset, scale_epochs

    device = dist.device
    structure_key = str(args.structure).lower()
    overrides = {"box": args.box, "apix": args.apix, "n_particles": args.n_particles, "snr": args.snr,
                 "projector": args.projector, "support": args.support, "marching": args.marching, "seed": args.seed,
                 "pose_search": args.pose_search, "search_temperature": args.search_temperature}
    preset = cryoem_preset(args.preset, structure_key, args.pose_init, **overrides)
    if args.epochs is not None:
        preset = scale_epochs(preset, args.epochs)
    # Memory, before any work: a simulation from the preset's sizes now, a particle set once read.
    sizes = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k in ("box", "n_particles", "pose_search") and v is not None]
    settings = " ".join(sizes) or f"--preset {args.preset}"
    if not args.particles and not is_map(args.structure):
        needs = memory_needs(preset.recon, preset.box, preset.n_particles, simulate=True,
                             world_size=dist.world_size)
        check_memory(needs, device, settings)
    out = Path(args.out)
    with dist.agree(f"checking --out {out}"):
        if dist.is_main:  # fail now, not after hours of training; never mix two runs
            prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite)
    progress = not args.no_progress and dist.is_main

    start = time.perf_counter()
    data = prepare_data(args.structure, out, preset, args.seed, particles=args.particles, reference=args.reference,
                        progress=progress, device=device, dist=dist, invert=args.invert, downsample=args.downsample)
    ds = data.dataset
    check_memory(memory_needs(preset.recon, ds.box, len(ds), world_size=dist.world_size),
                 device, f"{data.source} (box {ds.box}, {len(ds)} particles; {settings})")
    try:
        init = initial_poses(data.true_rotations, args.pose_init, preset, args.seed, n=len(ds))
    except ValueError as exc:
        raise ValueError(f"{data.source}: {exc}") from None
    # Known poses stay fixed; otherwise they are refined.
    recon_cfg = replace(preset.recon, refine_poses=args.pose_init != "gt")
    train_start = time.perf_counter()
    # One reconstruction, or (no ground truth) one per half set for the gold-standard FSC.
    recs = experiment.reconstruct(data, init, recon_cfg, out, resume=args.resume, progress=progress,
                                  device=device, dist=dist, cuda_graphs=args.cuda_graphs,
                                  time_limit=None if args.time_limit is None else 60 * args.time_limit)
    train_seconds = time.perf_counter() - train_start
    if not dist.is_main:
        return None
    outcome = experiment.evaluate_reconstructions(recs, data, init)
    seconds = time.perf_counter() - start
    launcher = ["python"] if not dist.distributed else ["torchrun", f"--nproc_per_node {dist.world_size}"]
    settings = cryoem_settings(preset, {
        "structure": args.structure, "particles": args.particles, "pose_init": args.pose_init,
        "device": str(device), "world_size": dist.world_size, "backend": dist.backend,
        "cuda_graphs": args.cuda_graphs, "command": " ".join([*launcher, "examples/cryoem.py", *argv]),
    })
    return write_outputs(out, data, outcome, settings, seconds=seconds, train_seconds=train_seconds)


#: Exit status of a run stopped by --time-limit (resumable; 1 is an error, 2 bad arguments).
TIME_LIMIT_EXIT = 3


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from fieldkern.distributed import init_from_env, shutdown
    from fieldkern.host_memory import reuse_freed_memory

    reuse_freed_memory()  # training allocates and frees large tensors many times a second

    from fieldkern.train import TimeLimitReached

    dist = None
    try:
        # Under torchrun: one process per GPU (NCCL) or CPU process (gloo); else unchanged.
        dist = init_from_env(args.device)
        results = run(args, argv, dist)
    except TimeLimitReached as exc:
        if dist is None or dist.is_main:
            print(f"cryoem: stopped at --time-limit {args.time_limit:g} min ({exc}); the checkpoints are in "
                  f"{args.out}: run the same command with --resume (instead of --overwrite) to go on", file=sys.stderr)
        return TIME_LIMIT_EXIT
    except (OSError, ValueError, RuntimeError, FloatingPointError) as exc:
        rank = "" if dist is None or not dist.distributed else f" (rank {dist.rank})"
        print(f"cryoem: error{rank}: {exc}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            shutdown(dist)
    if results is not None:
        from fieldkern.cryoem.outputs import summary_lines

        print("\n".join(summary_lines(results)))
        print(f"outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
