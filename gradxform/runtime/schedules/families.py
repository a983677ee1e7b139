"""What schedules of one family share, so that each schedule module says only what is its own."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from ..pipelining import TorchPipeline
from .base import AccumulateOptions, Layout, Policy, Schedule, StepOptions, TickTable
from .policies import GraphPolicy
from .ticks import asynchronous, local, per_step


class AsynchronousSchedule(Schedule):
    """PETRA's tick table: stage j forwards micro-batch t - j and backwards t - 2(J-1) + j at tick t,
    no flush within an epoch. Its members differ only in the stage policy."""

    Options = AccumulateOptions
    family = "asynchronous"

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return asynchronous(self.name, stages, micro_batches, self.options.accumulate)


class LocalSchedule(Schedule):
    """Stage j forwards micro-batch t - j at tick t and trains at once on its own error signal (an
    auxiliary head, a feedback matrix): no backward message crosses a stage boundary. Its members
    differ only in the stage policy."""

    Options = AccumulateOptions
    family = "local"
    layout = Layout(backward=())

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return local(self.name, stages, micro_batches, self.options.accumulate)


class SynchronousPipeline(Schedule):
    """A flushed pipeline (GPipe, 1F1B): one optimizer step per ``micro_batches``, gradients averaged;
    across ranks it runs in torch.distributed.pipelining."""

    Options = StepOptions
    family = "synchronous"
    steps_together = True
    table: ClassVar[Callable[[str, int, int], TickTable]]

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return type(self).table(self.name, stages, micro_batches)

    def steps(self, stages: int, count: int) -> list[tuple[TickTable, int]]:
        return per_step(self.ticks, stages, count, self.options.micro_batches)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout)

    def distributed_runner(self, executor: Any, rank: int, world: int, device: Any, loss_fn: Any,
                           group: Any = None) -> Any:
        return TorchPipeline(executor, self.name, rank, world, device, loss_fn, group)
