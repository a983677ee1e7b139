"""F³ in a pipeline: samples per second on 2 gloo processes against backprop on the same stages.

F³'s stages send nothing backwards and update as soon as their own forward is done, so no stage ever
waits for a later one; backprop through the same two stages sends one micro-batch at a time. Same
model (``split{stages=2},f3{at=stages}``), same data, one thread per process, ``--rounds`` interleaved
runs, medians. The connectors are the identity under backprop, so both train the same network.

    python bench/bench_f3_pipeline.py [--rounds 3]

Writes docs/bench_f3_pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"digits ResNet-18 (width 16)": f"{ROOT / 'examples' / 'resnet.py'}:digits_resnet",
          "digits MLP (4 x 128)": f"{ROOT / 'examples' / 'mlp.py'}"}
SCHEDULES = ("f3", "backprop", "petra")


def run(model: str, schedule: str, out: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "gradxform", "train", model, "--pass", "split{stages=2},f3{at=stages}",
           "--schedule", schedule, "--nproc", "2", "--epochs", str(epochs), "--batch-size", "32",
           "--optimizer", "adamw", "--lr", "1e-3", "--no-progress", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                   check=True)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {"samples_per_s": last["samples"] / last["train_seconds"], "accuracy": last["test_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    results: dict = {m: {s: [] for s in SCHEDULES} for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, model in MODELS.items():
                for s in SCHEDULES:
                    results[name][s].append(run(model, s, Path(tmp) / f"{len(results)}-{s}-{r}-{hash(name)}",
                                                a.epochs))
                print(f"round {r + 1}: {name}: " + ", ".join(
                    f"{s} {results[name][s][-1]['samples_per_s']:.0f}/s" for s in SCHEDULES), flush=True)
    lines = ["# F³ in a pipeline: throughput on 2 processes", "",
             f"Measured {date.today()} on {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch "
             f"{torch.__version__} (`python bench/bench_f3_pipeline.py --rounds {a.rounds}`); load average at the "
             f"end {os.getloadavg()[0]:.1f}. 2 gloo processes, one thread each, micro-batch 32, AdamW 1e-3, "
             f"{a.epochs} epochs; samples/s over the last epoch's training; medians of {a.rounds} interleaved runs. "
             "Goal (issue 14): F³ at least 1.4x backprop's samples/s.", "",
             "| model | f3 | backprop | petra | f3 / backprop | test accuracy f3 / backprop |",
             "|---|---|---|---|---|---|"]
    for name, res in results.items():
        med = {s: statistics.median(x["samples_per_s"] for x in res[s]) for s in SCHEDULES}
        acc = {s: statistics.median(x["accuracy"] for x in res[s]) for s in SCHEDULES}
        lines.append(f"| {name} | {med['f3']:.0f}/s | {med['backprop']:.0f}/s | {med['petra']:.0f}/s | "
                     f"**{med['f3'] / med['backprop']:.2f}x** | {acc['f3']:.1%} / {acc['backprop']:.1%} |")
    (ROOT / "docs" / "bench_f3_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
