"""``1f1b``: one forward, one backward (PipeDream-flush): the bubble of GPipe with fewer micro-batches
in flight (stage j holds at most J - j).

In one process on gradxform's own tick loop; across ranks through ``torch.distributed.pipelining``'s
``Schedule1F1B`` (:mod:`gradxform.runtime.pipelining`).
"""

from __future__ import annotations

from typing import Any

from ..pipelining import TorchPipeline
from .base import Policy, Schedule, StepOptions, TickTable, register
from .policies import GraphPolicy
from .ticks import one_f_one_b, per_step


@register
class OneFOneB(Schedule):
    name = "1f1b"
    summary = "synchronous pipeline: warm-up forwards, then one forward one backward; one update per step"
    Options = StepOptions
    family = "synchronous"
    steps_together = True

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return one_f_one_b(self.name, stages, micro_batches)

    def steps(self, stages: int, count: int) -> list[tuple[TickTable, int]]:
        return per_step(self.ticks, stages, count, self.options.micro_batches)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout)

    def distributed_runner(self, executor: Any, rank: int, world: int, device: Any, loss_fn: Any) -> Any:
        return TorchPipeline(executor, "1f1b", rank, world, device, loss_fn)
