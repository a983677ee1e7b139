"""``f3``, ``dfa``, ``drtp``, ``llo``: training through fixed feedback connectors (docs/methods.md §7).

The ``f3`` pass puts a connector after every block (or stage); each connector's backward ignores the
gradient that reaches it and injects ``e · B`` instead, with B fixed and e a per-sample error. The four
schedules differ only in e:

- ``f3``: the sample's error from the previous epoch, read from a per-sample buffer that starts from the
  one-hot targets (so epoch 1 is DRTP) and is written after every step from that step's outputs;
- ``dfa``: the current error, from an extra forward of the whole model before each step (in one
  process: every stage must see the model's output first, which is the update locking DFA has);
- ``drtp``: the target itself;
- ``llo``: nothing -- the connectors cut the graph and only the last block trains.

Stage j forwards micro-batch ``t - j`` at tick t and updates at once: its input is detached, its
connectors give it its gradient, and no backward message ever crosses a stage boundary. The last stage
trains on the true loss (the one the pass chose: BCE on sigmoid outputs, or cross-entropy). Under
``--nproc`` the last rank writes the buffer and sends it to the others at the end of each epoch; they
need it an epoch later. The buffer is part of every checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ...autodiff.feedback import ErrorBuffer, error_rows, feedback_backward, loss_value, target_rows
from ...errors import GradxformError
from ...nn.feedback import FeedbackConnector, connectors, feedback_errors
from ...nn.staged import stages_of
from ...state import frozen_buffers, transient_graph
from ..data import tensors_of
from ..executor import Kept, StageExecutor, detach_tree, detached
from ..losses import logits_of
from .base import Layout, Message, Policy, register
from .families import LocalSchedule


def settings(staged: Any) -> dict[str, Any]:
    """The ``f3`` pass's choices (error kind, loss, classes), from the compile report."""
    for record in getattr(staged, "gx_report", {}).get("passes", []):
        if record.get("name") == "f3" and record.get("info", {}).get("connectors"):
            return record["info"]
    return {}


