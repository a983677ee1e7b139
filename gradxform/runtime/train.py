"""Training a staged model with a pipeline schedule: data, epochs, evaluation, metrics, checkpoints.

Each epoch is one schedule over all of its micro-batches (asynchronous schedules run without a flush
inside the epoch) or a sequence of steps of ``micro_batches`` (GPipe, 1F1B); the pipeline is drained
at the end of every epoch, so evaluation and checkpoints see no in-flight micro-batch. A checkpoint
holds, per stage, the weights, the optimizer state and the RNG state; resuming continues with the
same data order, so an in-process run resumes to exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import GradxformError
from .engine import InProcess, Transport, classification_loss, evaluate, first_inputs, run_schedule
from .executor import StageExecutor
from .schedules import ASYNC, SCHEDULES, build


@dataclass
class TrainConfig:
    schedule: str = "auto"        # auto: chosen from the model (see auto_schedule)
    epochs: int = 5
    batch_size: int = 32          # samples per micro-batch
    micro_batches: int = 4        # gpipe / 1f1b: micro-batches per optimizer step
    accumulate: int = 1           # asynchronous schedules and backprop: backwards per optimizer step
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
    resume: bool = False
    progress: bool = True

    guess: str = "local"          # forward-grad: the tangent guess (local head gradient or random)
    tangents: int = 1             # forward-grad: tangents per stage (k)
    combine: str = "project"      # forward-grad: projection on the tangents' span, or their mean

    def validate(self) -> None:
        from .schedules import parse_schedule

        try:
            name, opts = parse_schedule(self.schedule)
        except ValueError as e:
            raise GradxformError(f"--schedule: {e}",
                                 hint="e.g. --schedule 'forward-grad{guess=local,tangents=4,combine=project}'") from None
        if name != "auto" and name not in SCHEDULES:
            from ..errors import did_you_mean

            raise GradxformError(f"unknown schedule '{name}'", hint=did_you_mean(name, SCHEDULES))
        self.schedule = name
        for key, value in opts.items():
            setattr(self, key, value)
        for name in ("epochs", "batch_size", "micro_batches", "accumulate"):
            if getattr(self, name) < 1:
                raise GradxformError(f"--{name.replace('_', '-')} must be at least 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise GradxformError(f"unknown optimizer '{self.optimizer}'", hint="use sgd or adamw")
        if not self.lr > 0:
            raise GradxformError("--lr must be positive")
        if self.rank_every and self.schedule in ("stash", "delayed-exact"):
            raise GradxformError(f"--rank-every cannot be used with --schedule {self.schedule}",
                                 hint="its stashed weight copies would no longer match truncated layers; "
                                      "use petra, dsp, backprop, gpipe or 1f1b")
        if self.lr_schedule not in ("cosine", "constant"):
            raise GradxformError(f"unknown --lr-schedule '{self.lr_schedule}'", hint="use cosine or constant")


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
                  drop_last: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's micro-batches; the order depends only on (seed, epoch), identical on every rank."""
    x, y = dataset.tensors if hasattr(dataset, "tensors") else _stack(dataset)
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)) if shuffle \
        else torch.arange(n)
    stop = n - n % size if drop_last else n
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, stop, size)]


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(xs), torch.as_tensor(ys)


def auto_schedule(staged: Any) -> str:
    """The schedule a model was compiled for: the one its auxiliary heads name (dgl: local, fwd-local:
    forward-grad), backprop for one stage (highway, lowrank), else petra."""
    named = getattr(staged, "gx_schedule", None)
    if named:
        return named
    return "backprop" if len(staged.stages) == 1 else "petra"


