"""Frequency marching driven by a validation curve: when to leave a stage, when to stop.

A staged model fits one band after another (stage ``s`` sees frequencies up to its *band
edge*). With two independent half-set reconstructions, the Fourier shell correlation (FSC)
between them says how far up in frequency the data agree (the paper's appendix C; RELION's
gold-standard refinement). :class:`FSCMarching` turns the curve measured after each epoch
into a decision (:data:`DECISIONS`):

* ``"limit"``: at the last stage, once its score (below) no longer rises, the curve falls by
  more than ``drop`` within ``drop_width`` shells inside the band, from ``drop_from`` or above
  (the *sudden drop* of two refinements that overfit their noise differently). The fitted
  frequencies are limited to the shell before the drop (``support_limit``, Fourier pixels)
  from the next epoch on; the stage goes on. While the score still rises, a steep fall is
  the front of what the halves agree on so far: ab initio on the quick 4AKE data, the drop
  rule limited the band to shell 8 of 16 four epochs into the last stage, while the score
  rose 0.05 an epoch, and the map ended at 9.91 A against 8.77 A without that limit.
* ``"next"``: after ``min_epochs`` epochs in a coarse stage, its band is resolved (the
  *resolved shell*, where the FSC first falls below ``threshold``, linearly interpolated,
  reached the band edge) or the stage has plateaued: its *score*, the mean FSC over shells
  ``1 .. edge`` (up to the support limit once there is one), has not beaten the stage's best
  by more than ``min_gain`` for ``patience`` epochs. The next stage starts with the next epoch.
  With ``settle_gain`` set (the trainer sets it under a global pose search: ab initio), a
  resolved coarse band ends the stage only once its score no longer beats the stage's best
  by more than ``settle_gain``: there the coarse stages also carry the poses from the
  search's draws towards their fits, and the halves still converge while the score rises.
* ``"stop"``: the same plateau at the last stage: training ends.
* ``"continue"``: otherwise; ``"end"``: the epoch budget is spent (the caller's cap).

The rule works on plain floats (a curve per epoch), so it is tested on synthetic curves
and knows nothing of maps or models. A coarse stage's band is a few shells, so it resolves
its whole band within an epoch or two and moves on; the last stage's edge is Nyquist, and
it ends when the FSC stops improving. The plateau is judged on the band's mean FSC, not on
the resolved shell: on the quick data the resolved shell jumps by +-0.3 shells from epoch
to epoch while the map still improves (docs/cryoem.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fieldkern.checks import is_int
from fieldkern.train.schedule import StageSchedule

DECISIONS = ("continue", "limit", "next", "stop", "end")


@dataclass(frozen=True)
class MarchingStep:
    """One epoch's decision (a row of ``results.json``'s ``marching`` log).

    ``band_edge``, ``resolved_shell`` and ``support_limit`` in Fourier shells (shell ``r`` is
    ``D apix / r`` A); ``fsc_at_edge``: the FSC interpolated at the band edge; ``score``:
    the mean FSC over the band (:func:`band_score`).
    """

    epoch: int
    stage: int
    band_edge: float
    fsc_at_edge: float
    resolved_shell: float
    decision: str
    support_limit: float | None = None
    score: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FSCMarching:
    """The marching rule and its constants (module docstring). Defaults were chosen on the
    per-epoch curves of the quick cryo-EM data (docs/cryoem.md, "Ab initio ... and FSC marching").

    Attributes:
        threshold: FSC criterion of the resolved shell (0.143: half maps).
        min_epochs: epochs a stage runs before it may end (>= 1). 3: with 2, the quick
            data's coarse bands were resolved to their edges after 2 epochs while their
            score still rose 0.05-0.1 per epoch, and the finest stage, started from those
            fields, ended worse (4AKE half maps, full batches: 7.53 A against 7.27 A with 3).
        patience: epochs without a new best score that make a plateau (>= 1). 8: on the
            quick runs it stopped 2-4 epochs later than 5 and beat the fixed schedule in
            every run, where 5 left 4AKE's half maps 0.02-0.03 A behind it.
        min_gain: the score gain over the stage's best that makes a new best.
        drop, drop_width, drop_from: a sudden drop is a fall of more than ``drop`` within
            ``drop_width`` shells, starting at an FSC of at least ``drop_from``; ``drop``
            None: no ``"limit"`` ever.
        settle_gain: None (default): a coarse stage ends as soon as its band is resolved.
            A float: it also waits until the score no longer beats the stage's best by more
            than this (``"next"`` above).
    """

    threshold: float = 0.143
    min_epochs: int = 3
    patience: int = 8
    min_gain: float = 0.001
    drop: float | None = 0.5
    drop_width: int = 2
    drop_from: float = 0.6
    settle_gain: float | None = None

    def __post_init__(self):
        for name in ("min_epochs", "patience", "drop_width"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold!r}")
        if not self.min_gain >= 0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain!r}")
        if self.drop is not None and not 0 < self.drop <= 2:
            raise ValueError(f"drop must lie in (0, 2], got {self.drop!r}")
        if self.settle_gain is not None and not self.settle_gain >= 0:
            raise ValueError(f"settle_gain must be None or >= 0, got {self.settle_gain!r}")

    def decide(self, curve: Sequence[float], epoch: int, stage: int, n_stages: int, band_edge: float,
               history: Sequence[MarchingStep] = (), support_limit: float | None = None) -> MarchingStep:
        """The decision after ``epoch`` at ``stage`` (of ``n_stages``) from the FSC ``curve``
        (one value per shell ``0 .. D/2 - 1``) and the earlier steps ``history``; the band's
        edge and a current support limit in shells."""
        if len(curve) < 2:
            raise ValueError(f"curve must hold at least 2 shells, got {len(curve)}")
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage must lie in [0, {n_stages}), got {stage!r}")
        edge = min(float(band_edge), len(curve) - 1.0)
        cap = edge if support_limit is None else min(edge, support_limit)
        resolved = min(resolved_shell(curve, self.threshold), cap)
        score = band_score(curve, cap)
        step = {"epoch": epoch, "stage": stage, "band_edge": edge, "fsc_at_edge": value_at(curve, edge),
                "resolved_shell": resolved, "support_limit": support_limit, "score": score}
        # Only the last stage: a coarse scale's half-map FSC is unreliable beyond a few shells
        # (its ReLU clipping edges correlate between the halves); on the quick 1OL5 data a
        # "drop" at stage 1 limited the band to shell 3 and cost the map 22 A.
        last = stage == n_stages - 1
        scores = [h.score for h in history if h.stage == stage] + [score]
        # While the band's score still rises the halves are still converging (ab initio: their
        # poses still move from the search's draws to best fits), and a steep fall is the front
        # of what they agree on so far, not two fits that overfit their noise.
        rising = epochs_since_best(scores, self.min_gain) == 0
        drop = (sudden_drop(curve, edge, self.drop, self.drop_width, self.drop_from)
                if self.drop is not None and last and support_limit is None and not rising else None)
        if drop is not None:
            return MarchingStep(**{**step, "support_limit": float(drop)}, decision="limit")
        if len(scores) < self.min_epochs:
            return MarchingStep(**step, decision="continue")
        settled = self.settle_gain is None or epochs_since_best(scores, self.settle_gain) > 0
        if not last and resolved >= edge and settled:
            return MarchingStep(**step, decision="next")
        if epochs_since_best(scores, self.min_gain) < self.patience:
            return MarchingStep(**step, decision="continue")
        return MarchingStep(**step, decision="stop" if last else "next")


def band_score(curve: Sequence[float], edge: float) -> float:
    """The mean of ``curve`` over shells ``1 .. edge`` (at least shell 1): how well two maps
    agree across a band, smoother from epoch to epoch than where the curve crosses a threshold."""
    top = min(max(int(edge), 1), len(curve) - 1)
    return sum(float(c) for c in curve[1:top + 1]) / top


def epochs_since_best(scores: Sequence[float], min_gain: float) -> int:
    """Epochs since the best of ``scores``, where a score is a new best only when it beats the
    last best by more than ``min_gain`` (NaN scores, from older logs, never are)."""
    best, at = scores[0], 0
    for i, score in enumerate(scores[1:], 1):
        if score > best + min_gain or math.isnan(best):
            best, at = score, i
    return len(scores) - 1 - at


def value_at(curve: Sequence[float], shell: float) -> float:
    """``curve`` linearly interpolated at a fractional ``shell`` (clamped to the curve)."""
    shell = min(max(float(shell), 0.0), len(curve) - 1.0)
    r = min(int(shell), len(curve) - 2)
    t = shell - r
    return float(curve[r]) * (1 - t) + float(curve[r + 1]) * t


def resolved_shell(curve: Sequence[float], threshold: float) -> float:
    """The fractional shell where ``curve`` first falls below ``threshold`` (linear between
    shells; 0 when shell 0 is below it, the last shell when it never falls)."""
    if curve[0] < threshold:
        return 0.0
    for r in range(1, len(curve)):
        if curve[r] < threshold:
            f0, f1 = float(curve[r - 1]), float(curve[r])
            return (r - 1) + (f0 - threshold) / (f0 - f1)
    return float(len(curve) - 1)


def sudden_drop(curve: Sequence[float], edge: float, drop: float, width: int, start: float) -> int | None:
    """The last shell before a sudden drop of ``curve`` inside the band (shells ``<= edge``),
    None when there is none: of the first run of shells ``r`` with ``curve[r] >= start`` and
    ``curve[r] - curve[r + k] > drop`` for some ``k <= width``, the last."""
    last = min(int(edge), len(curve) - 1)

    def drops_after(r: int) -> bool:
        return curve[r] >= start and any(curve[r] - curve[k] > drop for k in range(r + 1, min(r + width, last) + 1))

    for r in range(1, last):
        if drops_after(r):
            while r + 1 < last and drops_after(r + 1):
                r += 1
            return r
    return None


class MarchingSchedule(StageSchedule):
    """A stage schedule whose switches are decided as training goes (:meth:`switch`):
    ``n_stages`` stages, the ``switches`` so far (e.g. restored from a checkpoint)."""

    def __init__(self, n_stages: int, switches: Sequence[int] = ()):
        if not is_int(n_stages) or n_stages < 1:
            raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
        if len(switches) > n_stages - 1:
            raise ValueError(f"{len(switches)} switches for {n_stages} stages")
        super().__init__(tuple(switches))
        self._n_stages = n_stages

    @property
    def n_stages(self) -> int:
        return self._n_stages

    def switch(self, step: int) -> None:
        """The next stage starts at ``step``."""
        if len(self.switches) >= self._n_stages - 1:
            raise ValueError("already at the last stage")
        if self.switches and step <= self.switches[-1]:
            raise ValueError(f"switch at step {step} does not follow the last, {self.switches[-1]}")
        self.switches = (*self.switches, int(step))


__all__ = ["DECISIONS", "FSCMarching", "MarchingSchedule", "MarchingStep", "band_score", "epochs_since_best",
           "resolved_shell", "sudden_drop", "value_at"]
