"""``dsp``: Diversely Stale Parameters (docs/methods.md §2).

PETRA's tick table; every stage but the last keeps its input and recomputes itself in backward with
its *current* weights, so the gradient is taken at weights newer than the forward's.
"""

from __future__ import annotations

from typing import Any

from .base import Policy, register
from .families import AsynchronousSchedule
from .policies import GraphPolicy, RecomputePolicy


@register
class Dsp(AsynchronousSchedule):
    name = "dsp"
    summary = "asynchronous pipeline; stages keep their input, backward at the current weights"

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, transient=True) if stage == stages - 1 else RecomputePolicy(self.layout, "input")
