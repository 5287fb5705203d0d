"""Frequency marching by half-map FSC (``--marching fsc``; the paper's appendix C).

Two reconstructions of the two half sets (:func:`fieldkern.cryoem.evaluation.split_halves`)
train side by side, one epoch each in turn. After every epoch the FSC between their maps at
the active scale goes to :class:`fieldkern.train.marching.FSCMarching`, which keeps the
stage, starts the next one, limits the fitted band (a sudden drop: the halves overfit their
noise) or ends training (the last stage stopped improving). Every decision is kept in both
checkpoints (:class:`~fieldkern.cryoem.checkpoint.TrainingState`), so a resumed run goes on
with the same schedule, and in ``results.json``.

Without a global pose search the halves are compared in the frame they share (no
alignment): they start from the same poses and refine them locally. With one (the far
inits, ab initio) each half settles in a frame and hand of its own, so half 2's map is first
aligned to half 1's by a global search that may mirror (:func:`~fieldkern.cryoem.alignment.align_volume`,
~1-2 s an epoch on 2 CPU cores at D = 32), and a coarse stage also waits until its score
settles (:func:`marching_rule`): there the coarse stages carry the poses from the search's
draws to their fits.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fieldkern.cryoem.alignment import align_volume
from fieldkern.cryoem.fsc import fourier_shell_correlation
from fieldkern.cryoem.spectra import band_edge
from fieldkern.train import Callback, StopTraining, run_stages
from fieldkern.train.marching import FSCMarching, MarchingSchedule, MarchingStep


@torch.no_grad()
def half_map_curve(halves) -> list[float]:
    """FSC ``(D/2,)`` between the two reconstructions' maps at their active scale (every rank);
    with a global pose search, after aligning the second map to the first (mirror allowed)."""
    first, second = (rec.volume().to(torch.float64) for rec in halves)
    if halves[0].config.pose_search > 0:
        second = align_volume(second, first, flip=True).volume
    return fourier_shell_correlation(first, second)[1].tolist()


#: :attr:`FSCMarching.settle_gain` under a global pose search (the far inits): a resolved
#: coarse stage goes on while its band's score still beats its best by more than this. On the
#: quick 4AKE data from random poses, without it stage 1 ended after its 3 epochs with the
#: score still rising 0.02-0.04 an epoch, and at seed 2 of 3 both halves locked into a wrong
#: map (23 A against the truth); with it stage 1 took 7-8 epochs and all 3 seeds reached
#: 8.6-8.8 A (docs/cryoem.md, "Ab initio under marching").
AB_INITIO_SETTLE_GAIN = 0.01


def marching_rule(config) -> FSCMarching:
    """The marching rule for a :class:`~fieldkern.cryoem.config.ReconstructionConfig`: the
    defaults; with ``pose_search``, coarse stages that also wait for their score to settle
    and no sudden-drop limit. Every limit measured ab initio made the map worse: at the
    plateau's last epoch it narrowed 4AKE's band to shell 8 and the map ended at 9.75 A
    (seed 1), and before the wait for a rising score it fired at shell 8 (9.91 A against
    8.77 A without it) and at shell 3."""
    if config.pose_search > 0:
        return FSCMarching(settle_gain=AB_INITIO_SETTLE_GAIN, drop=None)
    return FSCMarching()


def stage_band_edge(rec, stage: int) -> float:
    """The band edge of ``stage`` for ``rec``'s box and scales, Fourier shells."""
    cfg = rec.config
    return band_edge(stage, cfg.n_scales, rec.D, cfg.lambda1, cfg.lambda2)


