import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from fieldkern.image import datasets  # noqa: E402
from fieldkern.image.datasets import ImageLoadError  # noqa: E402


def test_text_images_size_range_and_determinism():
    a, names = datasets.text_images(3, size=64, seed=5)
    b, _ = datasets.text_images(3, size=64, seed=5)
    c, _ = datasets.text_images(3, size=64, seed=6)
    assert len(a) == 3 and len(set(names)) == 3
    for img in a:
        assert img.shape == (64, 64, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert img.std() > 0.02  # words were drawn, not a blank canvas
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))
    # Image i depends on (seed, i) only, so a larger n extends a smaller one.
    d, _ = datasets.text_images(1, size=64, seed=5)
    assert np.array_equal(d[0], a[0])


def test_text_images_differ_from_each_other():
    imgs, _ = datasets.text_images(2, size=64, seed=0)
    assert not np.array_equal(imgs[0], imgs[1])


def test_natural_images_are_square_and_deterministic():
    a, names = datasets.natural_images(3, size=48)
    b, _ = datasets.natural_images(3, size=48)
    assert names == ["astronaut", "coffee", "chelsea"]
    assert [im.shape for im in a] == [(48, 48, 3)] * 3
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="natural has"):
        datasets.natural_images(100)


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load_dataset("faces", 1)


def test_resize_keeps_constants_and_shape():
    img = np.full((32, 32, 3), 0.25, np.float32)
    out = datasets.resize(img, 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_load_images_file_and_folder_grey_rgb_rgba(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8), "L").save(tmp_path / "a_grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8), "RGB").save(tmp_path / "b_rgb.jpg")
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent: composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c_rgba.png")
    (tmp_path / "notes.txt").write_text("not an image")

    imgs, names = datasets.load_images(tmp_path)
    assert names == ["a_grey", "b_rgb", "c_rgba"]
    assert [im.shape for im in imgs] == [(30, 50, 1), (40, 20, 3), (10, 10, 3)]
    np.testing.assert_allclose(imgs[2], 1.0)

    sq, _ = datasets.load_images(tmp_path / "a_grey.png", size=16)
    assert sq[0].shape == (16, 16, 1)


def test_8bit_pixels_load_as_the_written_values_over_255_in_channel_order(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    rgb[0, 0] = [255, 128, 0]  # one pixel orange, so a channel swap shows up at a glance
    opaque = np.concatenate([rgb, np.full((7, 5, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")  # PNG: lossless
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(opaque, "RGBA").save(tmp_path / "rgba.png")

    (g,), _ = datasets.load_images(tmp_path / "grey.png")
    (c,), _ = datasets.load_images(tmp_path / "rgb.png")
    (a,), _ = datasets.load_images(tmp_path / "rgba.png")
    np.testing.assert_allclose(g, grey[..., None] / 255.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(c, rgb / 255.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(c[0, 0], [1.0, 128 / 255, 0.0], rtol=0, atol=1e-6)  # R, G, B
    np.testing.assert_allclose(a, rgb / 255.0, rtol=0, atol=1e-6)  # alpha 255: the colours as they are


def test_load_images_errors(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        datasets.load_images(bad)
    with pytest.raises(ImageLoadError, match="does not exist"):
        datasets.load_images(tmp_path / "missing.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageLoadError, match="no image files"):
        datasets.load_images(empty)


def test_image_and_train_packages_import_light():
    import os
    import subprocess
    import sys

    code = ("import sys, fieldkern.image, fieldkern.train; "
            "heavy = [m for m in ('matplotlib', 'skimage', 'PIL') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr


def test_resize_grey_keeps_its_layout_and_rejects_channels_first():
    grey = np.full((8, 6), 0.25, np.float32)
    out = datasets.resize(grey, (4, 3))
    assert out.shape == (4, 3)  # not (4, 3, 6): the columns are not channels
    np.testing.assert_allclose(out, 0.25, atol=1e-6)
    with pytest.raises(ValueError, match=r"channels last.*\(3, 16, 16\)"):
        datasets.resize(np.zeros((3, 16, 16), np.float32), 8)
    with pytest.raises(ValueError, match=r"img values must lie in \[0, 1\]"):
        datasets.resize(np.full((8, 8, 3), 255.0, np.float32), 4)


def test_sizes_and_counts_take_numpy_integers_and_reject_the_rest(tmp_path):
    img = np.full((8, 8, 3), 0.5, np.float32)
    assert datasets.resize(img, np.int64(4)).shape == (4, 4, 3)
    assert datasets.natural_images(np.int64(1), size=np.int64(8))[0][0].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="size must be a positive int, got True"):
        datasets.resize(img, True)
    with pytest.raises(ValueError, match="size must be a positive int, got 4.0"):
        datasets.resize(img, 4.0)
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        datasets.text_images(1, size=0)  # used to return a (0, 0, 3) image

    Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(tmp_path / "a.png")
    assert datasets.load_images(tmp_path / "a.png", size=np.int64(4))[0][0].shape == (4, 4, 1)
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        datasets.load_images(tmp_path / "a.png", size=0)


def test_float_tiffs_are_read_as_floats_and_unfaithful_ones_refused(tmp_path):
    """32-bit float TIFFs went through an 8-bit conversion that turned 0.1-0.9 into zeros."""
    rng = np.random.default_rng(1)
    values = (0.1 + 0.8 * rng.random((12, 16))).astype(np.float32)
    Image.fromarray(values, "F").save(tmp_path / "float01.tif")
    (img,), _ = datasets.load_images(tmp_path / "float01.tif")
    assert img.shape == (12, 16, 1)
    np.testing.assert_array_equal(img[..., 0], values)
    nan = values.copy()
    nan[3, 4] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageLoadError, match="NaN or inf pixels"):
        datasets.load_images(tmp_path / "nan.tif")
    Image.fromarray(values * 255, "F").save(tmp_path / "float255.tif")
    with pytest.raises(ImageLoadError, match=r"values in \[2.*rescale"):
        datasets.load_images(tmp_path / "float255.tif")
