"""Pipeline schedules as data: for every tick and stage, the actions to perform.

A schedule knows nothing of tensors, processes or models. It says, for J stages and M micro-batches,
which micro-batch each stage forwards and backwards at each tick and when it updates its weights;
the stage executor performs the actions and the transport moves the messages. That makes every
schedule testable without processes (tests/runtime/test_schedules.py).

Schedules (docs/methods.md §2):

- ``petra``, ``stash``, ``dsp``, ``delayed-exact``: the asynchronous family. At tick t stage j
  forwards micro-batch ``t - j`` and backwards micro-batch ``t - 2(J-1) + j``; the delay between a
  micro-batch's forward and backward at stage j is ``2(J-1-j)`` ticks. They differ only in what a
  stage keeps for its backward (the executor's policy), not in their tick tables. Each stage updates
  after every ``accumulate`` of its own backwards.
- ``backprop``: one micro-batch at a time through every stage, forward then backward (the reference).
- ``gpipe``: all M forwards, then all M backwards, then one update (bubble (J-1)/(M+J-1)).
- ``1f1b``: warm-up forwards, then one forward one backward, then cool-down backwards; one update.

Local learning (docs/methods.md §5):

- ``local`` (DGL): stage j forwards micro-batch ``t - j`` at tick t, backwards it at once through its
  own auxiliary head (its input is detached, nothing is sent back) and updates. Stages never wait for
  a later stage: there are no backward messages.
- ``forward-grad``: one micro-batch at a time like ``backprop``, but the forward messages carry tangents
  (each stage's guesses, pushed forward by JVPs) and the backward messages only the last stage's
  directional derivatives along them: scalars per sample, never a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ASYNC = ("petra", "stash", "dsp", "delayed-exact")
SYNC = ("backprop", "gpipe", "1f1b")
LOCAL = ("local", "forward-grad")
SCHEDULES = ASYNC + SYNC + LOCAL


@dataclass(frozen=True)
class Action:
    kind: Literal["forward", "backward", "update"]
    micro_batch: int = -1

    def __repr__(self) -> str:
        return f"{self.kind[0].upper()}{self.micro_batch}" if self.kind != "update" else "U"


@dataclass
class Schedule:
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


FORWARD_GRAD_OPTIONS = {"guess": ("local", "random"), "tangents": None, "combine": ("project", "mean")}


def parse_schedule(text: str) -> tuple[str, dict[str, object]]:
    """``forward-grad{guess=random,tangents=4}`` -> ("forward-grad", {"guess": "random", "tangents": 4}).

    Only ``forward-grad`` takes options: guess (local | random), tangents (k >= 1), combine
    (project | mean). Raises ValueError with the reason.
    """
    text = text.strip()
    name, _, rest = text.partition("{")
    name = name.strip()
    opts: dict[str, object] = {}
    if not rest:
        return name, opts
    if not rest.endswith("}"):
        raise ValueError(f"unclosed '{{' in schedule '{text}'")
    if name != "forward-grad":
        raise ValueError(f"schedule '{name}' takes no options")
    for item in filter(None, (x.strip() for x in rest[:-1].split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in FORWARD_GRAD_OPTIONS:
            raise ValueError(f"unknown forward-grad option '{key}'; known: {', '.join(FORWARD_GRAD_OPTIONS)}")
        allowed = FORWARD_GRAD_OPTIONS[key]
        if allowed is None:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"forward-grad: tangents must be a positive integer, got '{value}'")
            opts[key] = int(value)
        elif value not in allowed:
            raise ValueError(f"forward-grad: {key} must be one of {', '.join(allowed)}, got '{value}'")
        else:
            opts[key] = value
    return name, opts


def delay(stage: int, stages: int) -> int:
    """Ticks between a micro-batch's forward and backward at ``stage`` in the asynchronous family."""
    return 2 * (stages - 1 - stage)


