"""``gradxform train``: load or compile the model, then train in-process or across processes.

With ``--nproc 1`` every stage runs in this process. With ``--nproc N`` gradxform starts N ranks
through ``torch.distributed.run`` (torchrun) on this machine; each rank hosts one stage. To span
several machines, start the ranks yourself with torchrun's own flags, e.g. on each node::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m gradxform train out/petra --schedule petra

A process started by torchrun (RANK is set) trains its own stage directly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from ..api import staged
from ..errors import GradxformError
from ..runtime.data import datasets_for
from ..runtime.distributed import PointToPoint, init_rank, leave
from ..runtime.train import Callback, TrainConfig, Trainer


def config_from(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(schedule=a.schedule, epochs=a.epochs, batch_size=a.batch_size, micro_batches=a.micro_batches,
                       accumulate=a.accumulate, optimizer=a.optimizer, lr=a.lr, momentum=a.momentum,
                       weight_decay=a.weight_decay, lr_schedule=a.lr_schedule, data=a.data, seed=a.seed, out=a.out,
                       checkpoint_every=a.checkpoint_every, resume=a.resume, rank_every=a.rank_every,
                       rank_warmup=a.rank_warmup, rank_cutoff=a.rank_cutoff)


def cmd_train(a: argparse.Namespace) -> int:
    cfg = config_from(a)
    if a.nproc < 1:
        raise GradxformError("--nproc must be at least 1")
    if "RANK" in os.environ:
        return rank_main(a, cfg)
    if a.nproc > 1:
        cfg.validate()  # options and typos fail here, once, before any rank starts
        return spawn(a)
    return train_here(a, cfg)


class Reporter(Callback):
    """What a person running ``gradxform train`` sees: a progress bar per epoch, a line per epoch."""

    def __init__(self, show: bool, progress: bool):
        self.show, self.progress = show, progress
        self.bar: Any = None

    def on_resume(self, trainer: Trainer) -> None:
        if self.show:
            print(f"resumed from {trainer.out / 'checkpoints'} after epoch {trainer.epoch}", flush=True)

    def on_epoch_start(self, trainer: Trainer, ticks: int) -> None:
        if self.show and self.progress:
            self.bar = tqdm(total=ticks, desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}", unit="tick",
                            leave=False, dynamic_ncols=True)

    def on_tick(self, trainer: Trainer, tick: int) -> None:
        if self.bar is not None:
            self.bar.update(tick + 1 - self.bar.n)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.show:
            print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test accuracy "
                  f"{record['test_accuracy']:.2%} ({record['wall_time']:.1f}s)", flush=True)


class KillAt(Callback):
    """Fault injection for tests: ``GRADXFORM_KILL_AT=stage:epoch:tick`` sends SIGKILL to that stage's
    process at that tick (epochs counted from 0), as a crashed machine would. Only in a process that
    hosts that one stage (a rank)."""

    def __init__(self, spec: str):
        self.stage, self.epoch, self.tick = (int(x) for x in spec.split(":"))

    def on_tick(self, trainer: Trainer, tick: int) -> None:
        if trainer.transport.stages == [self.stage] and trainer.epoch == self.epoch and tick == self.tick:
            os.kill(os.getpid(), signal.SIGKILL)


def _callbacks(a: argparse.Namespace, show: bool) -> list[Callback]:
    callbacks: list[Callback] = [Reporter(show, not a.no_progress)]
    spec = os.environ.get("GRADXFORM_KILL_AT")
    if spec:
        callbacks.append(KillAt(spec))
    return callbacks


def _model(a: argparse.Namespace, stages: int) -> Any:
    return staged(a.target, a.pipeline, stages=stages, input_shapes=a.input_shape, tracer=a.tracer, seed=a.seed)


def train_here(a: argparse.Namespace, cfg: Any) -> int:
    """Every stage in this process."""
    module = _model(a, 1)
    trainer = Trainer(module, cfg, callbacks=_callbacks(a, show=True))
    recipe = module.gx_recipe
    train, test = datasets_for(module, recipe.args, recipe.kwargs, cfg.data, cfg.seed)
    final = trainer.fit(train, test)[-1]
    print(f"final test accuracy: {final['test_accuracy']:.2%} after {final['epoch']} epochs "
          f"({trainer.schedule.describe()}, {trainer.n} stage(s), {final['wall_time']:.1f}s); "
          f"metrics in {Path(cfg.out) / 'metrics.jsonl'}, plot {Path(cfg.out) / 'training.png'}")
    return 0


def rank_main(a: argparse.Namespace, cfg: Any) -> int:
    """Body of one torchrun worker: join the group, load the model, train this rank's stage."""

    @record
    def main() -> int:
        rank, world, device = init_rank()
        try:
            module = _model(a, world)
            if len(module.stages) != world:
                raise GradxformError(
                    f"the model has {len(module.stages)} stage(s) but {world} ranks were started",
                    hint=f"compile with split{{stages={world}}} (or petra{{stages={world}}}), or use "
                         f"--nproc {len(module.stages)}")
            module.to(device)
            recipe = module.gx_recipe
            train, test = datasets_for(module, recipe.args, recipe.kwargs, cfg.data, cfg.seed)
            trainer = Trainer(module, cfg, PointToPoint(rank, world, device), callbacks=_callbacks(a, rank == 0))
            final = trainer.fit(train, test)[-1]
            if rank == 0:
                print(f"final test accuracy: {final['test_accuracy']:.2%} after {final['epoch']} epochs "
                      f"({trainer.schedule.describe()}, {world} ranks, {final['wall_time']:.1f}s)", flush=True)
            dist.barrier()
            return 0
        except GradxformError as e:
            print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
            raise
        finally:
            leave()

    return main()


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line for the workers: torchrun would take '--nproc' for its own --nproc-per-node,
    and a worker learns the world size from torchrun anyway."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def spawn(a: argparse.Namespace) -> int:
    """Start ``a.nproc`` ranks on this machine through torchrun; returns its exit code."""
    argv = _without_nproc(sys.argv[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "--monitor-interval=1", "-m", "gradxform", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode:
        print(f"error: training stopped: a rank failed (exit code {proc.returncode}); see the messages above",
              file=sys.stderr)
    return proc.returncode
