"""``gradxform search``: check everything, create (or join) the study, start the workers, draw a
progress bar over the trials, and write the front, the plot, the trials and the best command.

The workers (:mod:`gradxform.search.worker`) are processes of their own that share nothing but the
study's storage; this command only starts K of them on this machine and reads the storage. Another
machine joins the same study by running this command with the same ``--storage`` URL, ``--study``
name and ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import GradxformError
from ..search import report
from ..search.objectives import OBJECTIVES, parse_objectives
from ..search.space import parse_space
from ..search.study import fail_stale, open_storage, optuna_module, rows, study_id
from ..search.process import die_with_parent
from ..search.worker import make_job

PRUNERS = ("auto", "median", "halving", "hyperband", "dominated", "none")
OPTUNA_PRUNERS = ("median", "halving", "hyperband")
SETTINGS = ("space", "objectives", "epochs", "target", "data", "seed")  # a study keeps these; --resume must match
OUTPUTS = ("trials", "logs", "trials.csv", "trials.json", "pareto.txt", "pareto.png", "best.json", "search.json")


def add_parser(sub: Any) -> None:
    s = sub.add_parser("search", help="search passes, schedules and their options for the best trade-offs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("target", metavar="FILE[:ATTR]", help="the model file")
    s.add_argument("--space", required=True, metavar="SPACE",
                   help="pipelines with ranges and choices, ';' between alternatives, e.g. "
                        "'petra{stages=2..4};dgl{stages=2|4};train{lr=1e-3..1e-1:log,batch_size=32|64}'")
    s.add_argument("--objectives", default="acc,mem,throughput", help=f"any of {', '.join(OBJECTIVES)}")
    s.add_argument("--trials", type=int, default=20, help="trials the study holds when done (with --resume too)")
    s.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    s.add_argument("--storage", default=None, metavar="URL",
                   help="journal:PATH, a journal file path, sqlite:///PATH, postgresql://... (default: "
                        "journal:OUT/study.journal)")
    s.add_argument("--study", default="search", help="the study's name in the storage")
    s.add_argument("--resume", action="store_true", help="continue (or, from another machine, join) the study")
    s.add_argument("--overwrite", action="store_true", help="delete the study and --out's search files first")
    s.add_argument("--data", default="digits", help="digits | synthetic | synthetic-deep | module:function")
    s.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    s.add_argument("--seed", type=int, default=0, help="every trial's seed (and the samplers')")
    s.add_argument("--sampler", choices=("tpe", "nsga2", "random"), default="tpe")
    s.add_argument("--startup-trials", type=int, default=4,
                   help="random trials before TPE models the space (and before the median pruner acts)")
    s.add_argument("--pruner", choices=PRUNERS, default="auto",
                   help="auto: median for one objective, dominated (gradxform's rule) for several")
    s.add_argument("--prune-margin", type=float, default=0.02,
                   help="dominated: stop a trial this much less accurate than a completed one after the same epoch")
    s.add_argument("--prune-from-epoch", type=int, default=2, help="no trial is stopped before this epoch")
    s.add_argument("--threads", type=int, default=None, help="torch threads per trial (default: cores / workers)")
    s.add_argument("--input-shape", action="append", metavar="NAME:[d0,...][:dtype]")
    s.add_argument("--tracer", choices=("auto", "fx", "export"), default="auto")
    s.add_argument("--out", default="runs/search", metavar="DIR", help="trials, logs, tables, plot")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_search)


def check(a: argparse.Namespace) -> tuple[list[str], Any, str]:
    """Every option, the space and the model, before anything starts; returns (objectives, space, pruner)."""
    objectives = parse_objectives(a.objectives)
    for name in ("trials", "workers", "epochs", "prune_from_epoch"):
        if getattr(a, name) < 1:
            raise GradxformError(f"--{name.replace('_', '-')} must be at least 1")
    if a.threads is not None and a.threads < 1:
        raise GradxformError("--threads must be at least 1")
    if "throughput" in objectives and a.epochs < 2:
        raise GradxformError("the throughput objective needs --epochs 2 or more",
                             hint="the first epoch is warm-up and is not measured")
    pruner = a.pruner if a.pruner != "auto" else "median" if len(objectives) == 1 else "dominated"
    if pruner in OPTUNA_PRUNERS and len(objectives) > 1:
        raise GradxformError(f"--pruner {pruner}: Optuna prunes only single-objective studies",
                             hint="use --pruner dominated (gradxform's rule on per-epoch accuracy) or none")
    if pruner == "dominated" and "acc" not in objectives:
        raise GradxformError("--pruner dominated judges per-epoch accuracy, and acc is not an objective",
                             hint="add acc to --objectives, or use --pruner none")
    optuna_module()
    try:
        space = parse_space(a.space)
    except GradxformError as e:
        raise GradxformError(f"--space: {e.message}", hint=e.hint) from None
    from ..frontend.loader import load

    load(a.target, a.input_shape)  # a model file that does not load is one message, not N failed trials
    return objectives, space, pruner


def cmd_search(a: argparse.Namespace) -> int:
    objectives, space, pruner = check(a)
    out = Path(a.out)
    storage_url = a.storage or f"journal:{out / 'study.journal'}"
    if (out / "search.json").exists() and not (a.resume or a.overwrite):
        raise GradxformError(f"{out} holds a search already",
                             hint="--resume continues it, --overwrite replaces it, or choose another --out")
    if a.overwrite:
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if a.storage is None:
            for name in ("study.journal", "study.journal.lock"):
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    optuna = optuna_module()
    storage = open_storage(storage_url)
    wanted = {"space": space.describe(), "objectives": objectives, "epochs": a.epochs, "target": a.target,
              "data": a.data, "seed": a.seed}
    study = _study(optuna, storage, a, objectives, wanted)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    job = make_job(storage=storage_url, study=a.study, space=space, objectives=objectives, trials=a.trials,
                   epochs=a.epochs, out=str(out), target=a.target, data=a.data, seed=a.seed, sampler=a.sampler,
                   startup_trials=a.startup_trials, pruner=pruner, margin=a.prune_margin,
                   from_epoch=a.prune_from_epoch, threads=threads, input_shapes=a.input_shape, tracer=a.tracer)
    (out / "search.json").write_text(json.dumps({"command": "gradxform " + " ".join(a.argv), **job}, indent=1) + "\n")
    print(f"search     {a.target}: {a.trials} trials of {a.epochs} epochs, {a.workers} worker(s) x {threads} "
          f"thread(s), objectives {', '.join(f'{o} ({OBJECTIVES[o].direction})' for o in objectives)}")
    for m in space.methods:
        print(f"method     {m.label:<12} {m.show() or '(the model as it is)'}")
    for g in space.shared:
        print(f"shared     {g.show()}")
    print(f"study      {a.study} in {storage_url}; pruning: {_pruning_text(pruner, a)}", flush=True)
    code = _run_workers(a, out, storage, study)
    trials = storage.get_all_trials(study_id(storage, a.study), deepcopy=False)
    table = rows(trials, objectives)
    header = {"study": a.study, "storage": storage_url, **wanted}
    top = report.write(table, objectives, out, header)
    front = report.front(table, objectives)
    print()
    print(report.table(front, objectives, f"Pareto front over {', '.join(objectives)} "
                                          f"({len(front)} of {len(table)} trials: {report.summary(table)}; * an objective)"))
    if top is None:
        failed = [r for r in table if r["error"]]
        print("\nno trial completed" + (f"; trial {failed[0]['number']}: {failed[0]['error']}" if failed else ""),
              file=sys.stderr)
        return code or 1
    print(f"\nbest       trial {top['number']} ({top['method']}): " +
          ", ".join(f"{o} {report.fmt(o, top[o])}" for o in objectives))
    print(f"pipeline   {top['pipeline'] or '(default)'}  {report.settings(top)}")
    print(f"re-run     {top['command']}")
    print(f"output     {out}/ (pareto.txt, pareto.png, trials.csv, trials.json, best.json, trials/NUMBER/)")
    return code


def _pruning_text(pruner: str, a: argparse.Namespace) -> str:
    if pruner == "dominated":
        return (f"stop a trial {a.prune_margin:.0%} less accurate than a completed one after the same epoch "
                f"and no better on the other objectives (from epoch {a.prune_from_epoch})")
    return "none" if pruner == "none" else f"Optuna's {pruner} pruner (from epoch {a.prune_from_epoch})"


def _study(optuna: Any, storage: Any, a: argparse.Namespace, objectives: list[str], wanted: dict) -> Any:
    names = {s.study_name for s in storage.get_all_studies()}
    if a.overwrite and a.study in names:
        optuna.delete_study(study_name=a.study, storage=storage)
        names.discard(a.study)
    directions = [OBJECTIVES[o].direction for o in objectives]
    if a.study not in names:
        if a.resume:
            raise GradxformError(f"--resume: there is no study '{a.study}' in {a.storage or 'the journal in --out'}",
                                 hint="drop --resume to start it, or check --storage and --study")
        study = optuna.create_study(study_name=a.study, storage=storage, directions=directions)
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return study
    if not a.resume:
        raise GradxformError(f"the study '{a.study}' exists in {a.storage or 'the journal in --out'}",
                             hint="--resume continues (or joins) it, --overwrite replaces it, or choose another --study")
    study = optuna.load_study(study_name=a.study, storage=storage)
    differ = [f"{k}: {study.user_attrs.get(k)!r} there, {v!r} here" for k, v in wanted.items()
              if study.user_attrs.get(k) != v]
    if differ:
        raise GradxformError(f"--resume: the study '{a.study}' was started with other settings: " + "; ".join(differ),
                             hint="resume with the same space, objectives, epochs, model, data and seed, "
                                  "or start another --study")
    return study


def _run_workers(a: argparse.Namespace, out: Path, storage: Any, study: Any) -> int:
    """Start the workers, follow the study until they end; 0, or 130 when interrupted."""
    import gradxform

    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    root = str(Path(gradxform.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    procs = []
    for i in range(a.workers):
        log = open(logs / f"worker-{i}.log", "a")
        procs.append((subprocess.Popen([sys.executable, "-m", "gradxform.search.worker", str(out / "search.json"), str(i)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=lambda: die_with_parent(signal.SIGTERM)), log))
    sid = study_id(storage, a.study)
    node = os.uname().nodename
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: workers first, then the tables
    bar = tqdm(total=a.trials, desc="trials", unit="trial", dynamic_ncols=True,
               disable=True if a.no_progress else None, file=sys.stderr)
    try:
        alive = list(procs)
        while alive:
            time.sleep(1.0)
            for p, log in list(alive):
                code = p.poll()
                if code is None:
                    continue
                alive.remove((p, log))
                log.close()
                if code not in (0, 130):
                    why = f"stopped with exit code {code}" if code > 0 else f"was killed by {signal.Signals(-code).name}"
                    lost = fail_stale(storage, a.study, worker=f"{node}:{p.pid}", why=why)
                    i = procs.index((p, log))
                    bar.write(f"worker {i} {why}" + (f" (trial {', '.join(map(str, lost))} lost)" if lost else "")
                              + f"; see {logs / f'worker-{i}.log'}", file=sys.stderr)
            _progress(bar, storage.get_all_trials(sid, deepcopy=False), a.trials)
    except KeyboardInterrupt:
        interrupted = True
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p, log in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
            log.close()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    if interrupted:
        print("interrupted: stopped the workers; continue with --resume", file=sys.stderr)
        return 130
    return 0


def _interrupt(sig: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _progress(bar: Any, trials: list, total: int) -> None:
    done = [t for t in trials if t.state.is_finished()]
    bar.update(min(len(done), total) - bar.n)
    states = [t.state.name.lower() for t in trials]
    accs = [t.user_attrs["acc"] for t in done if t.state.name == "COMPLETE" and t.user_attrs.get("acc") is not None]
    bar.set_postfix_str(f"running {states.count('running')}, pruned {states.count('pruned')}, failed "
                        f"{states.count('fail')}" + (f", best acc {max(accs):.2%}" if accs else ""), refresh=True)