def build(name: str, stages: int, micro_batches: int, accumulate: int = 1) -> Schedule:
    """The tick table of schedule ``name`` for ``micro_batches`` micro-batches."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if stages < 1 or micro_batches < 1 or accumulate < 1:
        raise ValueError("stages, micro_batches and accumulate must be at least 1")
    J, M = stages, micro_batches
    if name in ASYNC:
        ticks = [[[] for _ in range(J)] for _ in range(M + 2 * (J - 1))]
        done = [0] * J
        for t, row in enumerate(ticks):
            for j in range(J):
                acts: list[Action] = []
                b = t - 2 * (J - 1) + j
                if 0 <= b < M:
                    acts.append(Action("backward", b))
                    done[j] += 1
                    if done[j] % accumulate == 0 or b == M - 1:
                        acts.append(Action("update"))
                if 0 <= t - j < M:
                    # The last stage computes the loss of what it forwards: forward first. The others
                    # backward first, so they never hold more than 2(J-1-j) micro-batches.
                    fwd = Action("forward", t - j)
                    acts = [fwd] + acts if j == J - 1 else acts + [fwd]
                row[j] = acts
        return Schedule(name, J, M, ticks)
    if name == "local":
        ticks = [[[] for _ in range(J)] for _ in range(M + J - 1)]
        for j in range(J):
            for b in range(M):
                acts = [Action("forward", b), Action("backward", b)]
                if (b + 1) % accumulate == 0 or b == M - 1:
                    acts.append(Action("update"))
                ticks[b + j][j] = acts
        return Schedule(name, J, M, ticks)
    if name in ("backprop", "forward-grad"):
        ticks = []
        for b in range(M):
            for j in range(J):
                ticks.append([[Action("forward", b)] if k == j else [] for k in range(J)])
            for j in reversed(range(J)):
                acts = [[Action("backward", b)] if k == j else [] for k in range(J)]
                ticks.append(acts)
            if (b + 1) % accumulate == 0 or b == M - 1:
                ticks[-1] = [acts + [Action("update")] for acts in ticks[-1]]
        return Schedule(name, J, M, ticks)
    if name == "gpipe":
        ticks = [[[] for _ in range(J)] for _ in range(2 * (M + J - 1))]
        for b in range(M):
            for j in range(J):
                ticks[b + j][j].append(Action("forward", b))
                ticks[M + J - 1 + b + (J - 1 - j)][j].append(Action("backward", b))
        for j in range(J):
            ticks[-1][j].append(Action("update"))
        return Schedule(name, J, M, ticks)
    # 1f1b: stage j warms up with J-j forwards (PipeDream-flush), then alternates.
    per_stage: list[list[Action]] = []
    for j in range(J):
        warm = min(J - j, M)
        seq = [Action("forward", b) for b in range(warm)]
        f, bwd = warm, 0
        while bwd < M:
            seq.append(Action("backward", bwd))
            bwd += 1
            if f < M:
                seq.append(Action("forward", f))
                f += 1
        per_stage.append(seq)
    return Schedule(name, J, M, _place(per_stage, J))


def _place(per_stage: list[list[Action]], J: int) -> list[list[list[Action]]]:
    """Earliest ticks for each stage's ordered actions, respecting message dependencies."""
    when: dict[tuple[str, int, int], int] = {}
    pos = [0] * J
    ticks: list[list[list[Action]]] = []
    total = sum(len(s) for s in per_stage)
    placed, t = 0, 0
    while placed < total:
        ticks.append([[] for _ in range(J)])
        for j in range(J):
            if pos[j] == len(per_stage[j]):
                continue
            a = per_stage[j][pos[j]]
            if a.kind == "forward":
                ready = j == 0 or when.get(("forward", j - 1, a.micro_batch), t) < t
            else:
                ready = (when.get(("forward", j, a.micro_batch), t) < t if j == J - 1
                         else when.get(("backward", j + 1, a.micro_batch), t) < t)
            if ready:
                ticks[t][j].append(a)
                when[(a.kind, j, a.micro_batch)] = t
                pos[j] += 1
                placed += 1
        t += 1
    for j in range(J):
        ticks[-1][j].append(Action("update"))
    return ticks


def in_flight(schedule: Schedule) -> list[int]:
    """The most micro-batches each stage holds from one tick to the next (forwarded, not yet
    backwarded): the depth of the FIFO a stage that stores its inputs needs."""
    peak = [0] * schedule.stages
    held = [0] * schedule.stages
    for row in schedule.ticks:
        for j, acts in enumerate(row):
            held[j] += sum({"forward": 1, "backward": -1}.get(a.kind, 0) for a in acts)
            peak[j] = max(peak[j], held[j])
    return peak