class Trainer:
    """Trains the stages this process hosts; all stages with the in-process transport."""

    def __init__(self, staged: Any, cfg: TrainConfig, transport: Transport | None = None,
                 inverses: dict[int, Callable] | None = None):
        if cfg.schedule == "auto":
            cfg.schedule = auto_schedule(staged)
        cfg.validate()
        self.staged, self.cfg = staged, cfg
        self.n = len(staged.stages)
        self.transport = transport or InProcess(self.n)
        self.out = Path(cfg.out)
        inverses = inverses or {}
        self.executors = {
            j: StageExecutor(j, self.n, staged.stages[j], cfg.schedule, make_optimizer(staged.stages[j], cfg),
                             classification_loss, inverses.get(j), guess=cfg.guess, tangents=cfg.tangents,
                             combine=cfg.combine)
            for j in self.transport.stages}
        self.adaptive: dict[int, Any] = {}
        if cfg.rank_every:
            from ..nn.lowrank import AdaptiveRank

            for j, ex in self.executors.items():
                self.adaptive[j] = AdaptiveRank(ex.module, ex.optimizer, cfg.rank_every, cfg.rank_warmup,
                                                cfg.rank_cutoff)
                ex.after_update.append(self.adaptive[j].step)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.rank0 = 0 in self.transport.stages
        self.last_host = self.n - 1 in self.transport.stages

    # -- checkpoints -------------------------------------------------------------------------------
    def _ckpt(self, j: int) -> Path:
        return self.out / "checkpoints" / f"stage{j}.pt"

    def save(self) -> None:
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for j, ex in self.executors.items():
            state = {"epoch": self.epoch, "module": ex.module.state_dict(), "optimizer": ex.optimizer.state_dict(),
                     "rank_steps": self.adaptive[j].steps if j in self.adaptive else 0,
                     "rng": torch.get_rng_state(), "history": self.history, "config": asdict(self.cfg)}
            tmp = self._ckpt(j).with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self._ckpt(j))  # atomic: a crash leaves the previous checkpoint whole

    def load(self) -> bool:
        paths = {j: self._ckpt(j) for j in self.executors}
        if not all(p.exists() for p in paths.values()):
            return False
        for j, path in paths.items():
            state = torch.load(path, weights_only=True)
            ex = self.executors[j]
            from ..nn.lowrank import resize_usv

            if resize_usv(ex.module, state["module"]):  # ranks were truncated before the checkpoint
                ex.optimizer = make_optimizer(ex.module, self.cfg)
                ex.refresh()
                if j in self.adaptive:
                    self.adaptive[j].optimizer = ex.optimizer
            if j in self.adaptive:
                self.adaptive[j].steps = state.get("rank_steps", 0)
            ex.module.load_state_dict(state["module"])
            ex.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            self.epoch, self.history = state["epoch"], state["history"]
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, train: Any, test: Any, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
        cfg = self.cfg
        if cfg.resume and self.load():
            log(f"resumed from {self.out / 'checkpoints'} after epoch {self.epoch}")
        torch.manual_seed(cfg.seed + self.epoch)
        test_batches = micro_batches(test, cfg.batch_size, cfg.seed, 0, shuffle=False, drop_last=False)
        test_feed = [(first_inputs(self.staged, (x,), {}), y) for x, y in test_batches]
        started = time.perf_counter() - (self.history[-1]["wall_time"] if self.history else 0.0)
        while self.epoch < cfg.epochs:
            self._set_lr()
            batches = micro_batches(train, cfg.batch_size, cfg.seed, self.epoch)
            if not batches:
                raise GradxformError(f"the training set has fewer samples than --batch-size {cfg.batch_size}")
            feed = lambda mb: first_inputs(self.staged, (batches[mb][0],), {})  # noqa: E731
            target = lambda mb: batches[mb][1]  # noqa: E731
            schedules = self._schedules(len(batches))
            ticks = sum(len(s.ticks) for s, _ in schedules)
            bar = _progress(ticks, f"epoch {self.epoch + 1}/{cfg.epochs}", self.rank0 and cfg.progress)
            kill = _kill_switch(self.transport.stages, self.epoch)

            def on_tick(t: int) -> None:
                bar.update(1)
                kill(t)

            torch_pipeline = self._torch_pipeline()
            epoch_start = time.perf_counter()
            busy_start = {j: ex.stats.busy_seconds for j, ex in self.executors.items()}
            for sched, offset in schedules:
                if torch_pipeline is not None:  # gpipe / 1f1b across ranks: PyTorch's own engine
                    idx = range(offset, offset + sched.micro_batches)
                    torch_pipeline.step([feed(i) for i in idx], [target(i) for i in idx])
                    bar.update(len(sched.ticks))
                    continue
                run_schedule(sched, self.executors, self.transport,
                             lambda mb, o=offset: feed(mb + o), lambda mb, o=offset: target(mb + o),
                             on_tick=on_tick)
            bar.close()
            train_seconds = time.perf_counter() - epoch_start
            correct, total = evaluate(self.executors, self.transport, self.n, test_feed)
            losses = self.executors[self.n - 1].stats.losses[-len(batches):] if self.last_host else []
            self.epoch += 1
            record = {"epoch": self.epoch, "schedule": cfg.schedule,
                      "train_loss": sum(losses) / len(losses) if losses else None,
                      "step_losses": losses if losses else [0.0] * len(batches),
                      "test_accuracy": correct / total if total else None,
                      "wall_time": time.perf_counter() - started,
                      "updates": {j: ex.stats.updates for j, ex in self.executors.items()},
                      "peak_kept_bytes": {j: ex.stats.peak_kept_bytes for j, ex in self.executors.items()},
                      "peak_step_bytes": {j: ex.stats.peak_step_bytes for j, ex in self.executors.items()},
                      "busy_seconds": {j: ex.stats.busy_seconds - busy_start[j] for j, ex in self.executors.items()},
                      "train_seconds": train_seconds, "samples": len(batches) * cfg.batch_size,
                      "ranks": {j: {n: m.rank for n, m in a.layers()} for j, a in self.adaptive.items()}}
            record = self._gather(record)
            self.history.append(record)
            if self.rank0:
                log(f"epoch {self.epoch}: train loss {record['train_loss']:.4f}, test accuracy "
                    f"{record['test_accuracy']:.2%} ({record['wall_time']:.1f}s)")
                self._write_metrics(record)
            if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs:
                self.save()
        if self.rank0:
            plot(self.history, self.out / "training.png")
        return self.history

    def _torch_pipeline(self) -> Any:
        """gpipe/1f1b across processes run through torch.distributed.pipelining (built once)."""
        if self.cfg.schedule not in ("gpipe", "1f1b") or len(self.transport.stages) == self.n:
            return None
        if getattr(self, "_pipeline", None) is None:
            from .pipelining import TorchPipeline

            (j,) = self.transport.stages
            self._pipeline = TorchPipeline(self.executors[j], self.cfg.schedule, j, self.n,
                                           self.transport.device, classification_loss)
        return self._pipeline

    def _set_lr(self) -> None:
        cfg = self.cfg
        factor = 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * self.epoch / cfg.epochs))
        for ex in self.executors.values():
            for group in ex.optimizer.param_groups:
                group["lr"] = cfg.lr * factor

    def _schedules(self, count: int) -> list[tuple[Any, int]]:
        cfg = self.cfg
        if cfg.schedule in ASYNC or cfg.schedule in ("backprop", "local", "forward-grad"):
            return [(build(cfg.schedule, self.n, count, cfg.accumulate), 0)]
        sizes = [min(cfg.micro_batches, count - s) for s in range(0, count, cfg.micro_batches)]
        if len(sizes) > 1 and sizes[-1] < self.n:  # too short to fill the pipeline: join the step before
            sizes[-2] += sizes.pop()
        steps, start = [], 0
        for size in sizes:
            steps.append((build(cfg.schedule, self.n, size), start))
            start += size
        return steps

    def _gather(self, record: dict) -> dict:
        """Share the last stage's loss and accuracy with every rank (a no-op in one process)."""
        gather = getattr(self.transport, "gather_record", None)
        return gather(record) if gather is not None else record

    def _write_metrics(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _kill_switch(stages: list[int], epoch: int) -> Callable[[int], None]:
    """Fault injection for tests: GRADXFORM_KILL_AT=stage:epoch:tick sends SIGKILL to that stage's
    process at that tick (epochs counted from 0), as a crashed machine would."""
    spec = os.environ.get("GRADXFORM_KILL_AT")
    if not spec:
        return lambda t: None
    stage, at_epoch, at_tick = (int(x) for x in spec.split(":"))
    if stage not in stages or at_epoch != epoch or len(stages) != 1:
        return lambda t: None

    def kill(t: int) -> None:
        if t == at_tick:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    return kill


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tick", leave=False, dynamic_ncols=True)


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
