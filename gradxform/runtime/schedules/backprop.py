"""``backprop``: one micro-batch at a time through every stage, forward then backward (the reference
every other schedule is compared with)."""

from __future__ import annotations

from typing import Any

from .base import AccumulateOptions, Policy, Schedule, TickTable, register
from .policies import GraphPolicy
from .ticks import sequential


@register
class Backprop(Schedule):
    name = "backprop"
    summary = "ordinary backpropagation, one micro-batch at a time (the reference)"
    Options = AccumulateOptions
    family = "synchronous"
    steps_together = True

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return sequential(self.name, stages, micro_batches, self.options.accumulate)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout)
