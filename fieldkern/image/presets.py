"""Settings of the image experiment: network size, schedule and resolutions, by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fieldkern.checks import check_count


@dataclass(frozen=True)
class ImagePreset:
    """Network size and schedule of one image-experiment setting.

    Attributes:
        name: preset name.
        hidden: hidden width of every network (MFN trunks, SAPE's MLP).
        n_scales: scales of the multiscale models (stages of the staged ones).
        iterations: Adam steps per image and method.
        stage_fractions: stage switches as fractions of ``iterations``; the paper's
            500/1000/2000 of 10000 are 5%/10%/20%. ``n_scales - 1`` values.
        lr: Adam learning rate.
        train_size: training grid, pixels per side (Lanczos-downsampled evaluation image).
        eval_size: evaluation grid, pixels per side (the image as loaded).
        sape_frequencies: SAPE's Fourier feature count.
    """

    name: str
    hidden: int
    n_scales: int
    iterations: int
    train_size: int
    eval_size: int
    stage_fractions: tuple[float, ...] = (0.05, 0.1, 0.2)
    lr: float = 5e-3
    sape_frequencies: int = 256

    def __post_init__(self):
        # Stored as Python ints: numpy integers (a sweep over np.arange) would otherwise
        # reach the model constructors and grid_coordinates, which want int.
        for name in ("hidden", "n_scales", "iterations", "train_size", "eval_size", "sape_frequencies"):
            object.__setattr__(self, name, check_count(f"preset {self.name!r}: {name}", getattr(self, name)))
        if len(self.stage_fractions) != self.n_scales - 1:
            raise ValueError(f"preset {self.name!r}: need {self.n_scales - 1} stage fractions")
        if self.train_size < 2 * self.n_scales:
            raise ValueError(f"preset {self.name!r}: train_size must be >= 2 * n_scales for BACON")

    def to_dict(self) -> dict:
        """All fields, for ``results.json``."""
        return dataclasses.asdict(self)


IMAGE_PRESETS: dict[str, ImagePreset] = {
    # The authors' settings (the paper's appendix A): needs a GPU for reasonable time.
    "paper": ImagePreset("paper", hidden=256, n_scales=4, iterations=10000, train_size=256, eval_size=512),
    # A few minutes for all six methods on 2 images on a 2-core CPU: half the resolution
    # (train 128, evaluate 256), a quarter of the width, a twentieth of the iterations, same
    # stage proportions and learning rate.
    "quick": ImagePreset("quick", hidden=64, n_scales=4, iterations=500, train_size=128, eval_size=256,
                         sape_frequencies=128),
    # For tests and smoke runs only: seconds, meaningless numbers.
    "tiny": ImagePreset("tiny", hidden=16, n_scales=4, iterations=40, train_size=16, eval_size=32,
                        sape_frequencies=16),
}


def image_preset(name: str) -> ImagePreset:
    """The preset called ``name`` in :data:`IMAGE_PRESETS` (ValueError listing them otherwise)."""
    try:
        return IMAGE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(IMAGE_PRESETS)}") from None
