"""``moonwalk``: exact gradients by Moonwalk's sweeps (docs/methods.md §4), one micro-batch at a time.

The gradient engine is in the model: a ``MoonwalkChain`` (the ``moonwalk`` pass) answers
``loss.backward()`` with a reverse sweep for the input cotangent and a forward sweep that forms each
layer's parameter gradient, keeping no activation per invertible layer. The schedule is backprop's
(one micro-batch through every stage, forward then backward), plus what Moonwalk needs: the model must
hold a MoonwalkChain, and ``mode`` may override the compiled sweep (``mixed``, ``forward``, ``naive``).
A pipelined Moonwalk would send (h, g) forwards in a third wave; it is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...errors import GradxformError
from ...nn.moonwalk import MoonwalkChain
from ...options import option
from .base import Policy, Schedule, TickTable, register
from .policies import GraphPolicy
from .ticks import sequential


@dataclass
class MoonwalkOptions:
    mode: Literal["compiled", "mixed", "forward", "naive"] = option(
        "compiled", "the sweep every MoonwalkChain runs: as compiled, mixed (reverse input sweep + forward vijp "
                    "sweep), forward (JVPs for the input cotangent) or naive (one JVP per parameter direction)")
    accumulate: int = option(1, "backwards per optimizer step (k)")

    def validate(self) -> None:
        if self.accumulate < 1:
            raise ValueError("accumulate must be at least 1")


@register
class Moonwalk(Schedule):
    name = "moonwalk"
    summary = "exact gradients from Moonwalk's reverse input sweep and forward vijp sweep"
    Options = MoonwalkOptions
    family = "synchronous"
    steps_together = True

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return sequential(self.name, stages, micro_batches, self.options.accumulate)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        if self.options.mode != "compiled":
            for chain in module.modules():
                if isinstance(chain, MoonwalkChain):
                    chain.mode = self.options.mode
        return GraphPolicy(self.layout)

    def check(self, staged: Any) -> None:
        if not any(isinstance(m, MoonwalkChain) for m in staged.modules()):
            raise GradxformError("the moonwalk schedule trains MoonwalkChains, and the model has none",
                                 hint="compile with the moonwalk pass (gradxform compile ... --pass moonwalk)")