class FeedbackPolicy(Policy):
    """A stage trains at once through its connectors; the last stage on the true loss."""

    name = "feedback"

    def __init__(self, layout: Layout, schedule: FeedbackSchedule):
        super().__init__(layout)
        self.schedule = schedule

    def wants_target(self, ex: StageExecutor) -> bool:
        return True

    def forward(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> Message | None:
        keep = Kept()
        inputs = detach_tree(message["activations"], grad=False)
        e = self.schedule.error_for(ex, mb, message, target)
        with torch.enable_grad(), ex.counting(keep), transient_graph(), feedback_errors(ex.module, e), \
                ex.phase("forward"):
            out = ex.call(inputs)
            if ex.last:
                out = logits_of(out)
                loss = loss_value(self.schedule.loss, out, target)
                ex.record_loss(loss)
                keep.outputs, keep.inputs = loss, (out, target)
        if not ex.last:
            keep.outputs = out
        ex.keep(mb, keep)
        return None if ex.last else {"activations": detached(out)}

    def backward(self, ex: StageExecutor, mb: int, message: Message | None) -> Message | None:
        keep = ex.take(mb)
        with torch.enable_grad(), ex.phase("backward"):
            if ex.last:
                keep.outputs.backward()
                self.schedule.record(ex, mb, *keep.inputs)
            else:
                feedback_backward(keep.outputs)
        ex.accumulated()
        return None


class FeedbackSchedule(LocalSchedule):
    """The shared mechanics; subclasses set ``method``."""

    method: ClassVar[str] = ""

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return FeedbackPolicy(self.layout, self)

    def check(self, staged: Any) -> None:
        info = settings(staged)
        if not info:
            raise GradxformError(f"the {self.name} schedule trains through feedback connectors, and the model has none",
                                 hint="compile with the f3 pass (split{stages=J},f3{at=stages} for a pipeline)")
        stages = stages_of(staged) or [staged]
        for j, stage in enumerate(stages[:-1]):
            if not _ends_in_connectors(stage):
                raise GradxformError(f"stage {j} does not end in a feedback connector, so it would receive no "
                                     f"gradient ({self.name} sends nothing backwards)",
                                     hint="put the connectors on the stage boundaries: split first, then f3{at=stages}")

    # -- state ------------------------------------------------------------------------------------
    def start(self, trainer: Any, train: Any) -> None:
        info = settings(trainer.staged)
        self.kind, self.loss, self.classes = info["error"], info["loss"], int(info["classes"])
        self.staged = trainer.staged
        self.transport = trainer.transport
        self.stages = trainer.n
        self.current: dict[int, torch.Tensor] = {}
        if self.method == "dfa" and len(trainer.transport.stages) < trainer.n:
            raise GradxformError("dfa needs the whole model's output before each step, which one rank does not have",
                                 hint="train dfa in one process (--nproc 1), or use f3, which needs it an epoch later")
        _, y = tensors_of(train)
        self.buffer = ErrorBuffer(y, self.kind, self.loss, self.classes) if self.method == "f3" else None
        self.before = self.buffer.values.clone() if self.buffer is not None else None

    def end_epoch(self, trainer: Any) -> None:
        if self.buffer is not None:  # the last stage wrote the errors; every stage reads them next epoch
            self.buffer.values = self.buffer.values.contiguous()
            dp = trainer.data_parallel
            if dp is not None and self.transport.stages == [self.stages - 1]:
                self._merge_replicas(dp)
            self.transport.broadcast(self.buffer.values, self.stages - 1)  # in place (labels never change)
            self.before = self.buffer.values.clone()

    def _merge_replicas(self, dp: Any) -> None:
        """Each replica's last stage wrote the rows of its own shard's samples: gather every replica's
        rows (disjoint shards, so a sum of rows masked to the writer is exact, not an average)."""
        values = self.buffer.values
        rows = values.reshape(len(values), -1)
        mine = (rows != self.before.reshape(len(values), -1)).any(1)
        written = mine.to(values.dtype)
        ours = rows * written[:, None]
        dp.stage_sum(ours)
        dp.stage_sum(written)
        merged = torch.where(written[:, None] > 0, ours, self.before.reshape(len(values), -1))
        self.buffer.values = merged.reshape(values.shape).contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()} if getattr(self, "buffer", None) is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("buffer") is not None and getattr(self, "buffer", None) is not None:
            self.buffer.load_state_dict(state["buffer"])
            self.before = self.buffer.values.clone()

    # -- the error each method feeds back ----------------------------------------------------------
    def error_for(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> torch.Tensor | None:
        if not connectors(ex.module):
            return None
        if self.method == "llo":
            return None
        if self.method == "drtp":
            return target_rows(target, self.loss, self.classes)
        if self.method == "f3":
            return self.buffer.rows(ex.sample_indices(mb))
        if ex.index == 0:  # dfa: the model's current output on this micro-batch, before any step on it
            out = tuple(message["activations"])
            with torch.no_grad(), frozen_buffers(self.staged):
                for stage in stages_of(self.staged) or [self.staged]:
                    out = stage(*(out if isinstance(out, tuple) else (out,)))
            self.current[mb] = error_rows(self.kind, self.loss, logits_of(out), target)
        return self.current[mb]

    def record(self, ex: StageExecutor, mb: int, outputs: torch.Tensor, target: Any) -> None:
        """After the last stage's backward (before its optimizer step): the step's errors."""
        if self.buffer is not None:
            self.buffer.update(ex.sample_indices(mb), outputs.detach(), target)
        self.current.pop(mb, None)


def _ends_in_connectors(stage: Any) -> bool:
    """Whether every floating-point output of a stage's graph comes straight out of a connector."""
    graph = getattr(stage, "graph", None)
    if graph is None:
        return any(isinstance(m, FeedbackConnector) for m in stage.modules())
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    found = False
    for n in items:
        val = getattr(n, "meta", {}).get("val")
        if not (isinstance(val, torch.Tensor) and val.is_floating_point()):
            continue
        if not (n.op == "call_module" and isinstance(stage.get_submodule(n.target), FeedbackConnector)):
            return False
        found = True
    return found


@register
class F3Schedule(FeedbackSchedule):
    name = "f3"
    method = "f3"
    summary = "F3: each block trains on its sample's error from the previous epoch times a fixed B"


@register
class Dfa(FeedbackSchedule):
    name = "dfa"
    method = "dfa"
    summary = "direct feedback alignment: the current error (an extra forward) times a fixed B"


@register
class Drtp(FeedbackSchedule):
    name = "drtp"
    method = "drtp"
    summary = "direct random target projection: the one-hot target times a fixed B"


@register
class Llo(FeedbackSchedule):
    name = "llo"
    method = "llo"
    summary = "last layer only: the connectors cut the graph and only the last block trains"
