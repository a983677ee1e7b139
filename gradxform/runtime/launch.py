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
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import GradxformError


def config_from(a: argparse.Namespace) -> Any:
    from .train import TrainConfig

    cfg = TrainConfig(schedule=a.schedule, epochs=a.epochs, batch_size=a.batch_size, micro_batches=a.micro_batches,
                      accumulate=a.accumulate, optimizer=a.optimizer, lr=a.lr, momentum=a.momentum,
                      weight_decay=a.weight_decay, lr_schedule=a.lr_schedule, data=a.data, seed=a.seed, out=a.out,
                      checkpoint_every=a.checkpoint_every, resume=a.resume, progress=not a.no_progress,
                      rank_every=a.rank_every, rank_warmup=a.rank_warmup, rank_cutoff=a.rank_cutoff)
    cfg.validate()
    return cfg


def load_staged(a: argparse.Namespace, stages_wanted: int) -> tuple[Any, tuple, dict]:
    """The staged model and its example inputs, from an artefact folder or a model file.

    The RNG is seeded first, so a model built from a file starts from the same weights in every
    process (and in every run with the same --seed).
    """
    import torch

    from ..nn.staged import StagedModule

    torch.manual_seed(a.seed)
    target = Path(a.target)
    if target.is_dir():
        from ..export.artefact import load

        if a.pipeline:
            raise GradxformError("--pass applies to a model file; this is a compiled artefact",
                                 hint="recompile with 'gradxform compile' to change the pipeline")
        module = load(target)
    else:
        from ..compiler import compile

        pipeline = a.pipeline or f"split{{stages={stages_wanted}}}"
        module = compile(str(target), pipeline, input_shapes=a.input_shape, tracer=a.tracer).module
    recipe = module.gx_recipe
    if not isinstance(module, StagedModule):
        module = StagedModule([module])
    module.gx_recipe = recipe
    return module, recipe.args, recipe.kwargs


def train_main(a: argparse.Namespace) -> int:
    cfg = config_from(a)
    if a.nproc < 1:
        raise GradxformError("--nproc must be at least 1")
    if a.nproc > 1 and "RANK" not in os.environ:
        return spawn(a)
    if "RANK" in os.environ:
        from .distributed import run_rank

        return run_rank(a, cfg)
    staged, args, kwargs = load_staged(a, 1)
    from .train import Trainer

    train, test, _ = prepare_data(staged, args, kwargs, cfg)
    trainer = Trainer(staged, cfg, inverses=stage_inverses(staged))
    history = trainer.fit(train, test)
    final = history[-1]
    print(f"final test accuracy: {final['test_accuracy']:.2%} after {final['epoch']} epochs "
          f"({cfg.schedule}, {len(staged.stages)} stage(s), {final['wall_time']:.1f}s); "
          f"metrics in {Path(cfg.out) / 'metrics.jsonl'}, plot {Path(cfg.out) / 'training.png'}")
    return 0


def prepare_data(staged: Any, args: tuple, kwargs: dict, cfg: Any) -> tuple:
    """Datasets shaped for the model: input shape from its example, classes from its output."""
    import torch

    from .data import load_data
    from .engine import logits_of

    if kwargs or len(args) != 1:
        raise GradxformError("gradxform train feeds one input tensor per sample",
                             hint="train models whose forward takes a single tensor (x), or pass --data module:function "
                                  "with such a model")
    staged.eval()
    with torch.no_grad():
        classes = logits_of(staged(*args, **kwargs)).shape[-1]
    staged.train()
    input_shape = tuple(args[0].shape[1:])
    train, test = load_data(cfg.data, input_shape, classes, cfg.seed)
    return train, test, classes


def stage_inverses(staged: Any) -> dict[int, Any]:
    """Inverses of the stages made only of reversible couplings (used by the petra schedule)."""
    return {j: stage.inverse for j, stage in enumerate(staged.stages) if getattr(stage, "inverse", None)}


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
