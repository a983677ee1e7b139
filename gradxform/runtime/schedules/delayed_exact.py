"""``delayed-exact``: decoupled delayed gradients (DDG) (docs/methods.md §2).

PETRA's tick table; every stage keeps the whole autograd graph of a forward run on a snapshot of its
weights, so its backward is exactly the forward's gradient, applied later. The most memory, the same
numbers as ``stash``.
"""

from __future__ import annotations

from typing import Any

from .base import Policy, register
from .families import AsynchronousSchedule
from .policies import GraphPolicy


@register
class DelayedExact(AsynchronousSchedule):
    name = "delayed-exact"
    summary = "asynchronous pipeline; stages keep the autograd graph of a forward on a weight snapshot"
    keeps_weight_copies = True

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, snapshot=stage < stages - 1, transient=stage == stages - 1)
