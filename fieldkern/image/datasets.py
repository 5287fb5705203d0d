"""Images for the 2D experiments, all offline and deterministic by seed.

Every image is returned as a float32 numpy array ``(H, W, C)`` in ``[0, 1]`` with ``C`` 1
(grey) or 3 (RGB). Pillow and scikit-image are imported on use (extra ``fieldkern[image]``).

- :func:`natural_images`: photographs bundled with scikit-image, centre-cropped to a square
  and resized to ``size`` (512 by default).
- :func:`text_images`: random words in several sizes, colours and fonts (the DejaVu fonts
  matplotlib ships), in the spirit of the paper's Text dataset.
- :func:`load_images`: a user file or a folder of files, any size, grey or RGB.
- :func:`resize`: Lanczos resampling, e.g. the paper's 512 -> 256 training images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fieldkern.checks import check_count, to_numpy
from fieldkern.image._checks import check_layout, check_pixels, check_size

# Photographs bundled with scikit-image, in the order they are used.
NATURAL_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "retina", "camera", "moon", "brick", "grass", "gravel",
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

_WORDS = (
    "residual", "multiplicative", "filter", "network", "scale", "fourier", "spectrum", "band",
    "limit", "coarse", "fine", "stage", "field", "signal", "image", "pixel", "sine", "wave",
    "kernel", "triton", "protein", "density", "lattice", "neural", "alpha", "gamma", "delta",
    "omega", "the", "of", "and", "frequency", "Nyquist", "BACON", "MFN", "FFT", "2022", "42",
    "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Zebra", "QUARTZ", "glyph",
)

_FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
)


class ImageLoadError(ValueError):
    """An image file or folder could not be read."""


def to_float(img) -> np.ndarray:
    """uint8/bool/float image ``(H, W)`` or ``(H, W, C)`` -> float32 ``(H, W, 1 or 3)`` in [0, 1].

    RGBA is composited on white; 2-channel (grey + alpha) likewise.
    """
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    else:
        a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image (H, W) or (H, W, 1|2|3|4), got shape {a.shape}")
    if a.shape[-1] in (2, 4):
        alpha = a[..., -1:]
        a = a[..., :-1] * alpha + (1.0 - alpha)
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Lanczos-resample an image in [0, 1] to ``size`` (int: square, or ``(h, w)``).

    ``(H, W, C)`` channels last (``C`` 1 to 4) -> ``(h, w, C)``; a grey ``(H, W)`` ->
    ``(h, w)``. Numpy arrays or torch tensors; returns float32 numpy. A last axis longer
    than 4 (e.g. a channels-first ``(C, H, W)`` array) raises ValueError, as do values
    outside [0, 1] (the result is clipped to [0, 1], which would silently flatten them).

    Works per channel in float ("F" mode), so no 8-bit quantisation is introduced. Pillow's
    Lanczos filter widens its kernel when downsampling, i.e. it low-passes (antialiases).
    """
    from PIL import Image

    h, w = check_size("size", size)
    a = to_numpy(img)
    check_layout("img", a)
    check_pixels("img", a)
    a = a.astype(np.float32, copy=False)
    grey = a.ndim == 2
    if grey:
        a = a[..., None]
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize((w, h), Image.Resampling.LANCZOS))
        for c in range(a.shape[-1])
    ]
    out = np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)
    return out[..., 0] if grey else out


def square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop ``(H, W, C)`` to a square and Lanczos-resize it to ``size x size``."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = img[top:top + s, left:left + s]
    return crop if s == size else resize(crop, size)