class _March(Callback):
    """After each epoch: decide, book the decision in both halves' states, save both
    checkpoints, and end training on ``stop``."""

    def __init__(self, halves, schedule: MarchingSchedule, rule: FSCMarching, checkpoints, losses: list):
        self.halves, self.schedule, self.rule = halves, schedule, rule
        self.checkpoints, self.losses = checkpoints, losses

    def on_step_end(self, step, stage, loss):
        for rec in self.halves:
            rec.check_finite()  # before their maps are compared
        first = self.halves[0]
        n_stages, epochs = first.config.n_scales, first.config.epochs
        history = [MarchingStep(**row) for row in first.state.marching]
        step_ = self.rule.decide(half_map_curve(self.halves), step, stage, n_stages, stage_band_edge(first, stage),
                                 history, first.state.support_limit)
        if step + 1 >= epochs and step_.decision != "stop":
            step_ = replace(step_, decision="end")
        if step_.decision == "next":
            self.schedule.switch(step + 1)
        for rec, checkpoint, epoch_loss in zip(self.halves, self.checkpoints, self.losses):
            rec.state.marching.append(step_.as_dict())
            rec.state.support_limit = step_.support_limit
            rec.state.stage_switches = list(self.schedule.switches)
            rec.state.finished = step_.decision in ("stop", "end")
            rec.end_epoch(epoch_loss, checkpoint, checked=True)
        if step_.decision == "stop":
            raise StopTraining


def fit_halves(halves, checkpoints=(None, None), *, rule: FSCMarching | None = None, callbacks=(),
               progress: bool = True, time_limit: float | None = None) -> list[MarchingStep]:
    """Train two half-set :class:`~fieldkern.cryoem.reconstruct.Reconstruction` objects (the
    same settings, ``marching="fsc"``) under FSC marching from their state (fresh, or both
    loaded from checkpoints of the same epoch), saving ``checkpoints`` after every epoch;
    returns the run's decisions (the checkpoints' log included).

    ``callbacks``: stage callbacks (e.g. one :class:`~fieldkern.cryoem.outputs.StageMapWriter`
    per half); ``time_limit`` (seconds) as in :meth:`Reconstruction.fit`. ``config.epochs`` is
    the most epochs it trains; ``rule``: None takes :func:`marching_rule` of the config.
    FloatingPointError if a half diverges (the last good checkpoints are kept). Call on every rank.
    """
    first, second = halves
    if first.config.marching != "fsc" or second.config.marching != "fsc":
        raise ValueError("fit_halves needs two reconstructions with marching='fsc'")
    if first.state.epoch != second.state.epoch or first.state.marching != second.state.marching:
        raise ValueError(f"the half sets are at different points (epochs {first.state.epoch} and "
                         f"{second.state.epoch}, or different decisions): resume both from one run's checkpoints")
    rule = marching_rule(first.config) if rule is None else rule
    cfg = first.config
    if first.state.finished or first.state.epoch >= cfg.epochs:
        return [MarchingStep(**row) for row in first.state.marching]
    schedule = MarchingSchedule(cfg.n_scales, first.state.stage_switches)
    for rec in halves:
        rec.schedule = schedule  # the pose steps' learning-rate decay counts from its switches
    losses = [0.0, 0.0]

    def epoch(step, stage):
        losses[:] = [rec.train_epoch(step, stage) for rec in halves]
        return sum(losses) / 2

    def set_stage(stage):
        for rec in halves:
            rec.model.set_stage(stage)

    march = _March(halves, schedule, rule, checkpoints, losses)
    try:
        run_stages(epoch, cfg.epochs, schedule, set_stage, callbacks=[march, *callbacks, *first.time_limit(time_limit)],
                   progress=progress and first.dist.is_main, desc="epochs (2 half sets)", postfix_every=1,
                   start_step=first.state.epoch)
    except FloatingPointError as exc:
        kept = "; ".join(rec.kept_checkpoint(c) for rec, c in zip(halves, checkpoints))
        raise FloatingPointError(f"training stopped: {exc}; {kept}") from exc
    return [MarchingStep(**row) for row in first.state.marching]


__all__ = ["AB_INITIO_SETTLE_GAIN", "fit_halves", "half_map_curve", "marching_rule", "stage_band_edge"]
