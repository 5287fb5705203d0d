import math
import re

import pytest

from fieldkern.train import Callback, StageSchedule, run_stages, stage_setter


def test_paper_schedule():
    s = StageSchedule.from_fractions(10000, (0.05, 0.1, 0.2))
    assert s.switches == (500, 1000, 2000) and s.n_stages == 4
    expected = {0: 0, 499: 0, 500: 1, 999: 1, 1000: 2, 1999: 2, 2000: 3, 9999: 3}
    assert {k: s.stage_at(k) for k in expected} == expected
    assert s.stage_end(0, 10000) == 500 and s.stage_end(3, 10000) == 10000


def test_vanilla_and_invalid_schedules():
    v = StageSchedule.vanilla()
    assert not v.staged and v.stage_at(123) is None and v.n_stages is None
    for bad, match in [((5, 5), "strictly increasing"), ((0, 3), "positive ints"), ((3, 2), "strictly increasing"),
                       ((1.5,), "positive ints")]:
        with pytest.raises(ValueError, match=rf"switches must be {match}, got {re.escape(repr(bad))}"):
            StageSchedule(bad)
    with pytest.raises(ValueError, match=r"fractions must lie in \(0, 1\), got \(0.5, 1.0\)"):
        StageSchedule.from_fractions(100, (0.5, 1.0))


class Recorder(Callback):
    def __init__(self, model):
        self.model, self.events = model, []

    def on_stage_start(self, stage, step):
        self.events.append(("start", stage, step, self.model.stage))

    def on_stage_end(self, stage, step):
        # The model must still be in the stage that ended (so snapshots see that scale).
        self.events.append(("end", stage, step, self.model.stage))

    def on_train_end(self, n_steps):
        self.events.append(("train_end", n_steps))


class FakeModel:
    def __init__(self):
        self.stage, self.calls = "unset", []

    def set_stage(self, stage, fair=True):
        self.stage = stage
        self.calls.append((stage, fair))


def test_run_stages_switches_and_notifies_in_order():
    model = FakeModel()
    rec = Recorder(model)
    seen = []
    losses = run_stages(lambda step, stage: seen.append((step, stage)) or float(step),
                        6, StageSchedule((2, 4)), stage_setter(model, fair=False), [rec], progress=False)
    assert losses == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert seen == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert model.calls == [(0, False), (1, False), (2, False)]
    assert rec.events == [
        ("start", 0, 0, 0), ("end", 0, 2, 0), ("start", 1, 2, 1), ("end", 1, 4, 1),
        ("start", 2, 4, 2), ("end", 2, 6, 2), ("train_end", 6),
    ]


def test_run_stages_vanilla_sets_none_once_and_skips_stage_callbacks():
    model = FakeModel()
    rec = Recorder(model)
    run_stages(lambda step, stage: 1.0, 3, StageSchedule.vanilla(), stage_setter(model), [rec], progress=False)
    assert model.calls == [(None, True)]
    assert rec.events == [("train_end", 3)]


def test_run_stages_refuses_non_finite_loss():
    with pytest.raises(FloatingPointError, match="step 2"):
        run_stages(lambda step, stage: math.nan if step == 2 else 1.0, 5, StageSchedule.vanilla(),
                   lambda s: None, progress=False)


def test_stage_setter_for_models_without_stages():
    set_stage = stage_setter(object())
    set_stage(3)  # no-op
    with pytest.raises(TypeError, match="no set_stage"):
        stage_setter(object(), fair=True)


def test_start_step_resumes_mid_schedule():
    seen, switched = [], []
    losses = run_stages(lambda step, stage: seen.append((step, stage)) or 1.0, 6, StageSchedule((2, 4)),
                        switched.append, progress=False, start_step=3)
    assert seen == [(3, 1), (4, 2), (5, 2)]
    assert switched == [1, 2]
    assert losses == [1.0, 1.0, 1.0]
    for bad in (-1, 6, 2.0):
        with pytest.raises(ValueError, match="start_step"):
            run_stages(lambda s, t: 0.0, 6, StageSchedule((2, 4)), switched.append, progress=False, start_step=bad)