def natural_images(n: int, size: int = 512, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """The first ``n`` photographs of :data:`NATURAL_IMAGES` (scikit-image), ``(size, size, C)``.

    The selection is fixed (``seed`` is accepted for a uniform dataset API; the images are
    not random). Returns the images and their names.
    """
    from skimage import data

    n = check_count("n", n)
    size = check_count("size", size)
    if n > len(NATURAL_IMAGES):
        raise ValueError(f"natural has {len(NATURAL_IMAGES)} images, asked for {n}")
    names = list(NATURAL_IMAGES[:n])
    return [square(to_float(getattr(data, name)()), size) for name in names], names


def _font_paths() -> list[str]:
    import matplotlib

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [str(font_dir / f) for f in _FONT_FILES if (font_dir / f).is_file()]
    if not paths:
        raise RuntimeError(f"no DejaVu fonts found in {font_dir}; is matplotlib installed?")
    return paths


def text_image(size: int = 512, seed: int = 0, n_words: int | None = None) -> np.ndarray:
    """One random text image ``(size, size, 3)``: words in random fonts, sizes and colours.

    A random light or dark background carries words whose font size ranges from about
    ``size / 40`` (fine detail near Nyquist) to ``size / 6`` (coarse blobs), so every scale
    of a multiscale model has something to fit. Deterministic in ``seed``.
    """
    from PIL import Image, ImageDraw, ImageFont

    size = check_count("size", size)
    if n_words is not None:
        n_words = check_count("n_words", n_words, minimum=0)
    rng = np.random.default_rng(seed)
    fonts = _font_paths()
    dark = rng.random() < 0.5
    bg = rng.integers(0, 80, 3) if dark else rng.integers(175, 256, 3)
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(canvas)
    n_words = int(rng.integers(12, 28)) if n_words is None else n_words
    for _ in range(n_words):
        word = str(rng.choice(_WORDS))
        font_size = max(6, int(size * rng.uniform(1 / 40, 1 / 6)))
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], font_size)
        # Keep contrast with the background: text is from the opposite half of the range.
        colour = rng.integers(130, 256, 3) if dark else rng.integers(0, 126, 3)
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        x = int(rng.integers(-(x1 - x0) // 4, max(1, size - 3 * (x1 - x0) // 4)))
        y = int(rng.integers(-(y1 - y0) // 4, max(1, size - 3 * (y1 - y0) // 4)))
        draw.text((x, y), word, font=font, fill=tuple(int(v) for v in colour))
    return to_float(np.asarray(canvas))


def text_images(n: int, size: int = 512, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``n`` text images; image ``i`` uses seed ``(seed, i)`` so prefixes agree across ``n``."""
    n = check_count("n", n)
    size = check_count("size", size)
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n)]
    return [text_image(size, s) for s in seeds], [f"text_{seed}_{i:02d}" for i in range(n)]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file -> float32 ``(H, W, 1 or 3)`` in [0, 1]; raises ImageLoadError.

    8/16-bit images are scaled by their type's range, 32-bit integer ones by their maximum,
    32-bit float ones are taken as they are (refused with NaN/inf or values outside [0, 1])."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float32)
                a = a / max(float(a.max()), 1.0) if im.mode == "I" else a / 65535.0
            elif im.mode == "F":  # 32-bit float: intensities as they are (an 8-bit conversion truncates them)
                a = _float_intensities(np.asarray(im, dtype=np.float32), path)
            elif im.mode in ("L", "LA", "RGB", "RGBA"):
                a = np.asarray(im)
            elif im.mode == "1":
                a = np.asarray(im.convert("L"))
            else:  # palette, CMYK, YCbCr, ...
                a = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
    except ImageLoadError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageLoadError(f"cannot read image {str(path)!r}: {exc}") from exc
    return to_float(a)


def _float_intensities(a: np.ndarray, path) -> np.ndarray:
    """A float image read as it is: refused (ImageLoadError) where it holds NaN/inf or values
    outside [0, 1], which no intensity scale would reproduce faithfully."""
    if not np.isfinite(a).all():
        raise ImageLoadError(f"image {str(path)!r} holds NaN or inf pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        raise ImageLoadError(f"image {str(path)!r} is a float image with values in [{lo:g}, {hi:g}]; float images "
                             "are read as intensities in [0, 1]: rescale it (or save it as 8/16-bit)")
    return a


def load_images(path: str | os.PathLike, size: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """A user image file, or every image file in a folder (sorted by name, not recursive).

    Args:
        path: a file or a folder.
        size: if given, each image is centre-cropped to a square and Lanczos-resized to
            ``size x size`` (the experiment's evaluation resolution); smaller images are
            upsampled (``examples/image_fit.py`` refuses them instead).

    Returns:
        Images ``(H, W, 1 or 3)`` float32 in [0, 1] and their file stems.

    Raises:
        ImageLoadError: the path does not exist, a folder has no image files, or a file
            cannot be decoded.
        ValueError, TypeError: ``size`` is not an int >= 1.
    """
    if size is not None:
        size = check_count("size", size)
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageLoadError(f"folder {str(p)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    elif p.is_file():
        files = [p]
    else:
        raise ImageLoadError(f"image path {str(p)!r} does not exist")
    images = [read_image(f) for f in files]
    if size is not None:
        images = [square(im, size) for im in images]
    return images, [f.stem for f in files]


def load_dataset(name: str, n: int, size: int = 512, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``"natural"`` or ``"text"``: ``n`` images of ``size x size``."""
    if name == "natural":
        return natural_images(n, size, seed)
    if name == "text":
        return text_images(n, size, seed)
    raise ValueError(f"unknown dataset {name!r}; choose 'natural' or 'text' (or pass an image path)")
