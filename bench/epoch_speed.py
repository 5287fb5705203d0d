"""Seconds per cryo-EM training epoch with each projector / backend (issue 8's end-to-end
figure). Synthetic data (a few Gaussian blobs, reference projections, white noise, unit
CTF), so it needs neither gemmi nor the PDB files; one untimed epoch first (compilation,
autotuning), then one timed epoch at the finest stage with pose steps on.

    python bench/epoch_speed.py [--box 64] [--particles 1200] [--batch 600]
"""

from __future__ import annotations

import argparse
import time

import torch

import fieldkern
from fieldkern.cryoem import random_rotations
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.ops.project_volume import project_volume_reference


def blobs(D: int, generator: torch.Generator) -> torch.Tensor:
    c = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(D, D, D)
    for _ in range(6):
        ctr = (torch.rand(3, generator=generator) - 0.5) * D * 0.4
        width = 0.002 * D * D + 1
        vol += torch.exp(-((x - ctr[0]) ** 2 + (y - ctr[1]) ** 2 + (z - ctr[2]) ** 2) / width)
    return vol


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--particles", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=600)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # fourier: the tap slices (the trainer's default); grid_sample: the same slices by grid_sample
    ap.add_argument("--cases", default="torch/real,triton/real,torch/grid_sample,triton/grid_sample,"
                                       "torch/fourier,triton/fourier")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rot = random_rotations(args.particles, generator=g)
    with torch.no_grad():
        clean = project_volume_reference(blobs(args.box, g).to(dev), rot.to(dev)).cpu()
    images = clean + clean.std() * 3.0 * torch.randn(clean.shape, generator=g)  # SNR ~0.1
    ctfs = torch.ones(args.particles, args.box, args.box)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, D={args.box}, N={args.particles}, batch {args.batch}")
    for case in args.cases.split(","):
        backend, projector = case.split("/")
        cfg = ReconstructionConfig(epochs=4, stage_epochs=(1, 2), batch_size=args.batch, projector=projector)
        rec = Reconstruction(images, ctfs, rot, cfg, device=dev)
        with fieldkern.set_backend(backend):
            rec.train_epoch(0, None)  # warm-up: compilation, autotuning
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            rec.train_epoch(1, None)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
        print(f"{case:16s} {dt:8.3f} s/epoch  ({args.particles / dt:8.1f} particles/s; "
              f"{cfg.volume_steps} volume + {cfg.pose_steps} pose steps per batch)", flush=True)


if __name__ == "__main__":
    main()
