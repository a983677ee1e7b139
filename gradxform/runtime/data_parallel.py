"""Data parallelism: R replicas of every pipeline stage, their gradients averaged through
``torch.distributed`` collectives on the stage's process group.

Rank layout: ``rank = stage * replicas + replica``. The R replicas of stage s are the ranks
``s*R .. s*R + R - 1`` (one process group per stage, made with ``new_subgroups_by_enumeration``); a
point-to-point message from stage s of replica r goes to stage s +- 1 of the same replica r (rank
``(s +- 1) * R + r``). Each replica trains on a disjoint shard of every global batch (the
``DistributedSampler`` split: sample i of a global batch of R*b goes to replica i mod R), and at each
optimizer step its stage's gradients are summed over the group and divided by R, so that with
mean-reduced losses R replicas of batch b take the step one process takes with batch R*b.

Every collective goes through :class:`Collectives`, which tallies the bytes it was handed
(``numel * element_size`` of each all-reduced or broadcast tensor; what the wire carries depends on
the backend's algorithm: a ring all-reduce sends about 2 (R-1)/R times that). The tally per optimizer
step is written into ``metrics.jsonl`` as ``allreduce_bytes``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..errors import GradxformError


def rank_of(stage: int, replica: int, replicas: int) -> int:
    """The rank hosting ``stage`` of ``replica``."""
    return stage * replicas + replica


def place(rank: int, replicas: int) -> tuple[int, int]:
    """(stage, replica) of ``rank``."""
    return divmod(rank, replicas)


def stages_for(world: int, replicas: int) -> int:
    """Pipeline stages in a world of ``world`` ranks holding ``replicas`` replicas of each."""
    if replicas < 1:
        raise GradxformError(f"--replicas must be at least 1, got {replicas}")
    if world % replicas:
        raise GradxformError(f"--replicas {replicas} does not divide the {world} processes (world size = "
                             f"replicas x stages)",
                             hint=f"use --nproc {replicas * max(1, world // replicas)} or a --replicas that "
                                  f"divides {world}")
    return world // replicas


def shard(batch: tuple[torch.Tensor, ...], replica: int, replicas: int) -> tuple[torch.Tensor, ...]:
    """Replica ``replica``'s part of a global batch: every R-th sample from its own (DistributedSampler's
    interleaved split, so the shards are disjoint and cover the batch)."""
    return tuple(t[replica::replicas] for t in batch)


class Collectives:
    """``all_reduce`` and ``broadcast`` on a process group, tallying the bytes handed to them."""

    def __init__(self) -> None:
        self.bytes = 0

    def all_reduce(self, tensor: torch.Tensor, group: Any = None, op: Any = None) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        dist.broadcast(tensor, src, group=group)
        return tensor

    def average(self, tensors: Sequence[torch.Tensor], group: Any, size: int) -> None:
        """Replace each tensor by its mean over the ``size`` ranks of ``group``: one all-reduce of one
        flat buffer (a bucket), not one per tensor."""
        tensors = [t for t in tensors if t is not None]
        if not tensors or size == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.all_reduce(flat, group)
        flat /= size
        pos = 0
        for t in tensors:
            t.copy_(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()


def gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every parameter's gradient, a zero one where backward left none: all replicas must hand the
    all-reduce buffers of one layout."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


class DataParallel:
    """The process groups of a world of ``stages x replicas`` ranks, seen from ``rank``.

    Creating a group is a collective over the whole world: every rank makes every group, in the same
    order, whether or not it belongs to it.
    """

    def __init__(self, rank: int, stages: int, replicas: int):
        self.rank, self.stages, self.replicas = rank, stages, replicas
        self.stage, self.replica = place(rank, replicas)
        self.comm = Collectives()
        self.stage_group, _ = dist.new_subgroups_by_enumeration(
            [[rank_of(s, r, replicas) for r in range(replicas)] for s in range(stages)])
        # one pipeline per replica, for engines that drive the whole pipeline (torch.distributed.pipelining)
        self.pipeline_group = None
        if stages > 1:
            self.pipeline_group, _ = dist.new_subgroups_by_enumeration(
                [[rank_of(s, r, replicas) for s in range(stages)] for r in range(replicas)])

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Mean of the stage's gradients over its replicas (before the optimizer step)."""
        self.comm.average(gradients(params), self.stage_group, self.replicas)

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Mean of the floating-point buffers (BatchNorm statistics) over the replicas, so that every
        replica evaluates the same model (each saw only its shard's batch statistics)."""
        self.comm.average([b for b in module.buffers() if b.is_floating_point()], self.stage_group, self.replicas)

    def stage_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over this stage's replicas, in place."""
        return self.comm.all_reduce(tensor, self.stage_group)
