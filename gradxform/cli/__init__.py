"""``gradxform compile | passes | schedules | inspect | train | search | export``: argument handling and printing.

Imports are lazy: ``gradxform passes`` and ``--help`` answer without importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import __version__
from .threads import set_threads

EMITS = ("pt", "onnx", "dot", "svg", "json")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit_list(text: str) -> list[str]:
    from ..errors import GradxformError, did_you_mean

    items = [e.strip() for e in text.split(",") if e.strip()]
    for e in items:
        if e not in EMITS:
            raise GradxformError(f"unknown --emit kind '{e}'", hint=did_you_mean(e, EMITS))
    return items


def _writable(folder: Path) -> None:
    from ..errors import ExportError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".gradxform-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"cannot write to output folder {folder}: {e.strerror or e}",
                          hint="choose a folder you can write to with -o DIR") from None


def cmd_compile(a: argparse.Namespace) -> int:
    from ..compiler import compile_loaded
    from ..export.report import format_compile
    from ..frontend.loader import load
    from ..passes import resolve_pipeline

    emit = _emit_list(a.emit)
    out = Path(a.out)
    resolve_pipeline(a.pipeline)  # fail on a typo before any slow work
    _writable(out)
    _log(set_threads())
    _log(f"loading {a.target}")
    loaded = load(a.target, a.input_shape)
    _log(f"tracing and running {a.pipeline}")
    result = compile_loaded(loaded, a.pipeline, tracer=a.tracer, check=not a.no_check, rtol=a.rtol, atol=a.atol,
                            strict=a.strict)
    report = result.report
    written, failures = [], []
    module = result.module
    if "pt" in emit:
        from ..export.artefact import save

        save(module, out)
        written.append("model (manifest.json, weights.pt, source/, code/)")
    if "dot" in emit or "svg" in emit:
        from ..export.render import render, to_dot

        title = f"{loaded.spec} · {a.pipeline}"
        if "dot" in emit:
            (out / "graph.dot").write_text(to_dot(module, title))
            written.append("graph.dot")
        if "svg" in emit:
            try:
                render(module, out / "graph.svg", title)
                written.append("graph.svg")
            except Exception as e:  # Graphviz refusing a graph must not lose the other artefacts
                failures.append(f"graph.svg: {type(e).__name__}: {e}")
    if "onnx" in emit:
        from tqdm import tqdm

        from ..export.onnx import export_all

        from ..nn.staged import stages_of

        n = 1 + len(stages_of(module) or [])
        with tqdm(total=n, desc="onnx export", unit="graph", file=sys.stderr, disable=None) as bar:
            results = export_all(module, loaded.args, loaded.kwargs, out, a.onnx_exporter,
                                 progress=bar.update)
        report["onnx"] = [r.as_dict() for r in results]
        written += [Path(r.path).name for r in results if r.ok and r.path]
        failures += [f"{r.name}.onnx: {r.error}" for r in results if not r.ok]
    report["artefacts"] = written
    report["failures"] = failures
    if "json" in emit:
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        written.append("report.json")
    print(format_compile(report))
    print(f"\noutput    {out}/")
    return 1 if failures else 0


def cmd_passes(a: argparse.Namespace) -> int:
    from ..passes import COMPOSITES, PASSES, describe_pass

    if a.name:
        d = describe_pass(a.name)
        print(f"{d['name']}: {d['summary']}")
        if d.get("composite"):
            print(f"  composite: {d['composite']}")
        if d.get("schedule"):
            print(f"  compiles for the schedule: {d['schedule']}")
        if d.get("doc"):
            print()
            print("  " + "\n  ".join(line.strip() for line in d["doc"].splitlines()))
        if "preserves_function" in d:
            print(f"\n  preserves the model's function: {'yes' if d['preserves_function'] else 'no'}")
        _print_options(d["options"], full=True)
        return 0
    for name in sorted(PASSES) + sorted(COMPOSITES):
        d = describe_pass(name)
        kind = "composite" if name in COMPOSITES else "pass"
        print(f"{name:<12} {kind:<9} {d['summary']}")
        _print_options(d["options"], full=False)
    return 0


def _print_options(options: list[dict], full: bool) -> None:
    """A pass's or schedule's options: one block each (``full``), or one line each (the listing)."""
    if full:
        print("\n  options:" if options else "\n  options: none")
    for o in options:
        print(f"    {o['name']}: {o['type']} = {o['default']}" + (f"\n        {o['doc']}" if full else f"  — {o['doc']}"))


def cmd_schedules(a: argparse.Namespace) -> int:
    from ..runtime.schedules import SCHEDULES, describe_schedule

    if a.name:
        d = describe_schedule(a.name)
        print(f"{d['name']}: {d['summary']} ({d['family']})")
        if d["doc"]:
            print()
            print("  " + "\n  ".join(line.strip() for line in d["doc"].splitlines()))
        back = ", ".join(d["backward"]) if d["backward"] else "none: no message crosses a stage boundary backwards"
        print(f"\n  messages: forward ({', '.join(d['forward'])}); backward ({back})")
        _print_options(d["options"], full=True)
        return 0
    for name in sorted(SCHEDULES):
        d = describe_schedule(name)
        print(f"{name:<14} {d['family']:<13} {d['summary']}")
        _print_options(d["options"], full=False)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..compiler import inspect_loaded
    from ..export.report import format_inspect
    from ..frontend.loader import load

    if Path(a.target).is_dir():  # an artefact folder: the model it was compiled from
        from ..export.artefact import original

        loaded = original(a.target)
    else:
        loaded = load(a.target, a.input_shape)
    info = inspect_loaded(loaded, a.tracer)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspect(info))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from ..export.artefact import load

    emit = _emit_list(a.emit)
    folder = Path(a.artefact)
    out = Path(a.out) if a.out else folder
    _writable(out)
    module = load(folder)
    recipe = module.gx_recipe
    failures = []
    if "svg" in emit or "dot" in emit:
        from ..export.render import render, to_dot

        if "dot" in emit:
            (out / "graph.dot").write_text(to_dot(module, recipe.pipeline))
        if "svg" in emit:
            render(module, out / "graph.svg", recipe.pipeline)
    if "onnx" in emit:
        from ..export.onnx import export_all

        for r in export_all(module, recipe.args, recipe.kwargs, out, a.onnx_exporter):
            print(f"{r.name}.onnx: " + (f"max|Δ| {r.max_abs_diff:.2g}" if r.ok else f"FAILED: {r.error}"))
            if not r.ok:
                failures.append(r.name)
    print(f"wrote {', '.join(emit)} to {out}/")
    return 1 if failures else 0


def cmd_train(a: argparse.Namespace) -> int:
    from .train import cmd_train as train

    return train(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradxform", description="A model compiler for training algorithms.")
    p.add_argument("--version", action="version", version=f"gradxform {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_args(sp: argparse.ArgumentParser, artefacts: bool = False) -> None:
        sp.add_argument("target", metavar="FILE[:ATTR]" + ("|DIR" if artefacts else ""),
                        help="model file; ATTR names an nn.Module or a factory"
                             + ("; or an artefact folder (the model it was compiled from)" if artefacts else ""))
        sp.add_argument("--input-shape", action="append", metavar="NAME:[d0,...][:dtype]",
                        help="example input for forward's NAME (repeatable) when the file has no example_inputs()")
        sp.add_argument("--tracer", choices=("auto", "fx", "export"), default="auto",
                        help="auto: torch.fx.symbolic_trace, falling back to torch.export")

    c = sub.add_parser("compile", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="trace a model, run a pass pipeline, write the artefacts")
    model_args(c)
    c.add_argument("--pass", "-p", dest="pipeline", required=True, metavar="PIPELINE",
                   help="e.g. 'split{stages=4,balance=flops}'; see 'gradxform passes'")
    c.add_argument("-o", "--out", default="out", metavar="DIR", help="output folder (default: out)")
    c.add_argument("--emit", default=",".join(EMITS), help=f"artefacts to write (default: {','.join(EMITS)})")
    c.add_argument("--onnx-exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: the TorchScript exporter, falling back to the dynamo one")
    c.add_argument("--no-check", action="store_true", help="skip comparing outputs after each pass")
    c.add_argument("--rtol", type=float, default=None, help="relative tolerance of the output check")
    c.add_argument("--atol", type=float, default=None, help="absolute tolerance of the output check")
    c.add_argument("--strict", action="store_true", help="fail (exit 2) when a pass changes nothing")
    c.set_defaults(func=cmd_compile)

    ps = sub.add_parser("passes", help="list the passes and their options")
    ps.add_argument("name", nargs="?", help="show one pass in full")
    ps.set_defaults(func=cmd_passes)

    i = sub.add_parser("inspect", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="show blocks, cut points and costs the analysis finds")
    model_args(i, artefacts=True)
    i.add_argument("--json", action="store_true", help="print the analysis as JSON")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("train", help="train a compiled (staged) model with a schedule",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("target", metavar="DIR|FILE[:ATTR]", help="an artefact folder from 'compile', or a model file")
    t.add_argument("--pass", "-p", dest="pipeline", default=None, metavar="PIPELINE",
                   help="compile a model file first (default: split{stages=NPROC/REPLICAS})")
    t.add_argument("--schedule", default="auto",
                   help="the training algorithm, e.g. petra or 'forward-grad{tangents=4}' (see 'gradxform "
                        "schedules'); auto: the one the model was compiled for (backprop for one stage, "
                        "petra for several when the passes name none)")
    t.add_argument("--nproc", type=int, default=None,
                   help="processes, one stage of one replica each: replicas x stages (default: --replicas; "
                        "1: all stages in-process)")
    t.add_argument("--replicas", type=int, default=1,
                   help="data-parallel replicas of every stage: each trains on its shard of every global batch "
                        "(R x --batch-size samples) and the replicas of a stage all-reduce their gradients")
    t.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    t.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch")
    t.add_argument("--micro-batches", type=int, default=None,
                   help="sets the schedule's micro_batches option (gpipe/1f1b: micro-batches per step; default 4)")
    t.add_argument("--accumulate", type=int, default=None,
                   help="sets the schedule's accumulate option (backwards per optimizer step; default 1)")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: Nesterov momentum; no weight decay on biases and norm weights with either")
    t.add_argument("--lr", type=float, default=0.05, help="learning rate at the first epoch")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0: plain SGD)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay of the weight matrices")
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: decay the learning rate to 0 over the epochs")
    t.add_argument("--data", default="digits", help="digits | synthetic | synthetic-deep | module:function")
    t.add_argument("--rank-every", type=int, default=0, metavar="STEPS",
                   help="OIALR (lowrank{mode=usv}): truncate ranks every STEPS optimizer steps (0: never)")
    t.add_argument("--rank-warmup", type=int, default=0, metavar="STEPS", help="OIALR: steps before the first")
    t.add_argument("--rank-cutoff", type=float, default=0.1, help="OIALR: drop sigma < cutoff * sigma_max")
    t.add_argument("--grow-every", type=int, default=0, metavar="EPOCHS",
                   help="growth (after the grow pass): add neurons where the expressivity bottleneck is largest "
                        "every EPOCHS epochs (0: never)")
    t.add_argument("--grow-neurons", type=float, default=8,
                   help="growth: new neurons per step, at most (< 1: a fraction of the pair's full width)")
    t.add_argument("--grow-max", type=int, default=None, metavar="WIDTH",
                   help="growth: hidden width cap per pair (default: the width before the grow pass)")
    t.add_argument("--grow-budget", choices=("params", "flops"), default="params",
                   help="growth: what --grow-limit counts")
    t.add_argument("--grow-limit", type=float, default=None,
                   help="growth: stop at this many parameters (or forward FLOPs per sample)")
    t.add_argument("--seed", type=int, default=0, help="initial weights, data order and every random draw")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="metrics, plot and checkpoints (default: a new folder runs/MODEL-SCHEDULE-TIME)")
    t.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                   help="epochs between committed checkpoints (the last epoch is always committed)")
    t.add_argument("--resume", action="store_true", help="continue from the last committed checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else refused)")
    t.add_argument("--input-shape", action="append", metavar="NAME:[d0,...][:dtype]",
                   help="example input for forward's NAME when the model file has no example_inputs()")
    t.add_argument("--tracer", choices=("auto", "fx", "export"), default="auto",
                   help="auto: torch.fx.symbolic_trace, falling back to torch.export")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (a line per epoch still)")
    t.set_defaults(func=cmd_train)

    from .search import add_parser as add_search

    add_search(sub)

    sc = sub.add_parser("schedules", help="list the training schedules and their options")
    sc.add_argument("name", nargs="?", help="show one schedule in full")
    sc.set_defaults(func=cmd_schedules)

    e = sub.add_parser("export", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="re-export ONNX / pictures from a compiled artefact folder")
    e.add_argument("artefact", metavar="DIR", help="an artefact folder from 'gradxform compile'")
    e.add_argument("--emit", default="onnx,svg,dot", help="what to write: onnx, svg, dot")
    e.add_argument("-o", "--out", default=None, metavar="DIR", help="default: the artefact folder")
    e.add_argument("--onnx-exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: the TorchScript exporter, falling back to the dynamo one")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the ranks are started with, and recorded
    if args.command is None:  # bare 'gradxform': say what it can do
        parser.print_help()
        return 0
    from ..errors import GradxformError

    started = time.perf_counter()
    try:
        code = args.func(args)
    except GradxformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (gradxform inspect ... | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if os.environ.get("GRADXFORM_TIMING"):
        _log(f"[{args.command}: {time.perf_counter() - started:.2f}s]")
    return code


if __name__ == "__main__":
    sys.exit(main())
