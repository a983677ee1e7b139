"""Training a staged model with a pipeline schedule: data, epochs, evaluation, metrics, checkpoints.

Each epoch is one schedule over all of its micro-batches (asynchronous schedules run without a flush
inside the epoch) or a sequence of steps of ``micro_batches`` (GPipe, 1F1B); the pipeline is drained
at the end of every epoch, so evaluation and checkpoints see no in-flight micro-batch. A checkpoint
(:mod:`gradxform.runtime.checkpoint`: whole or ignored) holds, per stage, the weights, the optimizer
state and the RNG state, and the metrics so far; resuming continues with the same data order and the
same random numbers, so a run resumes to exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import GradxformError
from ..nn.growth import GrowthConfig
from ..nn.lowrank import AdaptiveRank, resize_factors, resize_usv
from .data import tensors_of
from .data_parallel import DataParallel, shard
from .callbacks import Callback
from .checkpoint import CheckpointError, Checkpoints, RunFolder, write_atomic
from .engine import InProcess, Transport, evaluate, run_schedule
from .growth import Growth
from .executor import StageExecutor
from .losses import classification_loss
from .schedules import Schedule, make_schedule
from .tied import TiedCopies


PHASES = ("forward", "inversion", "recompute", "backward", "optimizer", "wait_recv", "wait_send")


@dataclass
class TrainConfig:
    schedule: Any = "auto"        # schedule text or a Schedule; auto: the one the model was compiled for
    epochs: int = 5
    batch_size: int = 32          # samples per micro-batch (per replica)
    replicas: int = 1             # data-parallel replicas of every stage (world size = replicas x stages)
    micro_batches: int | None = None  # sets the schedule's micro_batches option (gpipe, 1f1b: per step)
    accumulate: int | None = None     # sets the schedule's accumulate option (backwards per optimizer step)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"   # cosine: lr x (1 + cos(pi e / E)) / 2 at the start of epoch e; constant
    data: str = "digits"
    seed: int = 0
    out: str = "runs/train"
    checkpoint_every: int = 1     # epochs between checkpoints (the last epoch is always saved)
    rank_every: int = 0           # OIALR: truncate USV layers every N optimizer steps (0: never)
    rank_warmup: int = 0          # OIALR: optimizer steps before the first truncation
    rank_cutoff: float = 0.1      # OIALR: drop singular values below cutoff * sigma_max
    grow_every: int = 0           # growth: a growth step every N epochs (0: never)
    grow_neurons: float = 8       # growth: new neurons per step, at most (< 1: a fraction of the pair's cap)
    grow_max: int | None = None   # growth: hidden width cap per pair (None: the width before the grow pass)
    grow_budget: str = "params"   # growth: what grow_limit counts (params | flops)
    grow_limit: float | None = None  # growth: stop at this many parameters / FLOPs per sample
    resume: bool = False          # continue from the newest committed checkpoint in ``out``
    overwrite: bool = False       # replace a run already in ``out`` (without it, that is refused)
    command: str = ""             # the command line, recorded with the run
    run_id: str | None = None     # set by a launcher that already checked and locked ``out``

    def make_schedule(self, staged: Any = None) -> Schedule:
        """The Schedule to train with: ``auto`` is the one ``staged`` was compiled for; the
        ``micro_batches`` and ``accumulate`` fields, when set, override the schedule's options."""
        spec = self.schedule
        if isinstance(spec, str) and spec.strip() == "auto":
            spec = compiled_for(staged) if staged is not None else "petra"
        try:
            schedule = make_schedule(spec)
        except GradxformError as e:
            raise GradxformError(f"--schedule: {e.message}", hint=e.hint) from None
        for key in ("micro_batches", "accumulate"):
            value = getattr(self, key)
            if value is not None:
                try:
                    schedule = make_schedule(schedule, **{key: value})
                except GradxformError as e:
                    raise GradxformError(f"--{key.replace('_', '-')}: {e.message}", hint=e.hint) from None
        return schedule

    def validate(self, staged: Any = None) -> Schedule:
        """Check every field; returns the resolved schedule."""
        schedule = self.make_schedule(staged)
        for name in ("epochs", "batch_size", "replicas"):
            if getattr(self, name) < 1:
                raise GradxformError(f"--{name.replace('_', '-')} must be at least 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise GradxformError(f"unknown optimizer '{self.optimizer}'", hint="use sgd or adamw")
        if not self.lr > 0:
            raise GradxformError("--lr must be positive")
        if self.rank_every and schedule.keeps_weight_copies:
            raise GradxformError(f"--rank-every cannot be used with --schedule {schedule.name}",
                                 hint="its stashed weight copies would no longer match truncated layers; "
                                      "use petra, dsp, backprop, gpipe or 1f1b")
        if self.grow_every < 0 or self.grow_budget not in ("params", "flops"):
            raise GradxformError("--grow-every must be 0 or more and --grow-budget params or flops")
        if self.lr_schedule not in ("cosine", "constant"):
            raise GradxformError(f"unknown --lr-schedule '{self.lr_schedule}'", hint="use cosine or constant")
        return schedule


def compiled_for(staged: Any) -> str:
    """The schedule a model was compiled for (its recipe records what the pipeline's passes named);
    a model that names none trains with backprop in one stage and petra in several."""
    named = getattr(getattr(staged, "gx_recipe", None), "schedule", None)
    if named:
        return named
    return "backprop" if len(staged.stages) == 1 else "petra"


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] or [{"params": [], "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def micro_batches(dataset: Any, size: int, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = True) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The epoch's micro-batches as (inputs, labels, the samples' dataset indices); the order depends
    only on (seed, epoch), identical on every rank."""
    x, y = tensors_of(dataset)
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)) if shuffle \
        else torch.arange(n)
    stop = n - n % size if drop_last else n
    return [(x[order[i:i + size]], y[order[i:i + size]], order[i:i + size]) for i in range(0, stop, size)]


class Trainer:
    """Trains the stages this process hosts; all stages with the in-process transport.

    ``inverses`` (stage index -> inverse function) default to the stages' own ``inverse`` (stages made
    only of reversible couplings); the schedule's policy decides whether to use them.
    """

    def __init__(self, staged: Any, cfg: TrainConfig, transport: Transport | None = None,
                 inverses: dict[int, Callable] | None = None, callbacks: Sequence[Callback] = ()):
        self.schedule = cfg.validate(staged)
        self.schedule.check(staged)
        self.staged, self.cfg = staged, cfg
        self.callbacks = list(callbacks)
        self.n = len(staged.stages)
        self.transport = transport or InProcess(self.n)
        self.replicas = getattr(self.transport, "replicas", 1)
        self.replica = getattr(self.transport, "replica", 0)
        if cfg.replicas != self.replicas:
            raise GradxformError(f"--replicas {cfg.replicas} needs {cfg.replicas} processes per stage; this trainer "
                                 f"hosts {self.replicas}",
                                 hint=f"start {cfg.replicas * self.n} ranks (--nproc {cfg.replicas * self.n})")
        self.schedule.check_data_parallel(self.replicas, self.n)
        self.out = Path(cfg.out)
        inverses = staged.inverses() if inverses is None else inverses
        self.executors = {
            j: StageExecutor(j, self.n, staged.stages[j], self.schedule, make_optimizer(staged.stages[j], cfg),
                             classification_loss, inverses.get(j))
            for j in self.transport.stages}
        self.tied = TiedCopies(staged, self.executors, distributed=len(self.transport.stages) < self.n,
                               replicas=self.replicas, replica=self.replica)
        self.tied.check(self.schedule)
        self.adaptive: dict[int, AdaptiveRank] = {}
        if cfg.rank_every:
            if not any(AdaptiveRank(stage, None, 1).layers() for stage in staged.stages):
                raise GradxformError("--rank-every truncates the ranks of USV layers, and this model has none",
                                     hint="compile with lowrank{mode=usv} first, or drop --rank-every")
            for j, ex in self.executors.items():
                self.adaptive[j] = AdaptiveRank(ex.module, ex.optimizer, cfg.rank_every, cfg.rank_warmup,
                                                cfg.rank_cutoff)
                ex.after_update.append(self.adaptive[j].step)
        if cfg.grow_every:
            growth = Growth(GrowthConfig(every=cfg.grow_every, neurons=cfg.grow_neurons, max_width=cfg.grow_max,
                                         budget=cfg.grow_budget, limit=cfg.grow_limit))
            growth.attach(self)
            self.callbacks.append(growth)
        self.data_parallel: DataParallel | None = None
        if self.replicas > 1:  # after every other before_update hook (tied copies sum first)
            self.data_parallel = DataParallel(self.transport.rank, self.n, self.replicas)
            self.schedule.replicate(self)
        self.runner = None
        if len(self.transport.stages) < self.n:  # one stage per rank: the schedule may bring its own engine
            (j,) = self.transport.stages
            group = self.data_parallel.pipeline_group if self.data_parallel is not None else None
            self.runner = self.schedule.distributed_runner(self.executors[j], j, self.n, self.transport.device,
                                                           classification_loss, group=group)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoints = Checkpoints(self.out / "checkpoints", self.n, self.replicas, self.replica)
        self.resume_notes: list[str] = []
        self.run: dict[str, Any] = {}
        self.rank0 = 0 in self.transport.stages and self.replica == 0  # the one rank that writes the run's files
        self.last_host = self.n - 1 in self.transport.stages

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        """Write this process's stages into the epoch's checkpoint; commit it once every stage has."""
        config = dict(asdict(self.cfg), schedule=self.schedule.describe())
        for j, ex in self.executors.items():
            self.checkpoints.write_stage(self.epoch, j, {
                "epoch": self.epoch, "module": ex.module.state_dict(), "optimizer": ex.optimizer.state_dict(),
                "rank_steps": self.adaptive[j].steps if j in self.adaptive else 0,
                "rng": torch.get_rng_state(), "config": config, "schedule": self.schedule.state_dict(),
                "callbacks": {type(cb).__name__: st for cb in self.callbacks if (st := cb.state_dict()) is not None}})
        self._emit("on_save")
        self._barrier()  # every rank's stage file is on disk before rank 0 commits
        if self.rank0:
            self.checkpoints.commit(self.epoch, self.history)

    def load(self) -> bool:
        """Restore the newest committed checkpoint; False when there is none. Newer epochs that were
        never committed are skipped and listed in ``resume_notes``."""
        epoch, self.resume_notes = self.checkpoints.latest()
        if epoch is None:
            return False
        for j, ex in self.executors.items():
            state = self.checkpoints.read_stage(epoch, j)
            saved = state.get("callbacks", {})
            resized = [cb.resize(ex.module, state["module"], saved.get(type(cb).__name__, {})) for cb in self.callbacks]
            if resize_usv(ex.module, state["module"]) | resize_factors(ex.module, state["module"]) or any(resized):
                # ranks truncated, or layers grown
                ex.optimizer = make_optimizer(ex.module, self.cfg)
                ex.refresh()
                if j in self.adaptive:
                    self.adaptive[j].optimizer = ex.optimizer
            if j in self.adaptive:
                self.adaptive[j].steps = state.get("rank_steps", 0)
            try:
                ex.module.load_state_dict(state["module"])
                ex.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"the checkpoint of epoch {epoch}, stage {j}, does not fit this model: "
                                      f"{str(e).strip().splitlines()[0]}",
                                      hint="resume with the model and pipeline the run was started with, or "
                                           "train afresh with --overwrite") from None
            torch.set_rng_state(state["rng"])
            self.schedule.load_state_dict(state.get("schedule", {}))
            for cb in self.callbacks:
                if type(cb).__name__ in saved:
                    cb.load_state_dict(saved[type(cb).__name__])
        self.epoch, self.history = epoch, self.checkpoints.history(epoch)
        if self.rank0:  # the metrics of epochs after the checkpoint will be written again: drop them
            write_atomic(self.out / "metrics.jsonl",
                         lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history)))
        return True

    def _barrier(self) -> None:
        barrier = getattr(self.transport, "barrier", None)
        if barrier is not None:
            barrier()

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, train: Any, test: Any) -> list[dict[str, Any]]:
        """Train until ``cfg.epochs`` (resuming from the checkpoints in ``cfg.out`` when ``cfg.resume``);
        returns one record per epoch (also appended to ``metrics.jsonl``, plotted to ``training.png``)."""
        cfg = self.cfg
        folder = None
        if self.rank0 and cfg.run_id is None:  # a launcher that started ranks already holds the folder
            folder = RunFolder(self.out)
            self.run = folder.open(resume=cfg.resume, overwrite=cfg.overwrite, stages=self.n,
                                   record={"seed": cfg.seed, "command": cfg.command, "schedule": self.schedule.describe(),
                                           "config": dict(asdict(cfg), schedule=self.schedule.describe())})
        else:
            self.run = {"id": cfg.run_id, "seed": cfg.seed, "command": cfg.command}
        try:
            return self._fit(train, test)
        finally:
            if folder is not None:
                folder.close()

    def _fit(self, train: Any, test: Any) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.schedule.start(self, train)
        if cfg.resume:
            if not self.load():
                raise CheckpointError(f"--resume: {self.out} holds no committed checkpoint to resume from",
                                      hint="drop --resume to start a new run (or check --out)")
            self._emit("on_resume")
        else:
            # a resumed run continues the RNG stream saved with its checkpoint (dropout, random tangents)
            torch.manual_seed(cfg.seed)
        test_batches = micro_batches(test, cfg.batch_size, cfg.seed, 0, shuffle=False, drop_last=False)
        test_feed = [(self.staged.first_inputs((x,), {}), y) for x, y, _ in test_batches]
        started = time.perf_counter() - (self.history[-1]["wall_time"] if self.history else 0.0)
        while self.epoch < cfg.epochs:
            self._set_lr()
            # a global batch of replicas x batch_size, each replica its shard (identical order on every rank)
            batches = micro_batches(train, cfg.batch_size * self.replicas, cfg.seed, self.epoch)
            if not batches:
                raise GradxformError(f"the training set has fewer samples than --batch-size {cfg.batch_size}"
                                     + (f" x --replicas {self.replicas}" if self.replicas > 1 else ""))
            if self.replicas > 1:
                batches = [shard(b, self.replica, self.replicas) for b in batches]
            feed = lambda mb: self.staged.first_inputs((batches[mb][0],), {})  # noqa: E731
            target = lambda mb: batches[mb][1]  # noqa: E731
            steps = self.schedule.steps(self.n, len(batches))
            self._emit("on_epoch_start", sum(len(table.ticks) for table, _ in steps))
            epoch_start = time.perf_counter()
            busy_start = {j: ex.stats.busy_seconds for j, ex in self.executors.items()}
            phases_start = {j: self._phases(ex) for j, ex in self.executors.items()}
            comm_start = self._comm_bytes()
            updates_start = sum(ex.stats.updates for ex in self.executors.values())
            done = 0

            def on_tick(t: int) -> None:
                self._emit("on_tick", done + t)

            for table, offset in steps:
                if self.runner is not None:  # e.g. gpipe / 1f1b across ranks: PyTorch's own engine
                    idx = range(offset, offset + table.micro_batches)
                    self.runner.step([feed(i) for i in idx], [target(i) for i in idx])
                    self._emit("on_tick", done + len(table.ticks) - 1)
                else:
                    for ex in self.executors.values():  # which samples a micro-batch holds (F³'s error rows)
                        ex.sample_indices = lambda mb, o=offset: batches[mb + o][2]
                    run_schedule(table, self.executors, self.transport,
                                 lambda mb, o=offset: feed(mb + o), lambda mb, o=offset: target(mb + o),
                                 on_tick=on_tick)
                done += len(table.ticks)
            self.schedule.end_epoch(self)
            if self.data_parallel is not None:
                for ex in self.executors.values():
                    self.data_parallel.average_buffers(ex.module)
            for cb in self.callbacks:
                cb.after_training(self, batches)
            train_seconds = time.perf_counter() - epoch_start
            allreduced, sent = (b - a for a, b in zip(comm_start, self._comm_bytes()))
            steps_done = max(1, sum(ex.stats.updates for ex in self.executors.values()) - updates_start)
            me = getattr(self.transport, "rank", 0)
            correct, total = evaluate(self.executors, self.transport, self.n, test_feed)
            losses = self.executors[self.n - 1].stats.losses[-len(batches):] if self.last_host else []
            self.epoch += 1
            record = {"epoch": self.epoch, "schedule": self.schedule.describe(),
                      "run": {"id": self.run.get("id"), "seed": cfg.seed, "command": cfg.command},
                      "train_loss": sum(losses) / len(losses) if losses else None,
                      "step_losses": losses if losses else [0.0] * len(batches),
                      "test_accuracy": correct / total if total else None,
                      "wall_time": time.perf_counter() - started,
                      "updates": {j: ex.stats.updates for j, ex in self.executors.items()},
                      "peak_kept_bytes": {j: ex.stats.peak_kept_bytes for j, ex in self.executors.items()},
                      "peak_step_bytes": {j: ex.stats.peak_step_bytes for j, ex in self.executors.items()},
                      "busy_seconds": {j: ex.stats.busy_seconds - busy_start[j] for j, ex in self.executors.items()},
                      "phases": {j: {k: v - phases_start[j].get(k, 0.0) for k, v in self._phases(ex).items()}
                                 for j, ex in self.executors.items()},
                      "train_seconds": train_seconds, "samples": len(batches) * cfg.batch_size * self.replicas,
                      "replicas": self.replicas,
                      # per rank, this epoch: bytes handed to collectives (gradient all-reduces), their
                      # mean per optimizer step, and point-to-point bytes sent to the neighbouring stages
                      "allreduce_bytes": {me: allreduced}, "allreduce_bytes_per_step": {me: allreduced / steps_done},
                      "sent_bytes": {me: sent},
                      "ranks": {j: {n: m.rank for n, m in a.layers()} for j, a in self.adaptive.items()}}
            record.update(self.schedule.metrics(self))
            for cb in self.callbacks:
                record.update(cb.metrics())
            record = self._gather(record)
            self.history.append(record)
            if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs:
                self.save()  # the epoch's metrics are part of what it commits
            if self.rank0:
                self._write_metrics(record)
            self._emit("on_epoch_end", record)
        if self.rank0:
            plot(self.history, self.out / "training.png")
        self._emit("on_fit_end")
        return self.history

    def _phases(self, ex: StageExecutor) -> dict[str, float]:
        """Seconds so far in each part of a stage's work, and (one stage per rank) blocked on its
        neighbours."""
        out = {k: ex.stats.phases.get(k, 0.0) for k in PHASES[:-2]}
        if len(self.transport.stages) == 1:
            out.update(getattr(self.transport, "waits", {}))
        return out

    def _comm_bytes(self) -> tuple[int, int]:
        """(bytes all-reduced, point-to-point bytes sent) so far by this process."""
        allreduced = self.data_parallel.comm.bytes if self.data_parallel is not None else 0
        return allreduced, getattr(self.transport, "sent_bytes", 0)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (``--lr-schedule``)."""
        cfg = self.cfg
        factor = 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
        return cfg.lr * factor

    def new_optimizer(self, ex: StageExecutor) -> None:
        """A fresh optimizer for a stage whose parameters changed shape (its state is reset)."""
        ex.optimizer = make_optimizer(ex.module, self.cfg)
        for group in ex.optimizer.param_groups:
            group["lr"] = self.lr_at(self.epoch)
        ex.refresh()

    def _set_lr(self) -> None:
        for ex in self.executors.values():
            for group in ex.optimizer.param_groups:
                group["lr"] = self.lr_at(self.epoch)

    def _gather(self, record: dict) -> dict:
        """Share the last stage's loss and accuracy with every rank (a no-op in one process)."""
        gather = getattr(self.transport, "gather_record", None)
        return gather(record) if gather is not None else record

    def _write_metrics(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def plot(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and test accuracy per epoch (and against wall time) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("train loss")
    a.set_yscale("log")
    b.plot([h["wall_time"] for h in history], [100 * (h["test_accuracy"] or math.nan) for h in history], marker="o")
    b.set_xlabel("wall time (s)")
    b.set_ylabel("test accuracy (%)")
    fig.suptitle(f"gradxform train · {history[-1]['schedule']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
