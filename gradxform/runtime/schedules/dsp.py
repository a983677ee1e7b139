"""``dsp``: Diversely Stale Parameters (docs/methods.md §2).

PETRA's tick table; every stage but the last keeps its input and recomputes itself in backward with
its *current* weights, so the gradient is taken at weights newer than the forward's.
"""

from __future__ import annotations

from typing import Any

from .base import AccumulateOptions, Policy, Schedule, TickTable, register
from .policies import GraphPolicy, RecomputePolicy
from .ticks import asynchronous


@register
class Dsp(Schedule):
    name = "dsp"
    summary = "asynchronous pipeline; stages keep their input, backward at the current weights"
    Options = AccumulateOptions
    family = "asynchronous"

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return asynchronous(self.name, stages, micro_batches, self.options.accumulate)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, transient=True) if stage == stages - 1 else RecomputePolicy(self.layout, "input")
