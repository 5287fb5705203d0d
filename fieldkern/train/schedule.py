"""Stage schedules: which scale of a multiscale model is being fit at each step.

A "step" is whatever unit the caller counts in: an optimiser iteration for image fitting,
an epoch for cryo-EM. The schedule knows nothing about models or data.
"""

from __future__ import annotations

from collections.abc import Sequence

from fieldkern.checks import is_int


class StageSchedule:
    """Maps a step index to the active stage (``None``: vanilla, all scales at once).

    ``StageSchedule((500, 1000, 2000))`` is the paper's image schedule: stage 0 for steps
    ``< 500``, 1 for ``< 1000``, 2 for ``< 2000`` and 3 afterwards, i.e. ``len(switches) + 1``
    stages. ``StageSchedule(None)`` (or :meth:`vanilla`) never stages.

    Args:
        switches: strictly increasing positive step indices at which the next stage starts,
            or None for vanilla (non-staged) training.
    """

    def __init__(self, switches: Sequence[int] | None):
        if switches is not None:
            switches = tuple(switches)
            if any(not is_int(s) or s < 1 for s in switches):
                raise ValueError(f"switches must be positive ints, got {switches!r}")
            if any(b <= a for a, b in zip(switches, switches[1:])):
                raise ValueError(f"switches must be strictly increasing, got {switches!r}")
        self.switches = switches

    @classmethod
    def vanilla(cls) -> "StageSchedule":
        return cls(None)

    @classmethod
    def from_fractions(cls, total_steps: int, fractions: Sequence[float]) -> "StageSchedule":
        """Switches at ``round(f * total_steps)`` for each fraction ``f``.

        ``from_fractions(10000, (0.05, 0.1, 0.2))`` gives the paper's (500, 1000, 2000);
        shorter runs keep the same proportions.
        """
        if not all(0 < f < 1 for f in fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {tuple(fractions)!r}")
        switches = tuple(max(1, round(f * total_steps)) for f in fractions)
        return cls(switches)

    @property
    def staged(self) -> bool:
        return self.switches is not None

    @property
    def n_stages(self) -> int | None:
        """Number of stages (None for vanilla)."""
        return None if self.switches is None else len(self.switches) + 1

    def stage_at(self, step: int) -> int | None:
        """The stage active at ``step`` (0-based), None for vanilla."""
        if self.switches is None:
            return None
        return sum(step >= s for s in self.switches)

    def stage_end(self, stage: int, total_steps: int) -> int:
        """First step after ``stage`` (``total_steps`` for the last stage)."""
        if self.switches is None:
            raise ValueError("a vanilla schedule has no stages")
        return self.switches[stage] if stage < len(self.switches) else total_steps

    def __repr__(self) -> str:
        return f"StageSchedule({self.switches!r})"
