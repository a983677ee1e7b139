"""``stash``: PipeDream's weight stashing (docs/methods.md §2).

PETRA's tick table; every stage but the last keeps its input and a copy of its weights at forward
time, and backwards through that copy: the gradient is the forward's, applied later.
"""

from __future__ import annotations

from typing import Any

from .base import AccumulateOptions, Policy, Schedule, TickTable, register
from .policies import GraphPolicy, RecomputePolicy
from .ticks import asynchronous


@register
class Stash(Schedule):
    name = "stash"
    summary = "asynchronous pipeline; stages keep their input and a weight copy (PipeDream)"
    Options = AccumulateOptions
    family = "asynchronous"
    keeps_weight_copies = True

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return asynchronous(self.name, stages, micro_batches, self.options.accumulate)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, transient=True) if stage == stages - 1 else RecomputePolicy(self.layout, "stash")
