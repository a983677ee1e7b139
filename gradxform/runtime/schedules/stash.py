"""``stash``: PipeDream's weight stashing (docs/methods.md §2).

PETRA's tick table; every stage but the last keeps its input and a copy of its weights at forward
time, and backwards through that copy: the gradient is the forward's, applied later.
"""

from __future__ import annotations

from typing import Any

from .base import Policy, register
from .families import AsynchronousSchedule
from .policies import GraphPolicy, RecomputePolicy


@register
class Stash(AsynchronousSchedule):
    name = "stash"
    summary = "asynchronous pipeline; stages keep their input and a weight copy (PipeDream)"
    keeps_weight_copies = True

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, transient=True) if stage == stages - 1 else RecomputePolicy(self.layout, "stash")
