"""Frequency marching's rule (fieldkern.train.marching) on synthetic FSC curves, its
schedule, and run_stages ending early."""

import math

import pytest

from fieldkern.train import Callback, StageSchedule, StopTraining, run_stages
from fieldkern.train.marching import (
    FSCMarching,
    MarchingSchedule,
    MarchingStep,
    band_score,
    epochs_since_best,
    resolved_shell,
    sudden_drop,
    value_at,
)

SHELLS = 16


def curve(r0: float, width: float = 1.5) -> list[float]:
    """A smooth FSC-like curve through 0.5 at shell r0."""
    return [1 / (1 + math.exp((k - r0) / width)) for k in range(SHELLS)]


def march(rule, curves, stage=2, n_stages=3, edge=15.0, limit=None):
    """Decisions for successive epochs' curves at one stage."""
    history = []
    for epoch, c in enumerate(curves):
        step = rule.decide(c, epoch, stage, n_stages, edge, history, limit)
        history.append(step)
        limit = step.support_limit
    return history


def test_resolved_shell_and_value_at_interpolate_linearly():
    c = [1.0, 0.8, 0.6, 0.1, 0.0]
    assert resolved_shell(c, 0.143) == pytest.approx(2 + (0.6 - 0.143) / 0.5)
    assert resolved_shell([0.1, 0.0], 0.143) == 0.0
    assert resolved_shell([1.0, 0.9, 0.8], 0.143) == 2.0
    assert value_at(c, 1.25) == pytest.approx(0.75)
    assert value_at(c, 9.0) == 0.0 and value_at(c, -1.0) == 1.0


def test_an_improving_curve_continues():
    steps = march(FSCMarching(), [curve(6 + 0.5 * e) for e in range(8)])
    assert [s.decision for s in steps] == ["continue"] * 8
    assert steps[-1].resolved_shell > steps[0].resolved_shell


@pytest.mark.parametrize("stage, expected", [(0, "next"), (1, "next"), (2, "stop")])
def test_a_plateau_moves_to_the_next_stage_or_stops_at_the_last(stage, expected):
    rule = FSCMarching(min_epochs=2, patience=2, min_gain=0.01)
    curves = [curve(6), curve(8), curve(9), curve(9.05), curve(9.08)]
    decisions = [s.decision for s in march(rule, curves, stage=stage)]
    # improving, then two epochs without a gain of 0.01 in the band's mean FSC
    assert decisions == ["continue", "continue", "continue", "continue", expected]


def test_a_jittering_crossing_with_a_rising_band_mean_goes_on():
    """The resolved shell jumps back and forth (as on the quick data) while the curve's
    band mean still rises: not a plateau."""
    curves = [curve(8 + 0.1 * e) for e in range(8)]
    for e in range(1, 8, 2):
        curves[e][10] = 0.13  # a dip below 0.143 at shell 10 on odd epochs (no sudden drop)
    steps = march(FSCMarching(min_epochs=2, patience=2, min_gain=0.001), curves)
    shells, scores = [s.resolved_shell for s in steps], [s.score for s in steps]
    assert all(b < a - 0.5 for a, b in zip(shells[::2], shells[1::2]))  # the crossing falls back
    assert all(b > a + 0.001 for a, b in zip(scores[::2], scores[2::2]))  # the band mean rises
    assert [s.decision for s in steps] == ["continue"] * 8


def test_band_score_and_epochs_since_best():
    assert band_score([1.0, 0.8, 0.6, 0.1], 2.7) == pytest.approx(0.7)
    assert band_score([1.0, 0.8, 0.6, 0.1], 0.5) == pytest.approx(0.8)  # at least shell 1
    assert epochs_since_best([0.1, 0.5, 0.52, 0.51], 0.05) == 2  # 0.52 is no new best
    assert epochs_since_best([0.1, 0.5, 0.52, 0.51], 0.0) == 1
    assert epochs_since_best([float("nan"), 0.3], 0.1) == 0  # a row from an older log


