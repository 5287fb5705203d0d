"""The 2D multiscale image-fitting experiment (paper Table 2, Figs. 11-13): every method on
every image, optionally split over data-parallel processes.

:func:`fieldkern.image.fit_image` (:mod:`fieldkern.image.fit`) trains one method on one
image; :func:`run_experiment` loops over images and methods; :mod:`fieldkern.image.results`
turns the results into ``results.json``, ``results.md`` and the figures.
"""

from __future__ import annotations

import numpy as np

from fieldkern.distributed import DistContext
from fieldkern.image.fit import FitResult, fit_image
from fieldkern.image.methods import Method
from fieldkern.image.presets import ImagePreset


def run_experiment(
    images: list[np.ndarray],
    names: list[str],
    methods: list[Method],
    preset: ImagePreset,
    *,
    device="cpu",
    seed: int = 0,
    progress: bool = True,
    keep_arrays: int = 2,
    dist: DistContext | None = None,
) -> list[list[FitResult]] | None:
    """Every method on every image; ``results[i][j]`` is image ``i``, method ``j``.

    Image ``i`` initialises every method's model with torch seed ``seed + i``. Arrays for
    figures are kept for the first ``keep_arrays`` images only.

    With a data-parallel ``dist`` (:func:`fieldkern.distributed.init_from_env` under
    ``torchrun``), rank ``r`` fits the block ``dist.shard(len(images))`` of images on its
    own device, and the results are gathered on rank 0, which returns the whole table;
    the other ranks return None. Each image is fitted exactly as a single process would.
    """
    from tqdm.auto import tqdm

    ctx = dist if dist is not None else DistContext.single(device)
    lo, hi = ctx.shard(len(images))
    results = []
    with ctx.agree("fitting the images"):
        with tqdm(total=(hi - lo) * len(methods), desc="runs" if not ctx.distributed else f"runs (rank {ctx.rank})",
                  disable=not progress, dynamic_ncols=True) as bar:
            for i in range(lo, hi):
                row = []
                for method in methods:
                    r = fit_image(method, images[i], preset, device=device, seed=seed + i, image_name=names[i],
                                  progress=progress)
                    if i >= keep_arrays:
                        r.drop_arrays()
                    row.append(r)
                    bar.set_postfix(method=method.name, psnr=f"{r.psnr:.2f}")
                    bar.update()
                results.append(row)
    if not ctx.distributed:
        return results
    gathered = ctx.gather_object(results)
    return None if gathered is None else [row for rows in gathered for row in rows]
