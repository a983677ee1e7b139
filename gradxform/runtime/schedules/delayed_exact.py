"""``delayed-exact``: decoupled delayed gradients (DDG) (docs/methods.md §2).

PETRA's tick table; every stage keeps the whole autograd graph of a forward run on a snapshot of its
weights, so its backward is exactly the forward's gradient, applied later. The most memory, the same
numbers as ``stash``.
"""

from __future__ import annotations

from typing import Any

from .base import AccumulateOptions, Policy, Schedule, TickTable, register
from .policies import GraphPolicy
from .ticks import asynchronous


@register
class DelayedExact(Schedule):
    name = "delayed-exact"
    summary = "asynchronous pipeline; stages keep the autograd graph of a forward on a weight snapshot"
    Options = AccumulateOptions
    family = "asynchronous"
    keeps_weight_copies = True

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return asynchronous(self.name, stages, micro_batches, self.options.accumulate)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, snapshot=stage < stages - 1, transient=stage == stages - 1)
