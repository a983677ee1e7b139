"""What a schedule is: options, a tick table, a stage policy, a message layout, requirements.

A :class:`Schedule` mirrors a pass: a registry name, a typed options dataclass (parsed by the same
grammar, ``forward-grad{tangents=4}``), and what the runtime needs to train with it:

- ``ticks(stages, micro_batches)``: a :class:`TickTable`, pure data -- for each tick and stage, the
  actions (forward micro-batch b, backward micro-batch b, update). No tensors, no processes: every table
  is testable on its own (tests/runtime/test_schedules.py).
- ``steps(stages, count)``: how an epoch of ``count`` micro-batches is cut into tables (one table for
  the whole epoch, or one per optimizer step for GPipe and 1F1B).
- ``policy(stage, stages, module, inverse)``: a :class:`Policy`, what a stage keeps between a
  micro-batch's forward and its backward and how its backward runs.
- ``layout``: the named fields of the forward and backward messages (:class:`Layout`); a policy returns
  messages with exactly those fields and the engine checks it.
- ``check(staged)``: what the schedule requires of the model (heads, invertible stages, ...), as a
  message before any work starts.

Adding an algorithm is one module under ``gradxform/runtime/schedules/`` that defines and registers a
Schedule subclass (and its policy when no shared one fits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ...errors import GradxformError
from ...options import NoOptions, describe, option

if TYPE_CHECKING:  # the executor drives policies; policies call back into it
    from ..executor import StageExecutor

Message = dict[str, tuple]   # a message's fields by name, each a tuple of tensors (None: an input left at its default)


@dataclass(frozen=True)
class Action:
    kind: Literal["forward", "backward", "update"]
    micro_batch: int = -1

    def __repr__(self) -> str:
        return f"{self.kind[0].upper()}{self.micro_batch}" if self.kind != "update" else "U"


@dataclass
class TickTable:
    """``ticks[t][j]``: the actions of stage j at tick t, in order."""

    name: str
    stages: int
    micro_batches: int
    ticks: list[list[list[Action]]] = field(default_factory=list)

    def table(self) -> str:
        """The tick table as text: one row per tick, one column per stage."""
        rows = [f"{'tick':>4} | " + " | ".join(f"stage {j:<3}" for j in range(self.stages))]
        for t, row in enumerate(self.ticks):
            rows.append(f"{t:>4} | " + " | ".join(f"{' '.join(map(repr, acts)):<9}" for acts in row))
        return "\n".join(rows)

    def actions(self, stage: int) -> list[tuple[int, Action]]:
        """(tick, action) for one stage, in order."""
        return [(t, a) for t, row in enumerate(self.ticks) for a in row[stage]]

    def busy_fraction(self) -> float:
        """Share of (tick, stage) slots doing a forward or backward: 1 - bubble."""
        busy = sum(1 for row in self.ticks for acts in row if any(a.kind != "update" for a in acts))
        return busy / max(1, len(self.ticks) * self.stages)

    def in_flight(self) -> list[int]:
        """The most micro-batches each stage holds from one tick to the next (forwarded, not yet
        backwarded): the depth of the FIFO a stage that stores its inputs needs."""
        peak = [0] * self.stages
        held = [0] * self.stages
        for row in self.ticks:
            for j, acts in enumerate(row):
                held[j] += sum({"forward": 1, "backward": -1}.get(a.kind, 0) for a in acts)
                peak[j] = max(peak[j], held[j])
        return peak


@dataclass(frozen=True)
class Layout:
    """The named fields of a schedule's messages. ``backward = ()``: no backward messages at all."""

    forward: tuple[str, ...] = ("activations",)
    backward: tuple[str, ...] = ("gradients",)


