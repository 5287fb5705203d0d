"""Named runs of the cryo-EM experiment: data-set size and training settings.

``quick`` runs in minutes on a CPU, ``paper`` is the paper's data-set size and schedule (a GPU),
``tiny`` is a smoke test. :func:`cryoem_preset` applies the command line's overrides and the
per-structure settings (:data:`PAPER_STAGE_EPOCHS`, :data:`QUICK_GEOMETRY`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fieldkern.cryoem.config import ReconstructionConfig


@dataclass
class CryoEMPreset:
    """Data-set size and training settings of one named run.

    Attributes:
        box: simulated box, pixels; apix: pixel size, A; n_particles, snr: the simulated set.
        recon: the trainer's settings.
        perturb_deg: ``--pose-init perturbed`` rotates the true poses about a random axis by up
            to this angle; coarse_deg: ``coarse``, by an angle in this range (degrees; the
            paper's ``[pi/4, pi/2]``).
    """

    name: str
    box: int
    apix: float
    n_particles: int
    snr: float
    recon: ReconstructionConfig
    perturb_deg: float = 20.0
    coarse_deg: tuple[float, float] = (45.0, 90.0)
    description: str = ""


CRYOEM_PRESETS: dict[str, CryoEMPreset] = {
    "quick": CryoEMPreset(
        "quick", box=32, apix=3.0, n_particles=3000, snr=0.1,
        # Against the paper's steps per batch: batches of 1000 (3 per epoch) with 5 volume steps at
        # 5x the learning rate, 5 pose steps at 4x it, and a spherical support. Measured on the
        # quick data sets (README): better maps and poses than the paper's per-batch steps in
        # a fifth of the time.
        recon=ReconstructionConfig(
            hidden_features=128, epochs=24, stage_epochs=(3, 6), batch_size=1000, volume_steps=5,
            pose_steps=5, volume_lr=5e-3, pose_lr=4e-2, pose_lr_decay=0.8, pose_start_stage=2,
            support="sphere",
        ),
        description="box 32 at 3 A (1OL5: 40 at 2.4 A), 3000 particles: 1-2 minutes on a 2-core CPU",
    ),
    "paper": CryoEMPreset(
        "paper", box=80, apix=1.25, n_particles=50_000, snr=0.1,
        recon=ReconstructionConfig(),  # the authors' settings (the paper's appendix B)
        description="the paper's data-set size and training schedule (GPU)",
    ),
    "tiny": CryoEMPreset(
        "tiny", box=16, apix=6.0, n_particles=120, snr=0.1,
        recon=ReconstructionConfig(
            hidden_features=16, epochs=3, stage_epochs=(1, 2), batch_size=60, volume_steps=2,
            pose_steps=2, volume_lr=2e-3,
        ),
        description="smoke tests: seconds",
    ),
}

#: The global pose search's grid for the inits far from the truth (``--pose-init uniform``
#: / ``random``) when ``--pose-search`` is not given: 4608 super-Fibonacci rotations (a random
#: rotation lies 7.4 degrees from the nearest on average, 13.1 at most of 200,000 drawn), the grid that took the coarse init (45-90 degrees off) to 9.7 A on the
#: quick 4AKE data (box 32). One grid for every box: on the quick data, with
#: :data:`AB_INITIO_SEARCH_TEMPERATURE`, it took uniform and random inits of 4AKE (box 32)
#: and 1OL5 (box 40), two seeds each, below 9 A (docs/cryoem.md).
AB_INITIO_POSE_SEARCH = 4608

#: The search's temperature for the far inits when ``--search-temperature`` is not given
#: (``ReconstructionConfig.search_temperature``). Measured on the quick 1OL5 data
#: (docs/cryoem.md, "Ab initio"): the best fit (0) and a draw at 1 (nearly the best fit: the
#: likeliest pose holds 80% of the posterior from the first search) locked into a chimera
#: (12.77 / 13.16 A); 10 keeps the first draws broad (the likeliest pose under 10% through
#: stage 1) and took both inits of both structures to 7.5-8.7 A, seeds 0 and 1.
AB_INITIO_SEARCH_TEMPERATURE = 10.0

#: The authors' stage epochs per structure (the paper's appendix B).
PAPER_STAGE_EPOCHS = {"1ol5": (15, 30), "4ake": (25, 50)}

#: ``(epochs, stage_epochs)`` for the inits far from the truth (``--pose-init uniform`` /
#: ``random``), per preset. ``paper``: appendix E's 30 epochs for each of the first two
#: scales; it does not give the last scale's, so the main text's are kept (50 for 4AKE, 70
#: for 1OL5: :func:`ab_initio_schedule`). ``quick``: measured on the quick data
#: (docs/cryoem.md, "Ab initio").
AB_INITIO_STAGE_EPOCHS = {"paper": (30, 60), "quick": (6, 12)}
AB_INITIO_LAST_STAGE_EPOCHS = {"quick": 18}

#: (box, apix) of the quick preset where the default box 32 at 3 A is not enough. 1OL5's
#: pose error could not drop 30% at box 32 even against the true map (10.01 -> 6.9 deg with
#: 100 pose steps per particle); 40 pixels of 2.4 A (same field of view, finer sampling)
#: gave 10.01 -> 5.94 deg and 7.70 A (Nyquist 4.8 A) with the quick schedule.
QUICK_GEOMETRY = {"1ol5": (40, 2.4)}


def ab_initio_schedule(name: str, structure: str | None = None) -> tuple[int, tuple[int, ...]] | None:
    """``(epochs, stage_epochs)`` of preset ``name`` for a far pose init (None: its usual
    schedule): :data:`AB_INITIO_STAGE_EPOCHS`, then the last stage's usual epochs."""
    if name not in AB_INITIO_STAGE_EPOCHS:
        return None
    switches = AB_INITIO_STAGE_EPOCHS[name]
    usual = CRYOEM_PRESETS[name].recon
    usual_switches = PAPER_STAGE_EPOCHS.get(structure, usual.stage_epochs) if name == "paper" else usual.stage_epochs
    last = AB_INITIO_LAST_STAGE_EPOCHS.get(name, usual.epochs - usual_switches[-1])
    return switches[-1] + last, switches


def cryoem_preset(name: str, structure: str | None = None, pose_init: str | None = None, **overrides) -> CryoEMPreset:
    """A copy of preset ``name`` for ``structure`` (a key of :data:`PAPER_STAGE_EPOCHS` or
    :data:`QUICK_GEOMETRY` changes it) and ``pose_init`` (a far one takes
    :func:`ab_initio_schedule`), with ``overrides`` that are not None applied to its fields
    or its ``recon``. An override wins over the per-structure and per-init settings."""
    from fieldkern.cryoem.poses import FAR_POSE_INITS

    if name not in CRYOEM_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(CRYOEM_PRESETS)}")
    preset = CRYOEM_PRESETS[name]
    recon_fields = set(ReconstructionConfig.__dataclass_fields__)
    recon_over = {k: v for k, v in overrides.items() if k in recon_fields and v is not None}
    top_over = {k: v for k, v in overrides.items() if k not in recon_fields and v is not None}
    far = ab_initio_schedule(name, structure) if pose_init in FAR_POSE_INITS else None
    if far is not None and not {"epochs", "stage_epochs"} & set(recon_over):
        recon_over["epochs"], recon_over["stage_epochs"] = far
    if name == "paper" and structure in PAPER_STAGE_EPOCHS and "stage_epochs" not in recon_over:
        recon_over["stage_epochs"] = PAPER_STAGE_EPOCHS[structure]
    if name == "quick" and structure in QUICK_GEOMETRY and "box" not in top_over and "apix" not in top_over:
        top_over["box"], top_over["apix"] = QUICK_GEOMETRY[structure]
    recon = replace(preset.recon, **recon_over)
    return replace(preset, recon=recon, **top_over)


def scale_epochs(preset: CryoEMPreset, epochs: int) -> CryoEMPreset:
    """``preset`` trained for ``epochs`` epochs, its stage switches at the same fractions."""
    old = preset.recon.epochs
    switches, last = [], 0
    for e in preset.recon.stage_epochs:
        s = min(max(last + 1, round(e * epochs / old)), epochs - 1)
        switches.append(s)
        last = s
    if any(b <= a for a, b in zip(switches, switches[1:])) or (switches and switches[0] < 1):
        raise ValueError(f"{epochs} epochs are too few for {len(switches) + 1} stages")
    return replace(preset, recon=replace(preset.recon, epochs=epochs, stage_epochs=tuple(switches)))


__all__ = ["AB_INITIO_POSE_SEARCH", "AB_INITIO_SEARCH_TEMPERATURE", "AB_INITIO_STAGE_EPOCHS", "CRYOEM_PRESETS", "PAPER_STAGE_EPOCHS", "ab_initio_schedule", "QUICK_GEOMETRY", "CryoEMPreset", "cryoem_preset", "scale_epochs"]
