"""``gpipe``: all M forwards of a step, then all M backwards, then one update (GPipe).

In one process on gradxform's own tick loop; across ranks through ``torch.distributed.pipelining``'s
``ScheduleGPipe`` (:mod:`gradxform.runtime.pipelining`). Bubble (J-1)/(M+J-1).
"""

from __future__ import annotations

from typing import Any

from ..pipelining import TorchPipeline
from .base import Policy, Schedule, StepOptions, TickTable, register
from .policies import GraphPolicy
from .ticks import gpipe, per_step


@register
class GPipe(Schedule):
    name = "gpipe"
    summary = "synchronous pipeline: all forwards, all backwards, one update per M micro-batches"
    Options = StepOptions
    family = "synchronous"
    steps_together = True

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return gpipe(self.name, stages, micro_batches)

    def steps(self, stages: int, count: int) -> list[tuple[TickTable, int]]:
        return per_step(self.ticks, stages, count, self.options.micro_batches)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout)

    def distributed_runner(self, executor: Any, rank: int, world: int, device: Any, loss_fn: Any) -> Any:
        return TorchPipeline(executor, "gpipe", rank, world, device, loss_fn)
