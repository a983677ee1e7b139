"""Tied parameters across stages: copies kept equal by summing their gradients before every step.

When ``split`` cuts between the users of one parameter (GPT-2's ``wte`` and ``lm_head``), each stage
holds its own copy (``StagedModule.tied``). Training then matches the unsplit model when the copies'
gradients are summed over the group before every optimizer step and every copy takes that same step:
in one process by adding them up, across ranks by an all-reduce among the ranks holding the group. That
needs the stages to step together, which the synchronous schedules do (backprop, gpipe, 1f1b,
forward-grad); in the asynchronous and local ones every stage steps on its own micro-batches, so the
copies would drift apart, and such a model is refused there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import GradxformError
from .executor import StageExecutor


class TiedCopies:
    """The groups of ``staged.tied`` whose copies live in the stages of ``executors``."""

    def __init__(self, staged: Any, executors: dict[int, StageExecutor], distributed: bool,
                 replicas: int = 1, replica: int = 0):
        self.groups = [list(g) for g in getattr(staged, "tied", [])]
        self.executors = executors
        self.distributed = distributed
        # every rank creates every group's process group, in the same order (a collective); with
        # data-parallel replicas, one per replica, among the ranks of that replica's stages
        self.process_groups = []
        for g in self.groups:
            mine = None
            for r in range(replicas if distributed else 0):
                pg = dist.new_group(sorted({j * replicas + r for j, _ in g}))
                mine = pg if r == replica else mine
            self.process_groups.append(mine)
        self.synced: set[int] = set()
        for j, ex in executors.items():
            if any(j == s for g in self.groups for s, _ in g):
                ex.before_update.append(lambda j=j: self.before_update(j))

    def check(self, schedule: Any) -> None:
        if self.groups and not schedule.steps_together:
            names = ", ".join(f"stage {j} '{n}'" for j, n in self.groups[0])
            raise GradxformError(f"the model has parameters tied across stages ({names}), and the "
                                 f"{schedule.name} schedule steps each stage on its own",
                                 hint="train it with backprop, gpipe or 1f1b, or split where no tied "
                                      "parameter is cut (split{at=...})")

    def _param(self, stage: int, name: str) -> torch.Tensor:
        return dict(self.executors[stage].module.named_parameters())[name]

    def before_update(self, stage: int) -> None:
        if self.distributed:
            for g, pg in zip(self.groups, self.process_groups):
                for j, name in g:
                    if j == stage:
                        p = self._param(j, name)
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad, group=pg)
            return
        # one process: the first stage to step in this round adds up every group for all of them
        step = self.executors[stage].stats.updates
        if step in self.synced:
            return
        self.synced.add(step)
        for g in self.groups:
            params = [self._param(j, name) for j, name in g]
            total = sum((p.grad for p in params if p.grad is not None), torch.zeros_like(params[0]))
            for p in params:
                p.grad = total.clone()