class Policy:
    """What one stage keeps for its in-flight micro-batches and how its forward and backward run.

    ``forward`` receives the message from the stage before (stage 0: ``{"activations": inputs}``) and
    returns the message for the stage after (ignored on the last stage, which computes the loss);
    ``backward`` receives the message from the stage after (``None`` on the last stage, or when the
    schedule has no backward messages) and returns the message for the stage before, or ``None``.
    Policies do their tensor work through the executor's primitives (``ex.call``, ``ex.keep``,
    ``ex.take``, ``ex.model_loss``, ...), so that timing, memory accounting and checks stay in one place.
    """

    name: ClassVar[str] = ""

    def __init__(self, layout: Layout):
        self.layout = layout

    def wants_target(self, ex: StageExecutor) -> bool:
        """Whether this stage's forward needs the labels (the last stage, and stages with local losses)."""
        return ex.last

    def forward(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> Message | None:
        raise NotImplementedError

    def backward(self, ex: StageExecutor, mb: int, message: Message | None) -> Message | None:
        raise NotImplementedError


@dataclass
class AccumulateOptions:
    accumulate: int = option(1, "backwards per optimizer step (k): a stage updates after every k of its own "
                                "backwards, with their mean gradient")

    def validate(self) -> None:
        if self.accumulate < 1:
            raise ValueError("accumulate must be at least 1")


@dataclass
class StepOptions:
    micro_batches: int = option(4, "micro-batches per optimizer step (M); their gradients are averaged")

    def validate(self) -> None:
        if self.micro_batches < 1:
            raise ValueError("micro_batches must be at least 1")


class Schedule:
    """Base class. Subclasses set ``name``, ``summary``, ``Options``, ``family`` and implement
    ``ticks`` and ``policy``; see the module docstring."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    family: ClassVar[str] = ""                 # asynchronous | synchronous | local: for listings and docs
    layout: ClassVar[Layout] = Layout()
    keeps_weight_copies: ClassVar[bool] = False  # stashed/snapshot weights: layers must not change shape
    steps_together: ClassVar[bool] = False  # every stage takes its optimizer step at the same step
    # why the schedule cannot train data-parallel replicas ("" when it can)
    no_replicas: ClassVar[str] = ""

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def describe(self) -> str:
        return describe(self.name, self.options)

    def __repr__(self) -> str:
        return self.describe()

    # -- what the runtime asks ------------------------------------------------------------------
    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        raise NotImplementedError

    def steps(self, stages: int, count: int) -> list[tuple[TickTable, int]]:
        """An epoch of ``count`` micro-batches as (table, first micro-batch) pairs: one table by default
        (the asynchronous schedules never flush inside an epoch)."""
        return [(self.ticks(stages, count), 0)]

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        raise NotImplementedError

    def check(self, staged: Any) -> None:
        """Raise a GradxformError when the model lacks what the schedule needs."""

    # -- state a schedule keeps across micro-batches (F³'s error buffer): set up, synced, checkpointed
    def start(self, trainer: Any, train: Any) -> None:
        """Before the first epoch (after a resume's load too): set up what the schedule keeps."""

    def end_epoch(self, trainer: Any) -> None:
        """After an epoch's last tick, before evaluation and the checkpoint (e.g. share state across ranks)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold for a resumed run to continue bit for bit."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def distributed_runner(self, executor: StageExecutor, rank: int, world: int, device: Any,
                           loss_fn: Any, group: Any = None) -> Any:
        """A runner that trains one rank's stage through another engine (``step(xs, ys)`` per table),
        or None to use gradxform's own tick loop over point-to-point messages. ``rank`` and ``world``
        are the stage and the number of stages; ``group``, with data-parallel replicas, the process
        group of this replica's pipeline."""
        return None

    # -- data parallelism (gradxform/runtime/data_parallel.py) -------------------------------------
    def check_data_parallel(self, replicas: int, stages: int) -> None:
        """Raise a GradxformError when the schedule cannot train ``replicas`` replicas of ``stages``."""
        if replicas > 1 and self.no_replicas:
            raise GradxformError(f"the {self.name} schedule cannot train data-parallel replicas (--replicas "
                                 f"{replicas}): {self.no_replicas}",
                                 hint="train it with --replicas 1, or use backprop, gpipe, 1f1b, petra, local or f3")

    def replicate(self, trainer: Any) -> None:
        """Make ``trainer``'s replicas train as one: by default, each stage's gradients are averaged
        over its replicas before every optimizer step."""
        dp = trainer.data_parallel
        for ex in trainer.executors.values():
            ex.before_update.append(lambda ex=ex: dp.average_gradients(ex.params))

    def metrics(self, trainer: Any) -> dict[str, Any]:
        """What the schedule adds to each epoch's record in metrics.jsonl."""
        return {}


def table(name: str, stages: int, micro_batches: int, ticks: list[list[list[Action]]]) -> TickTable:
    if stages < 1 or micro_batches < 1:
        raise ValueError("stages and micro_batches must be at least 1")
    return TickTable(name, stages, micro_batches, ticks)


SCHEDULES: dict[str, type[Schedule]] = {}


def register(cls: type[Schedule]) -> type[Schedule]:
    """Class decorator: make a schedule available under ``cls.name``."""
    if not cls.name or cls.name in SCHEDULES:
        raise ValueError(f"schedule name '{cls.name}' is empty or taken")
    SCHEDULES[cls.name] = cls
    return cls


def require_heads(schedule: Schedule, staged: Any, stages: list[int] | None = None, hint: str = "") -> None:
    """Every stage but the last (or those in ``stages``) needs an auxiliary head (``aux-heads``)."""
    for j, stage in enumerate(staged.stages[:-1]):
        if (stages is None or j in stages) and getattr(stage, "aux_head", None) is None:
            raise GradxformError(f"stage {j} has no auxiliary head, which the {schedule.name} schedule trains it on",
                                 hint="compile with aux-heads after split (or the dgl / fwd-local composites)" + hint)
