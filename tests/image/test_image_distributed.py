"""The image experiment split across 2 gloo processes gives the single-process table."""

import pickle
from pathlib import Path

import pytest

pytest.importorskip("PIL")
pytest.importorskip("skimage")

import torch  # noqa: E402

from fieldkern import image as fimage  # noqa: E402
from fieldkern.distributed import init_from_env, shutdown, spawn_local  # noqa: E402

METHODS = ("staged_res_new_init", "bacon")


def _inputs():
    preset = fimage.image_preset("tiny")
    images, names = fimage.load_dataset("text", 3, size=512, seed=0)
    images = [fimage.resize(im, preset.eval_size) for im in images]
    return images, names, [fimage.get_method(m) for m in METHODS], preset


def _worker(path):
    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    try:
        images, names, methods, preset = _inputs()
        results = fimage.run_experiment(images, names, methods, preset, device=ctx.device, seed=0, progress=False,
                                        dist=ctx)
        assert (results is None) == (not ctx.is_main)
        if ctx.is_main:
            Path(path).write_bytes(pickle.dumps(results))
    finally:
        shutdown(ctx)


def test_two_processes_fit_the_images_of_one(tmp_path):
    images, names, methods, preset = _inputs()
    single = fimage.run_experiment(images, names, methods, preset, device="cpu", seed=0, progress=False)
    spawn_local(_worker, 2, str(tmp_path / "results.pkl"))
    split = pickle.loads((tmp_path / "results.pkl").read_bytes())
    assert [[r.image for r in row] for row in split] == [[r.image for r in row] for row in single]
    for row_a, row_b in zip(single, split):
        for a, b in zip(row_a, row_b):
            assert a.method == b.method
            # Each image is fitted by one process exactly as alone (measured: identical).
            assert b.psnr == pytest.approx(a.psnr, abs=1e-6) and b.losses == pytest.approx(a.losses, rel=1e-6)
            assert (a.mad is None) == (b.mad is None)
            if a.mad is not None:
                assert b.mad == pytest.approx(a.mad, rel=1e-6)
    # Arrays for figures come back for the first 2 images (image 1 was fitted on rank 1).
    assert [bool(r.eval_outputs) for r in (row[0] for row in split)] == [True, True, False]