def test_a_stage_resolved_to_its_band_edge_moves_on_after_min_epochs():
    """A coarse band is resolved at once: the resolved shell is capped at the edge."""
    rule = FSCMarching(min_epochs=2, patience=1)
    steps = march(rule, [curve(8), curve(9)], stage=0, edge=1.5)
    assert [s.decision for s in steps] == ["continue", "next"]
    assert steps[0].resolved_shell == 1.5 and steps[0].band_edge == 1.5
    assert steps[0].fsc_at_edge == pytest.approx(value_at(curve(8), 1.5))
    # the last stage never ends for being resolved to its edge (it is Nyquist)
    assert [s.decision for s in march(rule, [curve(8), curve(9)], stage=2, edge=1.5)] == ["continue"] * 2


def test_by_default_a_resolved_coarse_band_gets_three_epochs():
    """The defaults keep a coarse stage 3 epochs even when its band is resolved at once (the
    quick data's coarse fields still improved then; ``FSCMarching.min_epochs``)."""
    steps = march(FSCMarching(), [curve(8), curve(9), curve(10), curve(11)], stage=1, edge=4.0)
    assert [s.decision for s in steps[:3]] == ["continue", "continue", "next"]


def test_with_settle_gain_a_resolved_coarse_band_waits_while_its_score_rises():
    """Ab initio (``settle_gain``): a coarse band resolved to its edge whose score still gains
    more than ``settle_gain`` an epoch goes on; the first epoch that gains less ends it."""
    scores = [0.75, 0.86, 0.88, 0.905, 0.91, 0.912]
    curves = [[1.0] + [s] * 4 + [0.0] * (SHELLS - 5) for s in scores]  # resolved to the edge
    assert [band_score(c, 4.0) for c in curves] == pytest.approx(scores)
    default = march(FSCMarching(), curves, stage=1, edge=4.0)
    assert [s.decision for s in default][:3] == ["continue", "continue", "next"]
    settling = march(FSCMarching(settle_gain=0.01), curves, stage=1, edge=4.0)
    # gains 0.11, 0.02, 0.025, 0.005: it ends at the first epoch that gains under 0.01
    assert [s.decision for s in settling][:5] == ["continue"] * 4 + ["next"]
    # the plateau rule still ends a stage that never resolves its band
    unresolved = [[1.0, 0.5, 0.1] + [0.0] * (SHELLS - 3)] * 10
    steps = march(FSCMarching(settle_gain=0.01, patience=2), unresolved, stage=1, edge=4.0)
    assert [s.decision for s in steps][:3] == ["continue", "continue", "next"]
    # and the last stage is as without it
    curves = [curve(6 + 0.5 * e) for e in range(8)]
    assert march(FSCMarching(settle_gain=0.01), curves) == march(FSCMarching(), curves)


def test_only_the_current_stage_counts_for_a_plateau():
    rule = FSCMarching(min_epochs=1, patience=2)
    history = march(rule, [curve(4)] * 3, stage=0, edge=8.0)
    assert [s.decision for s in history] == ["continue", "continue", "next"]
    step = rule.decide(curve(6), 3, 1, 3, 15.0, history)
    assert step.decision == "continue"  # stage 1's first epoch is its best so far


def test_a_sudden_drop_limits_the_support_once():
    drop = [1.0, 0.98, 0.95, 0.93, 0.9, 0.2, 0.1, 0.05] + [0.0] * 8
    assert sudden_drop(drop, 15, drop=0.5, width=2, start=0.6) == 4
    steps = march(FSCMarching(patience=1), [curve(9), drop, drop, drop])
    assert [s.decision for s in steps][:2] == ["continue", "limit"]
    assert steps[1].support_limit == 4.0
    # limited: no second limit, the resolved shell is capped at the limit, and a plateau stops
    assert all(s.support_limit == 4.0 for s in steps[1:])
    assert steps[2].resolved_shell <= 4.0
    assert steps[2].score == pytest.approx(band_score(drop, 4.0))  # the score too stops at the limit
    assert steps[3].decision == "stop"
    # a coarse stage's curve is not trusted for drops
    assert march(FSCMarching(), [drop], stage=1)[0].decision == "continue"
    # and with drop=None no curve limits the band: the plateau stops it
    steps = march(FSCMarching(patience=1, drop=None), [curve(9), drop, drop, drop])
    assert [s.decision for s in steps][1:3] == ["continue", "stop"]
    assert all(s.support_limit is None for s in steps)


