"""The tick tables the schedules share, as plain functions of (stages J, micro-batches M).

- :func:`asynchronous`: at tick t stage j forwards micro-batch ``t - j`` and backwards micro-batch
  ``t - 2(J-1) + j``; the delay between a micro-batch's forward and backward at stage j is
  ``2(J-1-j)`` ticks (PETRA and its delayed-gradient relatives; docs/methods.md §2).
- :func:`sequential`: one micro-batch at a time through every stage, forward then backward.
- :func:`gpipe`: all M forwards, then all M backwards, then one update (bubble (J-1)/(M+J-1)).
- :func:`one_f_one_b`: warm-up forwards, then one forward one backward, then cool-down backwards.
- :func:`local`: stage j forwards and backwards micro-batch ``t - j`` in the same tick (no backward
  message crosses a stage boundary).
"""

from __future__ import annotations

from .base import Action, TickTable, table


def delay(stage: int, stages: int) -> int:
    """Ticks between a micro-batch's forward and backward at ``stage`` in the asynchronous family."""
    return 2 * (stages - 1 - stage)


def _updates(done: int, accumulate: int, last: bool) -> bool:
    return done % accumulate == 0 or last


def asynchronous(name: str, J: int, M: int, accumulate: int) -> TickTable:
    ticks: list[list[list[Action]]] = [[[] for _ in range(J)] for _ in range(M + 2 * (J - 1))]
    done = [0] * J
    for t, row in enumerate(ticks):
        for j in range(J):
            acts: list[Action] = []
            b = t - 2 * (J - 1) + j
            if 0 <= b < M:
                acts.append(Action("backward", b))
                done[j] += 1
                if _updates(done[j], accumulate, b == M - 1):
                    acts.append(Action("update"))
            if 0 <= t - j < M:
                # Forward first: it needs nothing from a later stage, so the next stage can start on it
                # while this one waits for its backward message (backward first would make every tick a
                # barrier between neighbours). The forward and the backward of a tick see the same
                # weights, as in PETRA's parallel formulation; the update comes after both.
                acts = [Action("forward", t - j)] + acts
            row[j] = acts
    return table(name, J, M, ticks)


def local(name: str, J: int, M: int, accumulate: int) -> TickTable:
    ticks: list[list[list[Action]]] = [[[] for _ in range(J)] for _ in range(M + J - 1)]
    for j in range(J):
        for b in range(M):
            acts = [Action("forward", b), Action("backward", b)]
            if _updates(b + 1, accumulate, b == M - 1):
                acts.append(Action("update"))
            ticks[b + j][j] = acts
    return table(name, J, M, ticks)


def sequential(name: str, J: int, M: int, accumulate: int) -> TickTable:
    ticks: list[list[list[Action]]] = []
    for b in range(M):
        for j in range(J):
            ticks.append([[Action("forward", b)] if k == j else [] for k in range(J)])
        for j in reversed(range(J)):
            ticks.append([[Action("backward", b)] if k == j else [] for k in range(J)])
        if _updates(b + 1, accumulate, b == M - 1):
            ticks[-1] = [acts + [Action("update")] for acts in ticks[-1]]
    return table(name, J, M, ticks)


def gpipe(name: str, J: int, M: int) -> TickTable:
    ticks: list[list[list[Action]]] = [[[] for _ in range(J)] for _ in range(2 * (M + J - 1))]
    for b in range(M):
        for j in range(J):
            ticks[b + j][j].append(Action("forward", b))
            ticks[M + J - 1 + b + (J - 1 - j)][j].append(Action("backward", b))
    for j in range(J):
        ticks[-1][j].append(Action("update"))
    return table(name, J, M, ticks)


def one_f_one_b(name: str, J: int, M: int) -> TickTable:
    """Stage j warms up with J-j forwards (PipeDream-flush), then alternates."""
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
    return table(name, J, M, _place(per_stage, J))


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


def per_step(schedule_ticks, stages: int, count: int, micro_batches: int) -> list[tuple[TickTable, int]]:
    """An epoch cut into optimizer steps of ``micro_batches`` (GPipe, 1F1B); a last step too short to
    fill the pipeline joins the step before."""
    sizes = [min(micro_batches, count - s) for s in range(0, count, micro_batches)]
    if len(sizes) > 1 and sizes[-1] < stages:
        sizes[-2] += sizes.pop()
    steps, start = [], 0
    for size in sizes:
        steps.append((schedule_ticks(stages, size), start))
        start += size
    return steps
