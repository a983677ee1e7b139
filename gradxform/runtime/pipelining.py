"""GPipe and 1F1B through PyTorch's own engine, ``torch.distributed.pipelining``.

gradxform's stages are wrapped in manual ``PipelineStage``s: its ``pipeline()`` front-end re-traces
the model and fails on symbolic-trace GraphModules, and gradxform has already cut the stages. The
schedules are synchronous (one optimizer step per ``micro_batches``, gradients averaged), so their
results are comparable with gradxform's own engine and with backprop.

``PipelineStage`` infers shapes on a schedule's first step by pushing placeholder data through the
stage in training mode, which corrupts BatchNorm running statistics (seen: NaN). Each new schedule
therefore first runs one warm-up step with the buffers frozen and its gradients discarded.
"""

from __future__ import annotations

from typing import Any

import torch

from ..state import frozen_buffers
from .executor import StageExecutor


class TorchPipeline:
    """One rank's stage under ``ScheduleGPipe`` or ``Schedule1F1B``."""

    def __init__(self, executor: StageExecutor, schedule: str, rank: int, world: int, device: torch.device,
                 loss_fn: Any, group: Any = None):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        self.executor = executor
        self.rank, self.world, self.device = rank, world, device  # the stage and the number of stages
        self.group = group  # with data-parallel replicas: this replica's pipeline
        self.cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.loss_fn = loss_fn
        self.schedules: dict[int, Any] = {}

    def step(self, xs: list[tuple], ys: list[torch.Tensor]) -> None:
        """One synchronous step over the micro-batches ``xs`` (stage-0 inputs) and targets ``ys``."""
        m = len(ys)
        ex = self.executor
        if m not in self.schedules:  # the epoch's last step may have more (or fewer) micro-batches
            from torch.distributed.pipelining import PipelineStage

            # a PipelineStage is prepared for one number of micro-batches: one per step size
            stage = PipelineStage(ex.module, self.rank, self.world, self.device, group=self.group)
            self.schedules[m] = self.cls(stage, n_microbatches=m, loss_fn=self.loss_fn, scale_grads=True)
            with frozen_buffers(ex.module):  # shape inference happens here, harmlessly
                self._run(self.schedules[m], xs, ys)
            ex.optimizer.zero_grad(set_to_none=True)
        losses = self._run(self.schedules[m], xs, ys)
        for loss in losses or []:
            ex.record_loss(loss)
        ex.stats.forwards += m
        ex.stats.backwards += m
        ex.update(backwards=1)  # PyTorch already averaged the gradients over the micro-batches

    def _run(self, sched: Any, xs: list[tuple], ys: list[torch.Tensor]) -> list | None:
        if self.rank == 0:
            sched.step(*(torch.cat([x[k] for x in xs]) for k in range(len(xs[0]))))
            return None
        if self.rank == self.world - 1:
            losses: list[torch.Tensor] = []
            sched.step(target=torch.cat(ys), losses=losses)
            return losses
        sched.step()
        return None
