"""What a trial is judged on, and when a multi-objective trial is stopped early.

Objectives, measured from the per-epoch metrics records of :class:`gradxform.runtime.train.Trainer`:

- ``acc`` (maximise): the test accuracy after the last epoch.
- ``mem`` (minimise): the peak bytes one stage held for backward, by the executors' exact accounting:
  per stage the larger of ``peak_kept_bytes`` (held from one tick to the next for micro-batches in
  flight) and ``peak_step_bytes`` (what one micro-batch kept for its backward), and the most of any
  stage -- the memory a device needs when each stage has its own. ``mem_total`` (recorded, not an
  objective) adds the stages up: all stages in one process.
- ``throughput`` (maximise): training samples per second in steady state, the median over the epochs
  after the first (the first pays for warm-up: allocator, caches, lazy initialisation).

Optuna prunes only single-objective studies (``trial.report`` raises in a multi-objective one). For
those, :class:`EpochDominance` is gradxform's rule, on the per-epoch test accuracy: after epoch ``e``
a trial stops when some *completed* trial was at least ``margin`` more accurate after the same epoch
``e`` and is no worse on every other objective of the study (its final memory at most this trial's
peak so far -- which can only grow --, its throughput at least this trial's so far). Comparing at the
same epoch, not against final accuracies, keeps slow starters from being judged against finished
runs; requiring no worse on the other objectives keeps a trial that may still land on the Pareto
front for its memory or speed. It never stops a trial before ``from_epoch`` (by default 2: the first
epoch's throughput is not measured) nor after its last epoch, and does nothing when accuracy is not
an objective.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import GradxformError, did_you_mean


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str        # maximize | minimize (Optuna's words)
    doc: str


OBJECTIVES = {o.name: o for o in (
    Objective("acc", "maximize", "test accuracy after the last epoch"),
    Objective("mem", "minimize", "peak bytes a stage held for backward (exact: saved tensors and kept inputs)"),
    Objective("throughput", "maximize", "training samples/s, median over the epochs after the first"),
)}


def parse_objectives(text: str) -> list[str]:
    """``acc,mem,throughput`` -> the names, checked."""
    names = [t.strip() for t in text.split(",")]
    if not any(names):
        raise GradxformError("--objectives is empty", hint=f"choose from {', '.join(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise GradxformError(f"unknown objective '{name}' in --objectives {text}",
                                 hint=did_you_mean(name, OBJECTIVES) if name else "remove the empty entry")
        if names.count(name) > 1:
            raise GradxformError(f"objective '{name}' given twice in --objectives {text}")
    return names


def measure(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every objective (and ``mem_total``, ``curve``) from the epoch records seen so far; throughput
    is None until a second epoch is done."""
    if not records:
        return {"acc": None, "mem": None, "mem_total": None, "throughput": None, "curve": []}
    held: dict[str, int] = {}
    for r in records:  # the records carry running peaks; the max over records changes nothing but is safe
        for j in set(r["peak_kept_bytes"]) | set(r["peak_step_bytes"]):
            held[str(j)] = max(held.get(str(j), 0), r["peak_kept_bytes"].get(j, 0), r["peak_step_bytes"].get(j, 0))
    steady = [r["samples"] / r["train_seconds"] for r in records[1:] if r["train_seconds"] > 0]
    return {"acc": records[-1]["test_accuracy"], "mem": max(held.values()), "mem_total": sum(held.values()),
            "throughput": statistics.median(steady) if steady else None,
            "curve": [r["test_accuracy"] for r in records]}


def better_or_equal(objective: str, a: float, b: float) -> bool:
    """Whether value ``a`` is at least as good as ``b`` for ``objective``."""
    return a >= b if OBJECTIVES[objective].direction == "maximize" else a <= b


@dataclass(frozen=True)
class EpochDominance:
    """gradxform's early-stopping rule for multi-objective studies (see the module docstring)."""

    margin: float = 0.02
    from_epoch: int = 2

    def stop(self, objectives: Sequence[str], epoch: int, epochs: int, mine: dict[str, Any],
             completed: Sequence[dict[str, Any]]) -> str | None:
        """Why the trial should stop after ``epoch`` of ``epochs`` (None: go on). ``mine`` is
        :func:`measure` of the trial so far; each of ``completed`` holds a finished trial's measures
        (its ``curve`` included) and ``number``."""
        if "acc" not in objectives or epoch < self.from_epoch or epoch >= epochs or mine["acc"] is None:
            return None
        others = [o for o in objectives if o != "acc"]
        if any(mine[o] is None for o in others):
            return None
        for done in completed:
            curve = done.get("curve") or []
            if len(curve) < epoch or curve[epoch - 1] is None or done.get("epochs", epochs) != epochs:
                continue
            if curve[epoch - 1] < mine["acc"] + self.margin:
                continue
            if all(done.get(o) is not None and better_or_equal(o, done[o], mine[o]) for o in others):
                return (f"after epoch {epoch}: test accuracy {mine['acc']:.2%}, trial {done['number']} had "
                        f"{curve[epoch - 1]:.2%} then" + (f" and is no worse on {', '.join(others)}" if others else ""))
        return None
