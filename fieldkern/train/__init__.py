"""Coarse-to-fine (staged) training, shared by the image and cryo-EM trainers.

:class:`StageSchedule` maps a step (iteration or epoch) to the active stage;
:func:`run_stages` runs a caller-supplied step function under it, switching the model's
stage and notifying :class:`Callback` objects at stage boundaries; :class:`TimeLimit` stops
a run cleanly between steps (to resume it later from its checkpoint);
:class:`~fieldkern.train.marching.FSCMarching` decides stage switches from a validation FSC.
"""

from fieldkern.train.loop import Callback, StopTraining, TimeLimit, TimeLimitReached, run_stages, stage_setter
from fieldkern.train.schedule import StageSchedule

__all__ = ["Callback", "StageSchedule", "StopTraining", "TimeLimit", "TimeLimitReached", "run_stages", "stage_setter"]
