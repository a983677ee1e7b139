"""The tick loop: runs a schedule's actions on the local stages and moves messages between them.

The same loop drives every transport. ``InProcess`` hosts all stages in one process (deterministic:
what most tests use); ``gradxform.runtime.distributed.PointToPoint`` hosts one stage per rank and
sends over ``torch.distributed``. Messages are tuples of tensors (``None`` for an input left at its
default); a micro-batch's forward input at stage j was sent by stage j-1 at an earlier tick, its
backward message by stage j+1.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .executor import StageExecutor
from .schedules import Schedule


class Transport(Protocol):
    stages: list[int]        # the stages this process hosts

    def send(self, src: int, dst: int, kind: str, mb: int, tensors: tuple) -> None: ...

    def recv(self, src: int, dst: int, kind: str, mb: int) -> tuple: ...

    def end_tick(self) -> None: ...

    def flush(self) -> None: ...


class InProcess:
    """All stages in one process: a mailbox keyed by (destination, kind, micro-batch)."""

    def __init__(self, stages: int):
        self.stages = list(range(stages))
        self.mailbox: dict[tuple[int, str, int], tuple] = {}
        self.sent_bytes = 0

    def send(self, src: int, dst: int, kind: str, mb: int, tensors: tuple) -> None:
        self.mailbox[(dst, kind, mb)] = tensors
        self.sent_bytes += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def recv(self, src: int, dst: int, kind: str, mb: int) -> tuple:
        return self.mailbox.pop((dst, kind, mb))

    def end_tick(self) -> None:
        pass

    def flush(self) -> None:
        pass


def run_schedule(schedule: Schedule, executors: dict[int, StageExecutor], transport: Transport,
                 feed: Callable[[int], tuple], target: Callable[[int], Any],
                 on_tick: Callable[[int], None] | None = None) -> None:
    """Perform every action of ``schedule`` on the stages ``transport`` hosts.

    ``feed(mb)`` gives stage 0's flat inputs for micro-batch ``mb``; ``target(mb)`` the last stage's
    target. Backward messages carry the input gradients, and for ``petra`` also the reconstructed
    inputs (the next stage up inverts them further when it is reversible).
    """
    last = schedule.stages - 1
    for t, row in enumerate(schedule.ticks):
        for j in transport.stages:
            ex = executors[j]
            for a in row[j]:
                mb = a.micro_batch
                if a.kind == "forward":
                    x = feed(mb) if j == 0 else transport.recv(j - 1, j, "f", mb)
                    out = ex.forward(mb, x, target(mb) if ex.wants_target else None)
                    if j < last:
                        transport.send(j, j + 1, "f", mb, out)
                elif a.kind == "backward":
                    grads = acts = None
                    if j < last and schedule.name != "local":
                        msg = transport.recv(j + 1, j, "b", mb)
                        if schedule.name == "petra":
                            half = len(msg) // 2
                            grads, acts = msg[:half], msg[half:]
                        else:
                            grads = msg
                    g_in, recon = ex.backward(mb, grads, acts)
                    if j > 0 and g_in is not None:
                        transport.send(j, j - 1, "b", mb, g_in + (recon if recon is not None else ()))
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
                    inp = x if j == 0 else transport.recv(j - 1, j, "e", mb)
                    out = executors[j].module(*inp)
                    if j < stages - 1:
                        transport.send(j, j + 1, "e", mb, tuple(out) if isinstance(out, tuple) else (out,))
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


def logits_of(out: Any) -> torch.Tensor:
    """The prediction tensor of a model output: a tensor, a dict's 'logits', or its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return next(v for v in out if isinstance(v, torch.Tensor))
    raise TypeError(f"cannot find predictions in a {type(out).__name__}")


def classification_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, C) logits, or of (N, T, V) token logits against (N, T) targets."""
    logits = logits_of(out)
    if logits.dim() > 2:
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten())
    return torch.nn.functional.cross_entropy(logits, target)


def first_inputs(staged: Any, args: tuple, kwargs: dict) -> tuple:
    """The model's own (args, kwargs) bound to stage 0's placeholders, as a flat tuple."""
    return staged.first_inputs(args, kwargs)
