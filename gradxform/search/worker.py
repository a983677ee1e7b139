"""A search worker: ``python -m gradxform.search.worker JOB.json INDEX``.

It joins the study named in the job, asks the shared storage for a trial, samples a candidate,
trains it in a process of its own (:mod:`.trial`), and tells the storage the result, until the study
holds ``trials`` trials. Workers share nothing but the storage: start more on this machine or on
others at any time. This module does not import torch (only its trials do).

Early stopping: in a single-objective study the trial reports the objective after every epoch and
Optuna's pruner decides; in a multi-objective study :class:`.objectives.EpochDominance` does. A
candidate whose sampled values equal a completed trial's is not trained again: it is told the same
values, with ``same_as`` naming the trial.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .objectives import EpochDominance, measure
from .space import Space
from .study import HEARTBEAT_S, beat, fail_stale, open_storage, optuna_module, study_id


def make_job(*, storage: str, study: str, space: Space, objectives: list[str], trials: int, epochs: int, out: str,
             target: str, data: str = "digits", seed: int = 0, sampler: str = "tpe", startup_trials: int = 4,
             pruner: str = "none", margin: float = 0.02, from_epoch: int = 2, threads: int = 1,
             input_shapes: list[str] | None = None, tracer: str = "auto") -> dict[str, Any]:
    """Everything a worker needs (written to ``--out/search.json`` and read by every worker)."""
    return {"storage": storage, "study": study, "space": space.to_json(), "objectives": objectives, "trials": trials,
            "epochs": epochs, "seed": seed, "sampler": sampler, "startup_trials": startup_trials, "pruner": pruner,
            "margin": margin, "from_epoch": from_epoch, "out": out,
            "trial": {"target": target, "epochs": epochs, "data": data, "seed": seed, "threads": threads,
                      "input_shapes": list(input_shapes or []), "tracer": tracer}}


class TrialCrashed(Exception):
    """The trial's process raised or died: the trial is recorded as failed, the study goes on."""


def make_sampler(job: dict[str, Any], index: int) -> Any:
    """The job's sampler, seeded per worker (two workers with one seed would propose the same trials)."""
    optuna = optuna_module()
    seed = job["seed"] * 1000 + index
    kind = job["sampler"]
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # constant_liar: running trials count as bad guesses, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=job["startup_trials"])