def test_a_drop_while_the_score_still_rises_is_the_front_not_a_limit():
    """Halves still converging (ab initio): a steep fall at the front of what they agree on,
    the band's score rising every epoch, limits nothing; once the score stalls it does."""
    def front(r):  # agreement up to shell r, then a fall of 0.8 within one shell
        return [0.95] * r + [0.1] * (SHELLS - r)
    rule = FSCMarching(min_epochs=1, patience=3)
    rising = march(rule, [front(5), front(6), front(7)])
    assert all(sudden_drop(front(r), 15, 0.5, 2, 0.6) is not None for r in (5, 6, 7))
    assert [s.decision for s in rising] == ["continue"] * 3 and rising[-1].support_limit is None
    stalled = march(rule, [front(5), front(6), front(7), front(7)])
    assert stalled[-1].decision == "limit" and stalled[-1].support_limit == 6.0


def test_smooth_curves_and_drops_beyond_the_band_are_not_sudden_drops():
    assert sudden_drop(curve(8, width=1.0), 15, 0.5, 2, 0.6) is None  # ~0.23 per shell at most
    late = [1.0] * 10 + [0.0] * 6
    assert sudden_drop(late, 15, 0.5, 2, 0.6) == 9
    assert sudden_drop(late, 8, 0.5, 2, 0.6) is None  # outside the band
    noise = [1.0, 0.5, 0.3, 0.2] + [0.0] * 12  # a drop from below drop_from is the curve's tail
    assert sudden_drop(noise, 15, 0.25, 2, 0.6) is None


@pytest.mark.parametrize("kwargs, name", [
    ({"min_epochs": 0}, "min_epochs"), ({"patience": 1.5}, "patience"), ({"drop_width": 0}, "drop_width"),
    ({"threshold": 1.5}, "threshold"), ({"min_gain": -1}, "min_gain"), ({"drop": 0}, "drop"),
    ({"settle_gain": -0.1}, "settle_gain"), ({"settle_gain": float("nan")}, "settle_gain"),
])
def test_bad_constants_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FSCMarching(**kwargs)


def test_bad_decide_arguments_are_refused():
    with pytest.raises(ValueError, match="stage"):
        FSCMarching().decide(curve(5), 0, 3, 3, 4.0)
    with pytest.raises(ValueError, match="2 shells"):
        FSCMarching().decide([1.0], 0, 0, 3, 4.0)


def test_steps_round_trip_through_their_dicts():
    step = FSCMarching().decide(curve(5), 4, 1, 3, 6.0)
    assert MarchingStep(**step.as_dict()) == step
    assert set(step.as_dict()) == {"epoch", "stage", "band_edge", "fsc_at_edge", "resolved_shell", "decision",
                                   "support_limit", "score"}


def test_marching_schedule_follows_its_switches():
    s = MarchingSchedule(3)
    assert s.staged and s.n_stages == 3 and s.stage_at(10) == 0
    s.switch(4)
    assert [s.stage_at(e) for e in (3, 4, 9)] == [0, 1, 1]
    with pytest.raises(ValueError, match="does not follow"):
        s.switch(4)
    s.switch(7)
    assert s.stage_at(7) == 2
    with pytest.raises(ValueError, match="last stage"):
        s.switch(9)
    assert MarchingSchedule(3, (2, 5)).stage_at(5) == 2
    with pytest.raises(ValueError):
        MarchingSchedule(2, (1, 2))


class _Log(Callback):
    def __init__(self, stop_after=None):
        self.events, self.stop_after = [], stop_after

    def on_stage_end(self, stage, step):
        self.events.append(("end", stage, step))

    def on_step_end(self, step, stage, loss):
        self.events.append(("step", step))
        if step == self.stop_after:
            raise StopTraining

    def on_train_end(self, n_steps):
        self.events.append(("train_end", n_steps))


def test_stop_training_ends_run_stages_after_that_step():
    log = _Log(stop_after=3)
    losses = run_stages(lambda step, stage: float(step), 10, StageSchedule((2,)), lambda s: None, callbacks=[log],
                        progress=False)
    assert losses == [0.0, 1.0, 2.0, 3.0]
    assert log.events[-2:] == [("end", 1, 4), ("train_end", 4)]
    assert ("step", 4) not in log.events
