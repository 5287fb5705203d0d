"""Memory-access model of the projector forward's gathers (numpy, no GPU; a model, not a
measurement). For random rotations it follows warps of 32 lanes along their rays, as
`project_volume_fwd_kernel` maps them (32 consecutive pixels of a row per warp-wide load
for row runs, `#blocked` layout, sizePerThread 1; an 8 x 4 patch for ``TILE_W = 8``), and
counts per warp and ray step:

- wavefronts: distinct 128-byte lines per load instruction, summed over the step's loads
  (what an L1-throughput-bound gather pays);
- sectors: distinct 32-byte sectors the step touches (L1 -> L2 traffic without reuse);
- new sectors: sectors not touched by the same warp's previous step (L2 traffic if L1
  keeps only the last step).

Voxel layouts: ``scalar`` (one float per voxel, eight 4-byte loads), ``pair`` (each voxel
next to its +x neighbour, four 8-byte loads, the kernels' layout), ``quad`` (the 2 x 2
x/y neighbours, two 16-byte loads).

    python bench/gather_model.py [--box 64] [--rotations 16] [--rows 10] [--warp 32x1]
"""

from __future__ import annotations

import argparse

import numpy as np


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)


def load_addresses(q: np.ndarray, layout: str, Dp: int) -> list[np.ndarray]:
    """Byte addresses, one array per load instruction, of the taps of samples ``q`` (3, n)."""
    i0 = np.floor(q).astype(np.int64)
    base = (i0[2] * Dp + i0[1]) * Dp + i0[0]
    plane = Dp * Dp
    if layout == "scalar":
        return [(base + cz * plane + cy * Dp + cx) * 4 for cz in (0, 1) for cy in (0, 1) for cx in (0, 1)]
    if layout == "pair":
        return [(base + cz * plane + cy * Dp) * 8 for cz in (0, 1) for cy in (0, 1)]
    if layout == "quad":
        return [(base + cz * plane) * 16 for cz in (0, 1)]
    raise ValueError(layout)


def count(D: int, layout: str, n_rot: int, n_rows: int, seed: int = 0,
          warp: tuple[int, int] = (32, 1)) -> tuple[float, float, float]:
    """Mean wavefronts, sectors and new sectors per warp and step (steps where at least half
    of the lanes are inside the box); ``warp``: the (width, height) in pixels of the patch a
    warp's 32 lanes cover."""
    rng = np.random.default_rng(seed)
    Dp, c = D + 2, D // 2
    ww, wh = warp
    lane = np.arange(32)
    waves = sectors = new = steps = 0
    for r in random_rotations(n_rot, rng):
        for _ in range(n_rows):
            xs = rng.integers(0, max(D // ww, 1)) * ww + lane % ww
            ys = rng.integers(0, max(D // wh, 1)) * wh + lane // ww
            prev: set[int] = set()
            for k in range(D):
                p = np.stack([xs - c, ys - c, np.full(32, k - c)]).astype(np.float64)
                q = r.T @ p + c + 1
                inside = np.all((q >= 0) & (q < Dp - 1), axis=0)
                if inside.sum() < 16:
                    prev = set()
                    continue
                touched: set[int] = set()
                for a in load_addresses(q[:, inside], layout, Dp):
                    waves += len(np.unique(a // 128))
                    touched |= set((a // 32).tolist())
                sectors += len(touched)
                new += len(touched - prev)
                steps += 1
                prev = touched
    return waves / steps, sectors / steps, new / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--rotations", type=int, default=16)
    ap.add_argument("--rows", type=int, default=10, help="warps followed per rotation")
    ap.add_argument("--warp", default="32x1", help="pixels a warp covers, WIDTHxHEIGHT: 32x1 "
                    "(row runs, TILE_W = 0) or 8x4 (TILE_W = 8)")
    args = ap.parse_args(argv)
    warp = tuple(int(v) for v in args.warp.split("x"))
    if warp[0] * warp[1] != 32:
        ap.error("--warp must cover 32 pixels")
    print(f"D = {args.box}, {args.rotations} rotations x {args.rows} warps of {args.warp} pixels, "
          "per warp and step:")
    print("layout   wavefronts   sectors   new sectors")
    for layout in ("scalar", "pair", "quad"):
        w, s, n = count(args.box, layout, args.rotations, args.rows, warp=warp)
        print(f"{layout:8s} {w:10.1f} {s:9.1f} {n:13.1f}")


if __name__ == "__main__":
    main()