def make_pruner(job: dict[str, Any]) -> Any:
    """Optuna's pruner for a single-objective study (``median``, ``halving``, ``hyperband``), else none."""
    optuna = optuna_module()
    first = job["from_epoch"]
    if job["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=job["startup_trials"], n_warmup_steps=first)
    if job["pruner"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first)
    if job["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=job["epochs"])
    return optuna.pruners.NopPruner()


class Objective:
    """What ``study.optimize`` calls per trial."""

    def __init__(self, job: dict[str, Any], index: int, storage: Any, context: Any):
        self.job, self.index, self.storage, self.context = job, index, storage, context
        self.space = Space.from_json(job["space"])
        self.objectives: list[str] = job["objectives"]
        self.rule = EpochDominance(job["margin"], job["from_epoch"]) if job["pruner"] == "dominated" else None

    def __call__(self, trial: Any) -> Any:
        optuna = optuna_module()
        fail_stale(self.storage, self.job["study"])
        candidate = self.space.sample(trial)
        for key, value in (("method", candidate.method), ("pipeline", candidate.pipeline),
                           ("train", candidate.train), ("schedule_options", candidate.schedule),
                           ("worker", f"{os.uname().nodename}:{os.getpid()}")):
            trial.set_user_attr(key, value)
        beat(trial)
        same = self._same_as(trial)
        if same is not None:
            for key in ("acc", "mem", "mem_total", "throughput", "curve", "epochs_run", "schedule", "command", "epochs"):
                if key in same.user_attrs:
                    trial.set_user_attr(key, same.user_attrs[key])
            trial.set_user_attr("same_as", same.number)
            return self._values(same.user_attrs)
        folder = Path(self.job["out"]) / "trials" / f"{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        spec = {**self.job["trial"], "pipeline": candidate.pipeline, "train": candidate.train,
                "schedule": candidate.schedule, "out": str(folder), "log": str(folder / "log.txt"),
                "rerun_out": str(Path(self.job["out"]) / f"rerun-{trial.number}")}
        trial.set_user_attr("epochs", self.job["epochs"])
        recv, send = self.context.Pipe(duplex=False)
        proc = self.context.Process(target=run_trial, args=(spec, send), daemon=True)
        proc.start()
        send.close()
        records: list[dict] = []
        last_beat = time.monotonic()
        try:
            while True:
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    beat(trial)
                    last_beat = time.monotonic()
                if not recv.poll(1.0):
                    continue
                try:
                    message = recv.recv()
                except EOFError:
                    proc.join(5)
                    raise self._crashed(trial, f"the trial process died ({_exit_text(proc.exitcode)}); "
                                              f"see {spec['log']}")
                if "error" in message:
                    raise self._crashed(trial, message["error"])
                if "done" in message:
                    break
                records.append(message["epoch"])
                self._record(trial, records)
                reason = self._prune(trial, records)
                if reason:
                    trial.set_user_attr("pruned", reason)
                    raise optuna.TrialPruned(reason)
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted: its worker was stopped")
            raise
        finally:
            if proc.is_alive():
                proc.terminate()
            proc.join(10)
            recv.close()
        trial.set_user_attr("schedule", message["done"]["schedule"])
        trial.set_user_attr("command", message["done"]["command"])
        return self._values(trial.user_attrs | measure(records))

    # -- pieces --------------------------------------------------------------------------------------
    def _values(self, measured: dict[str, Any]) -> Any:
        values = [measured[o] for o in self.objectives]
        if any(v is None for v in values):
            raise TrialCrashed(f"no value for {', '.join(o for o, v in zip(self.objectives, values) if v is None)}")
        return values[0] if len(values) == 1 else values

    def _record(self, trial: Any, records: list[dict]) -> None:
        m = measure(records)
        for key in ("acc", "mem", "mem_total", "throughput", "curve"):
            trial.set_user_attr(key, m[key])
        trial.set_user_attr("epochs_run", len(records))
        trial.set_user_attr("schedule", records[-1]["schedule"])

    def _prune(self, trial: Any, records: list[dict]) -> str | None:
        epoch, epochs = len(records), self.job["epochs"]
        mine = measure(records)
        if self.rule is not None:
            optuna = optuna_module()
            done = [dict(t.user_attrs, number=t.number) for t in
                    trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
            return self.rule.stop(self.objectives, epoch, epochs, mine, done)
        if len(self.objectives) == 1 and self.job["pruner"] != "none":
            value = mine[self.objectives[0]]
            if value is None or epoch >= epochs:
                return None
            trial.report(value, epoch)
            if trial.should_prune():
                return f"after epoch {epoch}: {self.objectives[0]} {value:.4g}, stopped by the {self.job['pruner']} pruner"
        return None

    def _same_as(self, trial: Any) -> Any:
        optuna = optuna_module()
        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.params == trial.params and t.user_attrs.get("epochs") == self.job["epochs"] \
                    and t.user_attrs.get("train") == trial.user_attrs.get("train"):
                return t
        return None

    def _crashed(self, trial: Any, message: str) -> TrialCrashed:
        trial.set_user_attr("error", message)
        return TrialCrashed(message)


def run_trial(spec: dict[str, Any], conn: Any) -> None:
    """The trial process's entry (this module pickles without torch; the fork server has :mod:`.trial`)."""
    from .trial import run

    run(spec, conn)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}" + (": out of memory?" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


def work(job: dict[str, Any], index: int) -> int:
    """Run trials until the study holds ``job['trials']`` of them; returns how many this worker ran."""
    optuna = optuna_module()
    storage = open_storage(job["storage"])
    study = optuna.load_study(study_name=job["study"], storage=storage, sampler=make_sampler(job, index),
                              pruner=make_pruner(job))
    # trials count once started (enqueued ones still WAITING are not trials yet)
    counted = tuple(s for s in optuna.trial.TrialState if s != optuna.trial.TrialState.WAITING)
    if len(storage.get_all_trials(study_id(storage, job["study"]), deepcopy=False, states=counted)) >= job["trials"]:
        return 0
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gradxform.search.trial"])
    ran = [0]

    def count(study: Any, trial: Any) -> None:
        ran[0] += 1

    study.optimize(Objective(job, index, storage, context), catch=(TrialCrashed,), gc_after_trial=False,
                   callbacks=[count, optuna.study.MaxTrialsCallback(job["trials"], states=counted)])
    return ran[0]


def _stop(sig: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    # SIGTERM (the search command stopping its workers) ends the running trial as failed, cleanly
    signal.signal(signal.SIGTERM, _stop)
    try:
        ran = work(job, int(argv[1]))
    except KeyboardInterrupt:
        print("worker stopped", file=sys.stderr, flush=True)
        return 130
    print(f"worker {argv[1]}: {ran} trial(s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
