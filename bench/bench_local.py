"""Local learning and forward gradients against backprop: accuracy, heads' cost, time, memory per stage.

For K = 2, 4, 8 stages of the digits ResNet-18 (width 16, examples/resnet.py:digits_resnet) with
``cnn`` auxiliary heads: backprop, ``local`` (DGL) and ``forward-grad`` with a local or a random
guess and k = 1 or 4 tangents, on scikit-learn's digits and on a harder synthetic task (a random
two-hidden-layer tanh teacher on 8x8 Gaussian images, ``--data synthetic-deep``). Same seed, same
epochs, same optimizer for every run. Writes docs/bench_local.md and docs/bench_local.png.

    python bench/bench_local.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

import gradxform
from gradxform.runtime.data import digits, synthetic
from gradxform.runtime.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples' / 'resnet.py'}:digits_resnet"
STAGES = (2, 4, 8)
METHODS = [
    ("backprop", "split", "backprop"),
    ("local (DGL)", "dgl", "local"),
    ("forward-grad, local guess, k=1", "fwd-local", "forward-grad{guess=local,tangents=1}"),
    ("forward-grad, local guess, k=4", "fwd-local", "forward-grad{guess=local,tangents=4}"),
    ("forward-grad, random guess, k=1", "fwd-local", "forward-grad{guess=random,tangents=1}"),
    ("forward-grad, random guess, k=4", "fwd-local", "forward-grad{guess=random,tangents=4,combine=mean}"),
]


def run(method: str, composite: str, schedule: str, stages: int, data: tuple, epochs: int) -> dict:
    torch.manual_seed(0)
    module = gradxform.compile(MODEL, f"{composite}{{stages={stages}}}")
    heads = next((p["info"] for p in module.gx_report["passes"] if p["name"] == "aux-heads"), None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(schedule=schedule, epochs=epochs, out=tmp, lr=0.05)
        hist = Trainer(module, cfg).fit(*data)
    last = hist[-1]
    steps = sum(len(h["step_losses"]) for h in hist)
    return {"method": method, "stages": stages, "accuracy": last["test_accuracy"],
            "step_ms": 1e3 * sum(h["train_seconds"] for h in hist) / steps,
            "kept": max(last["peak_kept_bytes"].values()), "step_bytes": max(last["peak_step_bytes"].values()),
            "heads_share": heads["share"] if heads else 0.0}


PROCESS_RUNS = [("backprop", "split{stages=2}", "backprop"), ("local (DGL)", "dgl{stages=2}", "local"),
                ("forward-grad, local guess, k=1", "fwd-local{stages=2}", "forward-grad")]


def process_runs(epochs: int) -> list[dict]:
    """Two stages on two gloo processes (one thread each): samples per second and accuracy."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, pipeline, schedule in PROCESS_RUNS:
            folder = Path(tmp) / schedule
            cmd = [sys.executable, "-m", "gradxform", "train", MODEL, "--pass", pipeline, "--schedule", schedule,
                   "--epochs", str(epochs), "--nproc", "2", "--out", str(folder), "--no-progress"]
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                           capture_output=True, text=True)
            hist = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            rate = sum(h["samples"] for h in hist[1:]) / sum(h["train_seconds"] for h in hist[1:])
            out.append({"method": method, "samples_per_s": rate, "accuracy": hist[-1]["test_accuracy"]})
            print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args()
    tasks = {"digits": digits(), "synthetic-deep": synthetic((1, 8, 8), 10, samples=4096, depth=2)}
    run(*METHODS[0], 2, tasks["digits"], 1)  # warm-up: first-call costs would otherwise land on one row
    rows = []
    for task, data in tasks.items():
        for stages in STAGES:
            for method, composite, schedule in METHODS:
                r = run(method, composite, schedule, stages, data, a.epochs)
                r["task"] = task
                rows.append(r)
                print(r, flush=True)
    write(rows, a, process_runs(a.epochs))


def write(rows: list[dict], a: argparse.Namespace, procs: list[dict]) -> None:
    lines = [
        "# Local learning and forward gradients",
        "",
        f"Measured {date.today()} on {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch "
        f"{torch.__version__} (`python bench/bench_local.py`): the digits ResNet-18 (width 16) split into K "
        f"stages with `cnn` heads (`dgl{{stages=K}}` / `fwd-local{{stages=K}}`), {a.epochs} epochs, batch 32, SGD "
        "lr 0.05 with cosine decay, seed 0, in one process. Step time and memory are relative to backprop with "
        "the same K. *Held across ticks*: the most a stage keeps from one tick to the next (the schedule's "
        "memory cost); *per micro-batch*: the most one micro-batch keeps for its backward (graph, inputs, "
        "tangents), both measured exactly from the tensors autograd saves.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"## {task}", "", "| K | method | test accuracy | step time | held across ticks | per micro-batch "
                  "| heads' FLOPs |", "|---|---|---|---|---|---|---|"]
        for stages in STAGES:
            sub = [r for r in rows if r["task"] == task and r["stages"] == stages]
            base = sub[0]
            for r in sub:
                kept = f"{r['kept'] / max(1, base['kept']):.2f}x" if base["kept"] else f"{r['kept'] / 2**20:.2f} MiB"
                lines.append(f"| {stages} | {r['method']} | {r['accuracy']:.2%} | {r['step_ms'] / base['step_ms']:.2f}x "
                             f"| {kept} | {r['step_bytes'] / max(1, base['step_bytes']):.2f}x | "
                             f"{r['heads_share']:.1%} |")
        lines.append("")
    base = procs[0]["samples_per_s"]
    lines += ["## Two processes", "",
              f"The digits ResNet-18 in 2 stages on 2 gloo processes (one thread each, `--nproc 2`), {a.epochs} epochs; "
              "throughput over the epochs after the first (start-up excluded). `local` never waits for the "
              "later stage's gradient; `forward-grad` waits for its directional derivatives, one micro-batch "
              "at a time.", "", "| method | samples/s | vs backprop | test accuracy |", "|---|---|---|---|"]
    for r in procs:
        lines.append(f"| {r['method']} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x | "
                     f"{r['accuracy']:.2%} |")
    lines += ["", "![accuracy vs stages](bench_local.png)", ""]
    (ROOT / "docs" / "bench_local.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, _, _ in METHODS:
            pts = [(r["stages"], 100 * r["accuracy"]) for r in rows if r["task"] == task and r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(STAGES, [str(s) for s in STAGES])
        ax.set_xlabel("stages K")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_local.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
