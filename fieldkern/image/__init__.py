"""2D multiscale image fitting: the paper's Table 2 experiment and its building blocks.

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
from fieldkern.image.experiment import (
    MAD_NORMALISATION,
    FitResult,
    check_writable,
    fit_image,
    prepare_output_dir,
    results_markdown,
    run_experiment,
    settings_dict,
    summarise,
    write_results,
)
from fieldkern.image.methods import METHODS, PRESETS, Method, Preset, get_method, get_preset
from fieldkern.image.metrics import magnitude_spectrum, psnr, spectrum_mad
from fieldkern.image.sape import SAPE

__all__ = [
    "MAD_NORMALISATION",
    "METHODS",
    "PRESETS",
    "SAPE",
    "FitResult",
    "ImageLoadError",
    "Method",
    "Preset",
    "check_writable",
    "prepare_output_dir",
    "fit_image",
    "get_method",
    "get_preset",
    "load_dataset",
    "load_images",
    "magnitude_spectrum",
    "natural_images",
    "psnr",
    "resize",
    "results_markdown",
    "run_experiment",
    "settings_dict",
    "spectrum_mad",
    "summarise",
    "text_image",
    "text_images",
    "write_results",
]
