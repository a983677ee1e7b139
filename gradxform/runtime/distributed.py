"""One stage per rank over ``torch.distributed`` point-to-point (gloo on CPU, NCCL on GPUs).

A message holds tensors of shapes the receiver does not know in advance (the last micro-batch may be
smaller; a stage may pass ``None``), so each is sent as a fixed-size header -- the number of fields and
of tensors in each (the schedule's layout names the fields), then per tensor a dtype code, rank and
sizes -- followed by the tensors. Plain ``isend``/``recv`` pairs are used (not batched): gloo is known
to hang on batched point-to-point. Every wait is bounded by the process group's timeout, so a dead
neighbour stops the others instead of hanging them.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from ..errors import GradxformError
from .data_parallel import place, rank_of
from .schedules.base import Message

HEADER = 64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
          torch.uint8, torch.int8, torch.int16]
TIMEOUT_S = int(os.environ.get("GRADXFORM_TIMEOUT", "60"))


class PointToPoint:
    """The transport for rank ``rank``, hosting one stage of one replica: with ``replicas`` R, stage
    ``rank // R`` of replica ``rank % R`` (:mod:`gradxform.runtime.data_parallel`). Messages go to the
    neighbouring stages of the same replica."""

    def __init__(self, rank: int, world: int, device: torch.device, replicas: int = 1):
        self.rank, self.world, self.device = rank, world, device
        self.replicas = replicas
        stage, self.replica = place(rank, replicas)
        self.stages = [stage]
        self.n_stages = world // replicas
        self.pending: list[Any] = []    # sends posted in this tick
        self.previous: list[Any] = []   # sends posted in the tick before
        self.sent_bytes = 0
        self.waits = {"wait_recv": 0.0, "wait_send": 0.0}  # seconds blocked on the neighbours

    def send(self, src: int, dst: int, kind: str, mb: int, message: Message) -> None:
        tensors = [t for field in message.values() for t in field]
        needed = 1 + len(message) + sum(1 if t is None else 2 + t.dim() for t in tensors)
        if needed > HEADER:
            raise GradxformError(f"a stage boundary carries too many tensors/dimensions for one header "
                                 f"({needed} > {HEADER} entries)",
                                 hint="cut the model where fewer tensors cross (split{at=...})")
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = len(message)
        pos = 1
        for field in message.values():
            header[pos] = len(field)
            pos += 1
        for t in tensors:
            if t is None:
                header[pos] = -1
                pos += 1
                continue
            header[pos], header[pos + 1] = DTYPES.index(t.dtype), t.dim()
            header[pos + 2: pos + 2 + t.dim()] = torch.tensor(t.shape)
            pos += 2 + t.dim()
        peer = self._peer(dst)
        self.pending.append(dist.isend(header.to(self.device), peer))
        for t in tensors:
            if t is not None:
                t = t.detach().contiguous().to(self.device)
                self.pending.append((dist.isend(t, peer), t))  # keep the buffer alive until sent
                self.sent_bytes += t.numel() * t.element_size()

    def _peer(self, stage: int) -> int:
        return rank_of(stage, self.replica, self.replicas)

    def recv(self, src: int, dst: int, kind: str, mb: int, fields: tuple[str, ...]) -> Message:
        start = time.perf_counter()
        try:
            return self._recv(src, dst, kind, fields)
        finally:
            self.waits["wait_recv"] += time.perf_counter() - start

    def _recv(self, src: int, dst: int, kind: str, fields: tuple[str, ...]) -> Message:
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        src_rank = self._peer(src)
        dist.recv(header, src_rank)
        header = header.cpu()
        n_fields = int(header[0])
        if n_fields != len(fields):
            raise RuntimeError(f"stage {dst}: a '{kind}' message from stage {src} has {n_fields} fields, "
                               f"expected {len(fields)} ({', '.join(fields)})")
        counts = [int(c) for c in header[1:1 + n_fields]]
        out, pos = [], 1 + n_fields
        for _ in range(sum(counts)):
            code = int(header[pos])
            if code == -1:
                out.append(None)
                pos += 1
                continue
            ndim = int(header[pos + 1])
            shape = [int(s) for s in header[pos + 2: pos + 2 + ndim]]
            pos += 2 + ndim
            t = torch.empty(shape, dtype=DTYPES[code], device=self.device)
            dist.recv(t, src_rank)
            out.append(t)
        message, start = {}, 0
        for name, count in zip(fields, counts):
            message[name] = tuple(out[start:start + count])
            start += count
        return message

    def end_tick(self) -> None:
        # A send completes when the neighbour posts its receive, which it does in the next tick:
        # waiting on this tick's sends would deadlock, so wait on the previous tick's.
        start = time.perf_counter()
        _wait(self.previous)
        self.previous, self.pending = self.pending, []
        self.waits["wait_send"] += time.perf_counter() - start

    def flush(self) -> None:
        start = time.perf_counter()
        _wait(self.previous + self.pending)
        self.previous, self.pending = [], []
        self.waits["wait_send"] += time.perf_counter() - start

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """``tensor`` on every rank becomes that of stage ``src`` of replica 0 (replicas of a stage
        that keep shared state make it agree first)."""
        dist.broadcast(tensor, rank_of(src, 0, self.replicas))

    def barrier(self) -> None:
        """Every rank reaches this point (bounded by the group's timeout)."""
        dist.barrier()

    def gather_record(self, record: dict) -> dict:
        """Every rank gets the last stage's loss and accuracy (the mean over the replicas of the last
        stage, each of which trained on its shard and evaluated its own model), per-stage figures from
        replica 0, and per-rank communication counts."""
        last = self.n_stages - 1
        on_last = self.stages == [last]
        r = self.replicas
        vals = torch.tensor([record["train_loss"] or 0.0, record["test_accuracy"] or 0.0], dtype=torch.float64)
        steps = torch.tensor(record["step_losses"], dtype=torch.float64)
        if not on_last:
            vals.zero_()
            steps.zero_()
        dist.all_reduce(vals)
        dist.all_reduce(steps)
        vals, steps = vals / r, steps / r
        record = dict(record, train_loss=float(vals[0]), test_accuracy=float(vals[1]), step_losses=steps.tolist())
        (stage,) = self.stages
        for key, kind in (("updates", int), ("peak_kept_bytes", int), ("peak_step_bytes", int),
                          ("busy_seconds", float)):
            mine = torch.zeros(self.world, dtype=torch.float64)
            mine[self.rank] = float(record[key][stage])
            dist.all_reduce(mine)
            record[key] = {j: kind(mine[rank_of(j, 0, r)]) for j in range(self.n_stages)}
        for key in ("allreduce_bytes", "allreduce_bytes_per_step", "sent_bytes"):
            if key in record:
                mine = torch.zeros(self.world, dtype=torch.float64)
                mine[self.rank] = float(record[key][self.rank])
                dist.all_reduce(mine)
                record[key] = {q: v for q, v in enumerate(mine.tolist())}
        names = sorted(record["phases"][stage])
        mine = torch.zeros(self.world, len(names), dtype=torch.float64)
        mine[self.rank] = torch.tensor([record["phases"][stage][k] for k in names], dtype=torch.float64)
        dist.all_reduce(mine)
        record["phases"] = {j: dict(zip(names, mine[rank_of(j, 0, r)].tolist())) for j in range(self.n_stages)}
        slowest = torch.tensor([record["train_seconds"]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        record["train_seconds"] = float(slowest)
        return record


def _wait(works: list[Any]) -> None:
    for work in works:
        (work[0] if isinstance(work, tuple) else work).wait()


def init_rank() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up: (rank, world size, this rank's device).

    NCCL and one GPU per local rank when CUDA is available, else gloo on the CPU; every collective and
    point-to-point wait is bounded by ``GRADXFORM_TIMEOUT`` seconds (default 60)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return rank, world, device


def leave() -> None:
    """Leave the process group (safe when it was never joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
