"""The six methods of the paper's Table 2.

Every method is a named configuration of the same staged trainer
(:func:`fieldkern.image.fit_image`): which model, and whether/how it is staged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fieldkern.image.presets import ImagePreset


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
        """Whether the model returns one output per scale (all but SAPE)."""
        return self.kind != "sape"

    def build(self, out_features: int, preset: ImagePreset, progress_steps: int | None = None):
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
    """The method called ``name`` in :data:`METHODS` (ValueError listing them otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None

