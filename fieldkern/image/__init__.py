"""2D multiscale image fitting: the paper's Table 2 experiment and its building blocks.

Modules: :mod:`~fieldkern.image.presets` (settings), :mod:`~fieldkern.image.methods` (the six
methods), :mod:`~fieldkern.image.datasets` (images), :mod:`~fieldkern.image.fit` (one method on
one image), :mod:`~fieldkern.image.experiment` (all of them), :mod:`~fieldkern.image.results`
and :mod:`~fieldkern.image.figures` (what a run writes).

Light to import: Pillow, scikit-image and matplotlib (extra ``fieldkern[image]``) load only
inside the functions that need them. See ``docs/image.md`` and ``examples/image_fit.py``.
"""

from fieldkern.image.datasets import (
    ImageLoadError,
    load_dataset,
    load_images,
    natural_images,
    resize,
    text_image,
    text_images,
)
from fieldkern.image.experiment import run_experiment
from fieldkern.image.fit import FitResult, fit_image
from fieldkern.image.methods import METHODS, Method, get_method
from fieldkern.image.metrics import magnitude_spectrum, psnr, spectrum_mad
from fieldkern.image.presets import IMAGE_PRESETS, ImagePreset, image_preset
from fieldkern.image.results import (
    MAD_NORMALISATION,
    check_writable,
    finite_or_raise,
    image_settings,
    prepare_output_dir,
    results_markdown,
    summarise,
    write_results,
)
from fieldkern.image.sape import SAPE

__all__ = [
    "IMAGE_PRESETS",
    "MAD_NORMALISATION",
    "METHODS",
    "SAPE",
    "FitResult",
    "ImageLoadError",
    "ImagePreset",
    "Method",
    "check_writable",
    "finite_or_raise",
    "fit_image",
    "get_method",
    "image_preset",
    "image_settings",
    "load_dataset",
    "load_images",
    "magnitude_spectrum",
    "natural_images",
    "prepare_output_dir",
    "psnr",
    "resize",
    "results_markdown",
    "run_experiment",
    "spectrum_mad",
    "summarise",
    "text_image",
    "text_images",
    "write_results",
]
