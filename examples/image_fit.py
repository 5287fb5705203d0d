#!/usr/bin/env python
"""Multiscale image fitting: the paper's Table 2 (and Figs. 11/13) from the command line.

Examples:
    python examples/image_fit.py --dataset text --preset quick --out runs/text-quick
    python examples/image_fit.py --image my_photo.jpg --methods staged_bacon_fair staged_res_new_init
    python examples/image_fit.py --dataset text --preset paper --n-images 32 --device cuda
    torchrun --nproc_per_node 4 examples/image_fit.py --dataset text --preset paper --n-images 32

Writes ``results.json``, ``results.md`` and PNG figures to ``--out``; results are written
only after every run has finished. Exit status 0 on success, 1 on bad input or failure,
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from fieldkern import image as fimage


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("natural", "text"), default="text",
                   help="built-in dataset (ignored with --image); default text")
    p.add_argument("--image", metavar="PATH",
                   help="an image file or a folder of images, grey or RGB, each side at least the preset's "
                        f"evaluation size ({eval_sizes()})")
    p.add_argument("--methods", nargs="+", metavar="METHOD", default=list(fimage.METHODS),
                   help=f"methods to run (default: all): {', '.join(fimage.METHODS)}")
    p.add_argument("--preset", choices=tuple(fimage.IMAGE_PRESETS), default="quick",
                   help="quick: minutes on a CPU; paper: the authors' settings (GPU); tiny: smoke tests")
    p.add_argument("--n-images", type=int, metavar="K",
                   help="images to use (default 2 for a dataset, all files for --image)")
    p.add_argument("--seed", type=int, default=0, help="dataset and initialisation seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available, else cpu)")
    p.add_argument("--out", default="runs/image", metavar="DIR", help="output folder (default runs/image)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out (a folder holding "
                   "anything is refused without it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in fimage.METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(fimage.METHODS)}")
    if args.n_images is not None and args.n_images < 1:
        p.error("--n-images must be >= 1")
    return args


def load_user_images(path: str, n_images: int | None, preset) -> tuple[list, list[str]]:
    """The first ``n_images`` (default all) images of ``path``, squared to the evaluation size.

    Raises ValueError if fewer images than asked for are found, or if an image is smaller
    than the evaluation size.
    """
    images, names = fimage.load_images(path)
    if n_images is not None:
        # A Table 2 mean over fewer images than asked for would be easy to misreport.
        if n_images > len(images):
            raise ValueError(f"--n-images {n_images}: {path} holds only {len(images)} image(s)")
        images, names = images[:n_images], names[:n_images]
    size = preset.eval_size
    # The protocol trains on a 2x downsampled image and scores generalisation on the
    # image as loaded; upsampling a small image first would score the model against
    # Lanczos interpolation, not against real detail.
    small = [f"{name} ({im.shape[0]}x{im.shape[1]})" for name, im in zip(names, images) if min(im.shape[:2]) < size]
    if small:
        listed = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise ValueError(
            f"--image: preset {preset.name!r} evaluates at {size}x{size}, so images need a shorter side of at "
            f"least {size} pixels (they are not upsampled); too small: {listed}. Use larger images or a preset "
            f"with a smaller evaluation size ({eval_sizes()})"
        )
    return [fimage.datasets.square(im, size) for im in images], names


def eval_sizes() -> str:
    """Evaluation size of each preset, for messages."""
    return ", ".join(f"{name} {p.eval_size}" for name, p in fimage.IMAGE_PRESETS.items())


def run(args: argparse.Namespace, argv: list[str], dist) -> None:
    preset = fimage.image_preset(args.preset)
    methods = [fimage.get_method(m) for m in dict.fromkeys(args.methods)]  # dedupe, keep order
    device = dist.device
    out = None
    with dist.agree(f"checking --out {args.out}"):
        if dist.is_main:
            out = fimage.prepare_output_dir(args.out, overwrite=args.overwrite)  # never mix two runs
    if args.image:
        images, names = load_user_images(args.image, args.n_images, preset)
        dataset = args.image
    else:
        n = 2 if args.n_images is None else args.n_images
        images, names = fimage.load_dataset(args.dataset, n, size=512, seed=args.seed)
        if preset.eval_size != 512:
            images = [fimage.resize(im, preset.eval_size) for im in images]
        dataset = args.dataset

    start = time.perf_counter()
    # Under torchrun each rank fits its own block of images; rank 0 gets the whole table.
    results = fimage.run_experiment(images, names, methods, preset, device=device, seed=args.seed,
                                    progress=not args.no_progress, dist=dist)
    wall = time.perf_counter() - start
    if not dist.is_main:
        return
    fimage.finite_or_raise(results)
    settings = fimage.image_settings(dataset, names, methods, preset, device, args.seed)
    settings["wall_seconds"] = wall
    settings["world_size"] = dist.world_size
    launcher = ["python"] if not dist.distributed else ["torchrun", f"--nproc_per_node {dist.world_size}"]
    settings["command"] = " ".join([*launcher, "examples/image_fit.py", *argv])
    summary = fimage.summarise(results, methods, settings)
    written = fimage.write_results(out, summary, results, methods, images, preset)
    print(fimage.results_markdown(summary))
    print(f"wall time {wall:.1f} s; wrote {len(written)} files to {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from fieldkern.distributed import init_from_env, shutdown
    from fieldkern.host_memory import reuse_freed_memory

    reuse_freed_memory()  # training allocates and frees large tensors many times a second

    dist = None
    try:
        dist = init_from_env(args.device)  # torchrun: one process per GPU (NCCL) or CPU (gloo)
        run(args, argv, dist)
    except (fimage.ImageLoadError, OSError, ValueError, RuntimeError, FloatingPointError) as exc:
        rank = "" if dist is None or not dist.distributed else f" (rank {dist.rank})"
        print(f"image_fit: error{rank}: {exc}", file=sys.stderr)
        print("image_fit: no results were written", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            shutdown(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
