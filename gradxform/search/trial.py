"""One trial, in a process of its own: compile and train through :mod:`gradxform.api`, and send each
epoch's metrics record back to the worker that started it.

The worker starts trials from a fork server that has imported this module (and so torch) once: each
trial is a fresh fork of a process that never trained, so peak counters, allocator and caches start
clean, without paying torch's import per trial. A trial dies with its fork server, which dies with
its worker. Seeds are fixed by the trial's settings (``--seed``, or a searched ``train{seed}``): the
command it records re-runs it to the same numbers with the same thread count.
"""

from __future__ import annotations

import os
import shlex
import threading
import traceback
from typing import Any

import torch
from tqdm import tqdm

from .. import api
from ..errors import GradxformError
from ..options import convert, option_types
from ..runtime.schedules import make_schedule
from ..runtime.train import Callback, TrainConfig, Trainer
from .process import die_with_parent
from .space import knob_types

# what an epoch record sends back (the rest stays in the trial's metrics.jsonl)
SENT = ("epoch", "schedule", "train_loss", "test_accuracy", "wall_time", "peak_kept_bytes", "peak_step_bytes",
        "train_seconds", "samples")
FLAGS = ("batch_size", "micro_batches", "accumulate", "optimizer", "lr", "momentum", "weight_decay", "lr_schedule",
         "rank_every", "rank_warmup", "rank_cutoff")


class SendEpochs(Callback):
    """Each epoch's record, to the worker (through a pipe)."""

    def __init__(self, conn: Any):
        self.conn = conn

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        self.conn.send({"epoch": {k: record[k] for k in SENT}})


def config(spec: dict[str, Any], module: Any) -> TrainConfig:
    """The trial's TrainConfig: the searched ``train{}`` values (typed), the search's fixed settings,
    and the schedule written out in full (the compiled-for one with the ``schedule{}`` options)."""
    types = knob_types("train")
    values = {k: convert(v, types[k]) for k, v in spec["train"].items()}
    values.setdefault("seed", spec["seed"])
    cfg = TrainConfig(**values, epochs=spec["epochs"], data=spec["data"], out=spec["out"], overwrite=True,
                      checkpoint_every=spec["epochs"])
    schedule = cfg.make_schedule(module)
    if spec["schedule"]:
        typed = option_types(type(schedule.options))
        schedule = make_schedule(schedule, **{k: convert(v, typed[k]) for k, v in spec["schedule"].items()})
    cfg.schedule, cfg.micro_batches, cfg.accumulate = schedule.describe(), None, None
    cfg.command = command(spec, cfg)
    return cfg


def command(spec: dict[str, Any], cfg: TrainConfig) -> str:
    """The ``gradxform train`` command line that re-runs this trial."""
    default = TrainConfig()
    parts = ["gradxform", "train", spec["target"]]
    if spec["pipeline"]:
        parts += ["--pass", spec["pipeline"]]
    parts += ["--schedule", cfg.schedule, "--epochs", str(cfg.epochs), "--data", cfg.data, "--seed", str(cfg.seed)]
    for name in FLAGS:
        value = getattr(cfg, name)
        if value != getattr(default, name):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    for shape in spec.get("input_shapes") or []:
        parts += ["--input-shape", shape]
    if spec.get("tracer", "auto") != "auto":
        parts += ["--tracer", spec["tracer"]]
    parts += ["--out", spec["rerun_out"]]
    return f"OMP_NUM_THREADS={spec['threads']} " + shlex.join(parts)


def train(spec: dict[str, Any], callbacks: list[Callback]) -> tuple[list[dict], TrainConfig]:
    """Compile and train one candidate with the public API; returns the history and the config."""
    seed = convert(spec["train"]["seed"], int) if "seed" in spec["train"] else spec["seed"]
    module = api.staged(spec["target"], spec["pipeline"], input_shapes=spec.get("input_shapes"),
                        tracer=spec.get("tracer", "auto"), seed=seed)
    cfg = config(spec, module)
    fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    return api.train(module, callbacks=callbacks, **fields), cfg


def run(spec: dict[str, Any], conn: Any) -> None:
    """The trial process's body: output to the trial's log, results and errors through ``conn``."""
    die_with_parent()
    with open(spec["log"], "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    # tqdm (torch.fx's interpreter draws one) would make a multiprocessing lock, which a process that
    # ends as a multiprocessing child leaves to the resource tracker to clean up, with a warning
    tqdm.set_lock(threading.RLock())
    try:
        torch.set_num_threads(spec["threads"])
        _, cfg = train(spec, [SendEpochs(conn)])
        conn.send({"done": {"schedule": cfg.schedule, "command": cfg.command}})
    except GradxformError as e:
        print(f"error: {e}", flush=True)
        conn.send({"error": str(e).splitlines()[0]})
    except Exception as e:
        traceback.print_exc()
        conn.send({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
    finally:
        conn.close()
