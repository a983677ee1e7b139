"""The tick loop: runs a tick table's actions on the local stages and moves messages between them.

The same loop drives every schedule and every transport. ``InProcess`` hosts all stages in one process
(deterministic: what most tests use); :class:`gradxform.runtime.distributed.PointToPoint` hosts one
stage per rank and sends over ``torch.distributed``. A message is a dict of named fields, each a tuple
of tensors, laid out as the schedule declares (:class:`gradxform.runtime.schedules.base.Layout`): a
micro-batch's forward message at stage j was sent by stage j-1 at an earlier tick, its backward
message by stage j+1.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .executor import StageExecutor
from .losses import logits_of
from .schedules.base import Layout, Message, TickTable


class Transport(Protocol):
    stages: list[int]        # the stages this process hosts

    def send(self, src: int, dst: int, kind: str, mb: int, message: Message) -> None: ...

    def recv(self, src: int, dst: int, kind: str, mb: int, fields: tuple[str, ...]) -> Message: ...

    def end_tick(self) -> None: ...

    def flush(self) -> None: ...

    def barrier(self) -> None: ...

    def broadcast(self, tensor: Any, src: int) -> None: ...


def message_bytes(message: Message) -> int:
    return sum(t.numel() * t.element_size() for field in message.values() for t in field
               if isinstance(t, torch.Tensor))


class InProcess:
    """All stages in one process: a mailbox keyed by (destination, kind, micro-batch)."""

    def __init__(self, stages: int):
        self.stages = list(range(stages))
        self.mailbox: dict[tuple[int, str, int], Message] = {}
        self.sent_bytes = 0

    def send(self, src: int, dst: int, kind: str, mb: int, message: Message) -> None:
        self.mailbox[(dst, kind, mb)] = message
        self.sent_bytes += message_bytes(message)

    def recv(self, src: int, dst: int, kind: str, mb: int, fields: tuple[str, ...]) -> Message:
        return self.mailbox.pop((dst, kind, mb))

    def end_tick(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def barrier(self) -> None:
        pass

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        pass  # one process: every stage already sees the same tensor


def _checked(message: Message | None, fields: tuple[str, ...], stage: int, kind: str, schedule: str) -> Message:
    if message is None or tuple(message) != fields:
        got = "nothing" if message is None else ", ".join(message)
        raise RuntimeError(f"schedule {schedule}: stage {stage}'s {kind} message has fields ({got}); its layout "
                           f"declares ({', '.join(fields)})")
    return message


def run_schedule(ticks: TickTable, executors: dict[int, StageExecutor], transport: Transport,
                 feed: Callable[[int], tuple], target: Callable[[int], Any],
                 on_tick: Callable[[int], None] | None = None) -> None:
    """Perform every action of ``ticks`` on the stages ``transport`` hosts.

    ``feed(mb)`` gives stage 0's flat inputs for micro-batch ``mb``; ``target(mb)`` the labels for the
    stages that want them. Messages follow the layout of the executors' schedule; a schedule whose
    layout has no backward fields sends nothing backwards.
    """
    layout: Layout = next(iter(executors.values())).schedule.layout
    last = ticks.stages - 1
    for t, row in enumerate(ticks.ticks):
        for j in transport.stages:
            ex = executors[j]
            for a in row[j]:
                mb = a.micro_batch
                if a.kind == "forward":
                    msg = {"activations": feed(mb)} if j == 0 else transport.recv(j - 1, j, "f", mb, layout.forward)
                    out = ex.forward(mb, msg, target(mb) if ex.wants_target else None)
                    if j < last:
                        transport.send(j, j + 1, "f", mb, _checked(out, layout.forward, j, "forward", ticks.name))
                elif a.kind == "backward":
                    msg = transport.recv(j + 1, j, "b", mb, layout.backward) if j < last and layout.backward else None
                    out = ex.backward(mb, msg)
                    if j > 0 and layout.backward:
                        transport.send(j, j - 1, "b", mb, _checked(out, layout.backward, j, "backward", ticks.name))
                else:
                    ex.update()
        for j in transport.stages:
            executors[j].end_tick()
        transport.end_tick()
        if on_tick is not None:
            on_tick(t)
    transport.flush()


def evaluate(executors: dict[int, StageExecutor], transport: Transport, stages: int,
             batches: list[tuple[tuple, torch.Tensor]]) -> tuple[float, float]:
    """Forward-only pass of ``batches`` (flat stage-0 inputs, labels) in eval mode.

    Returns (correct, total) on the last stage's process, (0, 0) elsewhere.
    """
    correct = total = 0.0
    for ex in executors.values():
        ex.module.eval()
    try:
        with torch.no_grad():
            for mb, (x, y) in enumerate(batches):
                for j in transport.stages:
                    inp = x if j == 0 else transport.recv(j - 1, j, "e", mb, ("activations",))["activations"]
                    out = executors[j].module(*inp)
                    if j < stages - 1:
                        transport.send(j, j + 1, "e", mb,
                                       {"activations": tuple(out) if isinstance(out, tuple) else (out,)})
                    else:
                        logits = logits_of(out)
                        correct += float((logits.argmax(-1) == y).sum())
                        total += float(y.numel())
                transport.end_tick()
        transport.flush()
    finally:
        for ex in executors.values():
            ex.module.train()
    return correct, total
