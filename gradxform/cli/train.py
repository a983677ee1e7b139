"""``gradxform train``: load or compile the model, then train in-process or across processes.

With ``--nproc 1`` every stage runs in this process. With ``--nproc N`` gradxform starts N ranks
through ``torch.distributed.run`` (torchrun) on this machine; each rank hosts one stage. To span
several machines, start the ranks yourself with torchrun's own flags, e.g. on each node::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m gradxform train out/petra --schedule petra

A process started by torchrun (RANK is set) trains its own stage directly.

With ``--replicas R`` every stage has R data-parallel replicas: ``--nproc`` is R x stages, rank
``stage * R + replica`` (:mod:`gradxform.runtime.data_parallel`), e.g. 2 replicas of a 2-stage petra::

    gradxform train examples/resnet.py:digits_resnet --pass 'petra{stages=2}' --replicas 2 --nproc 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from ..api import staged
from ..errors import GradxformError
from ..passes import compiled_schedule
from ..runtime.data import datasets_for
from ..runtime.checkpoint import RunFolder
from ..runtime.data_parallel import stages_for
from ..runtime.distributed import PointToPoint, init_rank, leave
from ..runtime.train import Callback, TrainConfig, Trainer
from .threads import set_threads, threads


def config_from(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(schedule=a.schedule, epochs=a.epochs, batch_size=a.batch_size, replicas=a.replicas,
                       micro_batches=a.micro_batches,
                       accumulate=a.accumulate, optimizer=a.optimizer, lr=a.lr, momentum=a.momentum,
                       weight_decay=a.weight_decay, lr_schedule=a.lr_schedule, data=a.data, seed=a.seed, out=a.out,
                       checkpoint_every=a.checkpoint_every, resume=a.resume, overwrite=a.overwrite,
                       rank_every=a.rank_every, rank_warmup=a.rank_warmup, rank_cutoff=a.rank_cutoff,
                       grow_every=a.grow_every, grow_neurons=a.grow_neurons, grow_max=a.grow_max,
                       grow_budget=a.grow_budget, grow_limit=a.grow_limit,
                       command=" ".join(["gradxform", *a.argv]))


def default_out(a: argparse.Namespace) -> str:
    """A fresh folder per run: runs/MODEL-SCHEDULE-TIME, so that runs never pile into one another."""
    target = Path(a.target.split(":")[0])
    model = target.name if target.is_dir() else target.stem + (f"-{a.target.split(':')[1]}" if ":" in a.target else "")
    schedule = a.schedule.split("{")[0]
    if schedule == "auto":
        if target.is_dir() and (target / "manifest.json").exists():
            schedule = json.loads((target / "manifest.json").read_text()).get("schedule") or "auto"
        else:
            schedule = compiled_schedule(a.pipeline or f"split{{stages={_stages(a)}}}") or "backprop"
        schedule = schedule.split("{")[0]
    return str(Path("runs") / f"{model}-{schedule}-{time.strftime('%Y%m%d-%H%M%S')}")


def _stages(a: argparse.Namespace) -> int:
    """Pipeline stages: the processes over the replicas of each."""
    return stages_for(a.nproc, a.replicas)


def cmd_train(a: argparse.Namespace) -> int:
    if a.replicas < 1:
        raise GradxformError(f"--replicas must be at least 1, got {a.replicas}")
    if a.nproc is None:
        a.nproc = a.replicas
    if a.nproc < 1:
        raise GradxformError("--nproc must be at least 1")
    _stages(a)  # --replicas divides --nproc
    if a.out is None:
        a.out = default_out(a)
        a.argv = [*a.argv, "--out", a.out]  # the ranks write where this process said
    cfg = config_from(a)
    if "RANK" in os.environ:
        return rank_main(a, cfg)
    print(f"run folder: {a.out}", flush=True)
    cfg.validate()  # options and typos fail here, once, before anything slow
    # --out is checked and locked before the model is compiled, and stays locked until the job ends
    folder = RunFolder(Path(cfg.out))
    run = folder.open(resume=cfg.resume, overwrite=cfg.overwrite,
                      record={"seed": cfg.seed, "command": cfg.command, "nproc": a.nproc,
                              "config": {k: v for k, v in vars(a).items() if k not in ("func", "argv")}})
    cfg.run_id = run["id"]
    try:
        return spawn(a, cfg) if a.nproc > 1 else train_here(a, cfg)
    finally:
        folder.close()


class Reporter(Callback):
    """What a person running ``gradxform train`` sees: a progress bar per epoch, a line per epoch."""

    def __init__(self, show: bool, progress: bool):
        self.show, self.progress = show, progress
        self.bar: Any = None

    def on_resume(self, trainer: Trainer) -> None:
        if self.show:
            for note in trainer.resume_notes:
                print(f"skipped checkpoint {note}", flush=True)
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
            grown = record.get("growth")
            note = ""
            if grown:
                note = ("; grew " + ", ".join(f"{p['pair']} {p['hidden'][0]}->{p['hidden'][1]}" for p in grown["pairs"])
                        if grown["grown"] else f"; no growth: {grown['reason']}")
            print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test accuracy "
                  f"{record['test_accuracy']:.2%} ({record['wall_time']:.1f}s){note}", flush=True)


class KillAt(Callback):
    """Fault injection for tests: ``GRADXFORM_KILL_AT=stage:epoch:tick`` sends SIGKILL to that stage's
    process at that tick (epochs counted from 0), as a crashed machine would; ``stage:epoch:save`` once
    it has written its part of that epoch's checkpoint (epochs counted from 1), before the commit. Only
    in a process that hosts that one stage (a rank)."""

    def __init__(self, spec: str):
        stage, epoch, self.tick = spec.split(":")
        self.stage, self.epoch = int(stage), int(epoch)

    def _mine(self, trainer: Trainer) -> bool:
        return trainer.transport.stages == [self.stage] and trainer.epoch == self.epoch

    def on_tick(self, trainer: Trainer, tick: int) -> None:
        if self.tick != "save" and self._mine(trainer) and tick == int(self.tick):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, trainer: Trainer) -> None:
        if self.tick == "save" and self._mine(trainer):
            os.kill(os.getpid(), signal.SIGKILL)


def _callbacks(a: argparse.Namespace, show: bool) -> list[Callback]:
    callbacks: list[Callback] = [Reporter(show, not a.no_progress)]
    spec = os.environ.get("GRADXFORM_KILL_AT")
    if spec:
        callbacks.append(KillAt(spec))
    return callbacks


def _model(a: argparse.Namespace, stages: int) -> Any:
    return staged(a.target, a.pipeline, stages=stages, input_shapes=a.input_shape, tracer=a.tracer, seed=a.seed)


def train_here(a: argparse.Namespace, cfg: TrainConfig) -> int:
    """Every stage in this process."""
    print(set_threads(1), flush=True)
    module = _model(a, 1)
    trainer = Trainer(module, cfg, callbacks=_callbacks(a, show=True))
    recipe = module.gx_recipe
    train, test = checked_datasets(module, recipe, cfg)
    final = trainer.fit(train, test)[-1]
    print(f"final test accuracy: {final['test_accuracy']:.2%} after {final['epoch']} epochs "
          f"({trainer.schedule.describe()}, {trainer.n} stage(s), {final['wall_time']:.1f}s); "
          f"metrics in {Path(cfg.out) / 'metrics.jsonl'}, plot {Path(cfg.out) / 'training.png'}")
    return 0


def checked_datasets(module: Any, recipe: Any, cfg: TrainConfig) -> tuple:
    return datasets_for(module, recipe.args, recipe.kwargs, cfg.data, cfg.seed)


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG), so that no
    rank outlives a launcher killed by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the signal forwarding below still applies
        pass


STATUS_ENV = "GRADXFORM_STATUS_DIR"
RUN_ENV = "GRADXFORM_RUN_ID"


def _write_status(rank: int, text: str) -> None:
    folder = os.environ.get(STATUS_ENV)
    if folder:
        Path(folder, f"rank{rank}").write_text(text)


def rank_main(a: argparse.Namespace, cfg: TrainConfig) -> int:
    """Body of one torchrun worker: join the group, load the model, train this rank's stage.

    It dies with torchrun's agent (a rank must never train on alone), and leaves a one-line status for
    the launcher: ``ok``, ``user: <message>`` or ``error: <message>``; a rank that leaves none was killed.
    """
    parent = os.getppid()
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    cfg.run_id = os.environ.get(RUN_ENV)
    folder = os.environ.get(STATUS_ENV)
    if folder:
        Path(folder, f"rank{os.environ.get('RANK')}.pid").write_text(str(os.getpid()))

    @record
    def main() -> int:
        rank, world, device = init_rank()
        try:
            stages = stages_for(world, cfg.replicas)
            module = _model(a, stages)
            _check_stages(len(module.stages), stages, cfg.replicas)
            module.to(device)
            recipe = module.gx_recipe
            train, test = checked_datasets(module, recipe, cfg)
            trainer = Trainer(module, cfg, PointToPoint(rank, world, device, cfg.replicas),
                              callbacks=_callbacks(a, rank == 0))
            final = trainer.fit(train, test)[-1]
            if rank == 0:
                print(f"final test accuracy: {final['test_accuracy']:.2%} after {final['epoch']} epochs "
                      f"({trainer.schedule.describe()}, {world} ranks, {final['wall_time']:.1f}s)", flush=True)
            dist.barrier()
            _write_status(rank, "ok")
            return 0
        except GradxformError as e:
            _write_status(rank, f"user: {str(e).splitlines()[0]}")
            print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
            raise
        except Exception as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if "timed out" in text.lower():  # a neighbour stopped answering: say so, not gloo's internals
                text = f"timed out after {os.environ.get('GRADXFORM_TIMEOUT', '60')} s waiting for another rank"
            else:
                text = f"{type(e).__name__}: {text}"
            _write_status(rank, f"error: {text}")
            raise
        finally:
            leave()

    return main()


def _check_stages(stages: int, expected: int, replicas: int = 1) -> None:
    if stages != expected:
        per = f" ({replicas} replicas of {expected} stage(s))" if replicas > 1 else ""
        raise GradxformError(f"the model has {stages} stage(s) but {expected * replicas} ranks were started{per}",
                             hint=f"compile with split{{stages={expected}}} (or petra{{stages={expected}}}), or use "
                                  f"--nproc {stages * replicas}")


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


def spawn(a: argparse.Namespace, cfg: TrainConfig) -> int:
    """Start ``a.nproc`` ranks on this machine through torchrun; returns the job's exit code.

    Everything that can be checked is checked here first, once: the options, the model (compiled once,
    so a stage count that does not match ``--nproc`` is one message), the data, and ``--out``, which
    this process locks for the job's lifetime. torchrun runs in its own process group: SIGINT and
    SIGTERM sent to this process are forwarded to it (it stops its ranks), and it is told to stop when
    this process dies, even by SIGKILL. When a rank fails, the message names it.
    """
    stages = _stages(a)
    module = _model(a, stages)
    _check_stages(len(module.stages), stages, a.replicas)
    if a.replicas == 1:
        Trainer(module, cfg)  # the schedule's requirements (heads, ...) and the options, before any rank starts
    else:  # a Trainer here would be one replica: check what it would, and the replicas, without one
        schedule = cfg.validate(module)
        schedule.check(module)
        schedule.check_data_parallel(a.replicas, stages)
    checked_datasets(module, module.gx_recipe, cfg)
    # the ranks must not wipe the folder this process just checked (and holds locked)
    argv = [x for x in _without_nproc(a.argv) if x != "--overwrite"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "--monitor-interval=1", "-m", "gradxform", *argv]
    status = Path(tempfile.mkdtemp(prefix="gradxform-ranks-"))
    n, why = threads(a.nproc)
    print(f"threads: {n} per rank ({why}; set OMP_NUM_THREADS to choose)", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(n), **{STATUS_ENV: str(status), RUN_ENV: cfg.run_id or ""})
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                preexec_fn=lambda: _die_with_parent(signal.SIGTERM))
        stopped: list[int] = []

        def forward(sig: int, frame: Any) -> None:
            stopped.append(sig)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = _wait(proc, status, a.nproc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped:
            print(f"interrupted: stopped the {a.nproc} ranks ({signal.Signals(stopped[0]).name}); "
                  f"continue with --resume", file=sys.stderr)
            return 130
        if code:
            return _report_failure(status, a.nproc, code)
        return 0
    finally:
        shutil.rmtree(status, ignore_errors=True)


GRACE_S = 5.0


def _wait(proc: subprocess.Popen, status: Path, world: int) -> int:
    """torchrun's exit code. Once a rank has failed, the others get ``GRACE_S`` seconds to stop: a
    rank that is hung (stopped, or stuck outside a collective) cannot act on torchrun's SIGTERM, and
    torchrun waits 30 s before its SIGKILL."""
    failed_at = None
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if failed_at is None:
            said = [(status / f"rank{r}").read_text() for r in range(world) if (status / f"rank{r}").exists()]
            if any(t != "ok" for t in said):
                failed_at = time.monotonic()
        elif time.monotonic() - failed_at > GRACE_S:
            for r in range(world):
                if not (status / f"rank{r}").exists() and (status / f"rank{r}.pid").exists():
                    try:
                        os.kill(int((status / f"rank{r}.pid").read_text()), signal.SIGKILL)
                        (status / f"rank{r}").write_text("hung: it stopped responding after another rank "
                                                         "failed, and was killed")
                    except (ProcessLookupError, ValueError):
                        pass
            failed_at = float("inf")  # once


def _report_failure(status: Path, world: int, code: int) -> int:
    """Name the rank that failed first: one that left no status was killed; a user error is exit 2."""
    said = {r: (status / f"rank{r}").read_text() for r in range(world) if (status / f"rank{r}").exists()}
    silent = [r for r in range(world) if r not in said]
    users = {r: t[len("user: "):] for r, t in said.items() if t.startswith("user: ")}
    if users:
        r = min(users)
        print(f"error: training stopped: rank {r} (stage {r}): {users[r]}", file=sys.stderr)
        return 2
    hung = {r: t for r, t in said.items() if t.startswith("hung: ")}
    if hung:
        r = min(hung)
        others = [f"rank {q}: {t}" for q, t in sorted(said.items()) if q != r and t != "ok"]
        print(f"error: training stopped: rank {r} (stage {r}) hung: {hung[r][len('hung: '):]}"
              + (f"; {'; '.join(others)}" if others else ""), file=sys.stderr)
        print("  hint: continue from the last committed checkpoint with --resume", file=sys.stderr)
        return 1
    if silent:
        others = [f"rank {r}: {t}" for r, t in sorted(said.items()) if t != "ok"]
        print(f"error: training stopped: rank {', '.join(map(str, silent))} (stage {', '.join(map(str, silent))}) "
              f"died without a word (killed by a signal: out of memory, SIGKILL, or its machine)"
              + (f"; then {'; '.join(others)}" if others else ""), file=sys.stderr)
        print("  hint: continue from the last committed checkpoint with --resume", file=sys.stderr)
        return 1
    errors = [f"rank {r}: {t}" for r, t in sorted(said.items()) if t != "ok"]
    print(f"error: training stopped (exit code {code}): " + ("; ".join(errors) or "see the messages above"),
          file=sys.stderr)
    return 1
