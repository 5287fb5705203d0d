"""The six methods of the paper's Table 2 and the experiment presets.

Every method is a named configuration of the same staged trainer
(:func:`fieldkern.image.experiment.fit_image`): which model, and whether/how it is staged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from fieldkern.image._checks import check_count


@dataclass(frozen=True)
class Preset:
    """Network size and schedule of one experiment setting.

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
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    # The authors' settings (the paper's appendix A): needs a GPU for reasonable time.
    "paper": Preset("paper", hidden=256, n_scales=4, iterations=10000, train_size=256, eval_size=512),
    # A few minutes for all six methods on 2 images on a 2-core CPU: half the resolution
    # (train 128, evaluate 256), a quarter of the width, a twentieth of the iterations, same
    # stage proportions and learning rate.
    "quick": Preset("quick", hidden=64, n_scales=4, iterations=500, train_size=128, eval_size=256,
                    sape_frequencies=128),
    # For tests and smoke runs only: seconds, meaningless numbers.
    "tiny": Preset("tiny", hidden=16, n_scales=4, iterations=40, train_size=16, eval_size=32,
                   sape_frequencies=16),
}


@dataclass(frozen=True)
class Method:
    """A named method of Table 2.

    Attributes:
        name: command-line key.
        label: the row label of the paper's table.
        kind: "sape", "bacon" or "residual" (which model).
        staged: trained coarse to fine (else vanilla: all scales at once).
        stage_kwargs: extra arguments of ``model.set_stage`` (BACON's ``fair``).
        model_kwargs: extra constructor arguments (ResidualMFN's ``init``).
    """

    name: str
    label: str
    kind: str
    staged: bool
    stage_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)

    @property
    def multiscale(self) -> bool:
        return self.kind != "sape"

    def build(self, out_features: int, preset: Preset, progress_steps: int | None = None):
        """The untrained model for images with ``out_features`` channels (current torch RNG)."""
        from fieldkern.nn import BACON, ResidualMFN

        if self.kind == "sape":
            from fieldkern.image.sape import SAPE

            return SAPE(2, preset.hidden, out_features, preset.train_size,
                        n_frequencies=preset.sape_frequencies,
                        progress_steps=progress_steps or max(1, preset.iterations // 2))
        model_cls: Callable = BACON if self.kind == "bacon" else ResidualMFN
        return model_cls(2, preset.hidden, out_features, preset.n_scales, preset.train_size, **self.model_kwargs)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sape", "SAPE", "sape", staged=False),
        Method("bacon", "BACON", "bacon", staged=False),
        Method("staged_bacon_unfair", "(Staged) BACON (unfair)", "bacon", staged=True,
               stage_kwargs={"fair": False}),
        Method("staged_bacon_fair", "(Staged) BACON (fair)", "bacon", staged=True, stage_kwargs={"fair": True}),
        Method("staged_res_bacon_init", "(Staged + Res) BACON", "residual", staged=True,
               model_kwargs={"init": "bacon"}),
        Method("staged_res_new_init", "(Staged + Res + Init) BACON", "residual", staged=True,
               model_kwargs={"init": "residual"}),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
