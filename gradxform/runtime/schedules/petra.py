"""``petra``: Parallel End-to-end Training with Reversible Architectures (docs/methods.md §2).

Every stage forwards one micro-batch and backwards another at every tick, with no flush, no weight
stash and, on stages made only of reversible couplings, nothing stored: the backward message carries
the stage's reconstructed input with its gradient, and the stage before inverts it further with its
current weights. Stages that cannot be inverted keep their input (like ``dsp``); the last stage
computes the loss and its backward in the tick of its forward. With one stage it is backprop.
"""

from __future__ import annotations

from typing import Any

from .base import Layout, Policy, register
from .families import AsynchronousSchedule
from .policies import GraphPolicy, RecomputePolicy


@register
class Petra(AsynchronousSchedule):
    name = "petra"
    summary = "asynchronous pipeline; reversible stages rebuild their input instead of storing it"
    layout = Layout(backward=("gradients", "activations"))

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        if stage == stages - 1:  # forward and backward in one tick
            return GraphPolicy(self.layout, transient=True)
        return RecomputePolicy(self.layout, "invert" if inverse is not None else "input")
