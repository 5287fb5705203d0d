"""A generic coarse-to-fine training loop.

The loop owns only the bookkeeping every staged trainer needs: asking the schedule which
stage is active, switching the model's stage when it changes, telling callbacks when a
stage ends (e.g. to snapshot that scale's output), and a progress bar. What one step does
(one Adam step on an image; a cryo-EM batch sweep alternating volume and pose optimisers)
is the caller's ``step_fn``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from fieldkern.checks import is_int
from fieldkern.train.schedule import StageSchedule


class Callback:
    """Hooks called by :func:`run_stages`; override the ones you need.

    ``step`` counts in the loop's unit (iterations or epochs), 0-based.
    """

    def on_stage_start(self, stage: int, step: int) -> None:
        """``stage`` becomes active before ``step`` runs (the model is already switched)."""

    def on_stage_end(self, stage: int, step: int) -> None:
        """``stage`` has finished; ``step`` is the first step after it. Called before the
        model is switched to the next stage, so ``model(x)[-1]`` is still scale ``stage``."""

    def on_step_end(self, step: int, stage: int | None, loss: float) -> None:
        """After each step, with the loss ``step_fn`` returned."""

    def on_train_end(self, n_steps: int) -> None:
        """After the last step (and after the last ``on_stage_end``)."""


class StopTraining(Exception):
    """Raised by a callback's ``on_step_end`` to end :func:`run_stages` after that step (e.g.
    frequency marching decided the last stage is done): the stage ends, ``on_train_end`` is
    called, and the steps run so far are returned."""


class TimeLimitReached(Exception):
    """Raised by :class:`TimeLimit` after step ``step`` (0-based) when time is up."""

    def __init__(self, step: int, n_steps: int):
        super().__init__(f"time limit reached after step {step + 1} of {n_steps}")
        self.step, self.n_steps = step, n_steps


class TimeLimit(Callback):
    """Stop a run cleanly between steps once ``seconds`` have passed since it was made: after
    a step's other callbacks (list it last, e.g. after a checkpoint writer), never after the
    last step. ``agree``: ``flag -> bool`` that makes every process of a data-parallel run
    take the same decision (e.g. any rank's clock ran out)."""

    def __init__(self, seconds: float, n_steps: int, agree: Callable[[bool], bool] | None = None):
        if not seconds > 0:
            raise ValueError(f"seconds must be positive, got {seconds!r}")
        self.deadline = time.monotonic() + float(seconds)
        self.n_steps = n_steps
        self.agree = agree

    def on_step_end(self, step: int, stage: int | None, loss: float) -> None:
        if step + 1 >= self.n_steps:
            return
        up = time.monotonic() >= self.deadline
        if self.agree is not None:
            up = self.agree(up)
        if up:
            raise TimeLimitReached(step, self.n_steps)


def stage_setter(model, **stage_kwargs) -> Callable[[int | None], None]:
    """``stage -> model.set_stage(stage, **stage_kwargs)``; a no-op for models without stages.

    E.g. ``stage_setter(bacon, fair=False)`` for unfair staged BACON.
    """
    set_stage = getattr(model, "set_stage", None)
    if set_stage is None:
        if stage_kwargs:
            raise TypeError(f"{type(model).__name__} has no set_stage to pass {stage_kwargs} to")
        return lambda stage: None
    return lambda stage: set_stage(stage, **stage_kwargs)


def run_stages(
    step_fn: Callable[[int, int | None], float],
    n_steps: int,
    schedule: StageSchedule,
    set_stage: Callable[[int | None], None],
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    desc: str | None = None,
    postfix_every: int = 10,
    start_step: int = 0,
) -> list[float]:
    """Run steps ``start_step .. n_steps - 1`` under ``schedule``.

    Args:
        step_fn: ``(step, stage) -> loss``; performs one step (any number of optimiser
            updates) on a model whose stage is already set. Returns a float (or 0-dim
            tensor) for the progress bar and callbacks.
        n_steps: total steps.
        schedule: stage per step; a vanilla schedule calls ``set_stage(None)`` once and
            never calls the stage callbacks.
        set_stage: switches the model (see :func:`stage_setter`).
        callbacks: notified at stage starts/ends, after each step and at the end.
        progress: show a tqdm bar with the current stage and loss.
        desc: the bar's label.
        postfix_every: refresh the bar's loss every this many steps (refreshing is not free).
        start_step: first step to run, to resume an interrupted run (the stage active at
            ``start_step`` is set and announced with ``on_stage_start``).

    Returns:
        The loss of every step run, ``n_steps - start_step`` floats (fewer when a callback
        raised :class:`StopTraining`; the other callbacks of that step are not called).

    Raises:
        FloatingPointError: if a step returns a non-finite loss (diverged runs must not be
            reported as results).
    """
    from tqdm.auto import tqdm

    if not is_int(n_steps) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if not is_int(start_step) or not 0 <= start_step < n_steps:
        raise ValueError(f"start_step must be an int in [0, n_steps), got {start_step!r}")
    losses: list[float] = []
    stage = schedule.stage_at(start_step)
    set_stage(stage)
    if schedule.staged:
        for cb in callbacks:
            cb.on_stage_start(stage, start_step)
    bar = tqdm(range(start_step, n_steps), initial=start_step, total=n_steps, desc=desc,
               disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        new_stage = schedule.stage_at(step)
        if new_stage != stage:
            for cb in callbacks:
                cb.on_stage_end(stage, step)
            stage = new_stage
            set_stage(stage)
            for cb in callbacks:
                cb.on_stage_start(stage, step)
        loss = float(step_fn(step, stage))
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"loss became {loss} at step {step} (stage {stage})")
        losses.append(loss)
        try:
            for cb in callbacks:
                cb.on_step_end(step, stage, loss)
        except StopTraining:
            n_steps = step + 1
            break
        if progress and (step % postfix_every == 0 or step == n_steps - 1):
            bar.set_postfix(stage="-" if stage is None else stage, loss=f"{loss:.3g}", refresh=False)
    bar.close()
    if schedule.staged:
        for cb in callbacks:
            cb.on_stage_end(stage, n_steps)
    for cb in callbacks:
        cb.on_train_end(n_steps)
    return losses
