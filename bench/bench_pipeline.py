"""Pipelines against one process: speed-up, per-stage time breakdown, memory kept, accuracy.

The speed-up is what a user judges: samples per second of J processes (one thread each) against one
process training the *unsplit* model with an ordinary loop (forward, loss, backward, optimizer step).
Side by side in one run, on the same stages: petra on gradxform's engine, gpipe and 1f1b (through
torch.distributed.pipelining across ranks), and backprop through the pipeline (one micro-batch at a
time). Every configuration runs ``--rounds`` times, interleaved, and the median is reported: the machine
is shared and noisy. A per-stage breakdown (forward, inversion, recompute, backward, optimizer, blocked
on a receive, blocked on a send, the rest) says where each stage's time went.

    python bench/bench_pipeline.py [--rounds 3] [--models digits,digits128,resnet18,vit] [--device cpu|cuda]

Writes docs/bench_pipeline.md and docs/bench_pipeline.png.
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
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "resnet.py"
MODELS = {
    # name: (model, data, micro-batch, epochs, label)
    "digits": (f"{RESNET}:digits_resnet34", "digits", 32, 2, "digits ResNet-34 (width 16), micro-batch 32"),
    "digits128": (f"{RESNET}:digits_resnet34", "digits", 128, 2, "digits ResNet-34 (width 16), micro-batch 128"),
    "resnet18": (f"{RESNET}:resnet18", "synthetic", 32, 1, "ResNet-18 (CIFAR stem), 32x32 synthetic, micro-batch 32"),
    "vit": (f"{ROOT / 'examples' / 'vit.py'}", "synthetic", 32, 1, "ViT (examples/vit.py), synthetic, micro-batch 32"),
}
SCHEDULES = ("petra", "1f1b", "gpipe", "backprop")
PHASES = ("forward", "inversion", "recompute", "backward", "optimizer", "wait_recv", "wait_send")


PLAIN = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from gradxform.frontend.loader import load
from gradxform.runtime.data import datasets_for
from gradxform.runtime.losses import classification_loss
from gradxform.runtime.train import TrainConfig, make_optimizer, micro_batches
from gradxform.api import staged
target, data, batch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
loaded = load(target)
model = loaded.module
train, _ = datasets_for(staged(target, "split{stages=1}"), loaded.args, loaded.kwargs, data)
opt = make_optimizer(model, TrainConfig())
for epoch in range(epochs):
    batches = micro_batches(train, batch, 0, epoch)
    start = time.perf_counter()
    for x, y, _ in batches:
        loss = classification_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
print(json.dumps({"samples_per_s": len(batches) * batch / seconds}))
"""


def plain(model: str, data: str, batch: int, epochs: int, device: str) -> float:
    """Samples/s of an ordinary training loop on the unsplit model, in its own process, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PLAIN, model, data, str(batch), str(epochs)], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["samples_per_s"]


def engine(model: str, data: str, batch: int, epochs: int, pipeline: str, schedule: str, nproc: int,
           out: Path) -> dict:
    """The last epoch's record of ``gradxform train`` (samples/s over its training, evaluation excluded)."""
    cmd = [sys.executable, "-m", "gradxform", "train", model, "--pass", pipeline, "--schedule", schedule,
           "--epochs", str(epochs), "--batch-size", str(batch), "--data", data, "--nproc", str(nproc),
           "--no-progress", "--out", str(out)]
    if schedule in ("gpipe", "1f1b"):
        cmd += ["--micro-batches", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    last["samples_per_s"] = last["samples"] / last["train_seconds"]
    return last


def kept_memory(stages: int, model: str, micro_batches: int = 16, batch: int = 32) -> dict[str, list[int]]:
    """Exact bytes each stage keeps for in-flight micro-batches (from one tick to the next), in-process."""
    from gradxform.api import staged
    from gradxform.runtime.engine import InProcess, run_schedule
    from gradxform.runtime.executor import StageExecutor
    from gradxform.runtime.losses import classification_loss
    from gradxform.runtime.schedules import make_schedule

    torch.manual_seed(0)
    x = torch.randn(micro_batches * batch, *staged(model, "split{stages=1}").gx_recipe.args[0].shape[1:])
    y = torch.randint(0, 10, (micro_batches * batch,))
    out = {}
    for schedule in ("stash", "dsp", "petra"):
        torch.manual_seed(0)
        module = staged(model, f"petra{{stages={stages}}}")
        sched = make_schedule(schedule)
        inverses = module.inverses()
        exs = {j: StageExecutor(j, stages, st, sched, torch.optim.SGD(st.parameters(), lr=0.01),
                                classification_loss, inverses.get(j)) for j, st in enumerate(module.stages)}
        run_schedule(sched.ticks(stages, micro_batches), exs, InProcess(stages),
                     lambda mb: module.first_inputs((x[mb * batch:(mb + 1) * batch],), {}),
                     lambda mb: y[mb * batch:(mb + 1) * batch])
        out[schedule] = [exs[j].stats.peak_kept_bytes for j in range(stages)]
        out[f"{schedule}_invertible"] = sorted(inverses)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="digits,digits128,resnet18,vit")
    ap.add_argument("--device", default="cpu", help="cuda: the ranks use one GPU each (NCCL)")
    a = ap.parse_args()
    names = a.models.split(",")
    results: dict = {name: {"plain": [], **{s: [] for s in SCHEDULES}, "engine1": []} for name in names}
    records: dict = {name: {} for name in names}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in names:
                model, data, batch, epochs, _ = MODELS[name]
                results[name]["plain"].append(plain(model, data, batch, epochs, a.device))
                one = engine(model, data, batch, epochs, "split{stages=1}", "backprop", 1, Path(tmp) / f"{name}-1-{r}")
                results[name]["engine1"].append(one["samples_per_s"])
                for schedule in SCHEDULES:
                    rec = engine(model, data, batch, epochs, "petra{stages=2}", schedule, 2,
                                 Path(tmp) / f"{name}-{schedule}-{r}")
                    results[name][schedule].append(rec["samples_per_s"])
                    records[name].setdefault(schedule, []).append(rec)
                print(f"round {r + 1}/{a.rounds} {name}: " + ", ".join(
                    f"{k} {v[-1]:.0f}/s" for k, v in results[name].items()), flush=True)
    memory = {(MODELS[n][4].split(",")[0], J): kept_memory(J, MODELS[n][0]) for n in ("digits", "vit") if n in names
              for J in (2, 4)}
    write(results, records, memory, a, time.perf_counter() - started)


def _median_record(recs: list[dict]) -> dict:
    """The record of the median-throughput run (its breakdown belongs to the throughput shown)."""
    return sorted(recs, key=lambda r: r["samples_per_s"])[len(recs) // 2]


def write(results: dict, records: dict, memory: dict, a: argparse.Namespace, seconds: float) -> None:
    med = {n: {k: statistics.median(v) for k, v in res.items()} for n, res in results.items()}
    cores = len(os.sched_getaffinity(0))
    lines = [
        "# Pipelines against one process: speed-up, breakdown, memory", "",
        f"Measured {date.today()} on {platform.machine()}, {cores} CPU cores, torch {torch.__version__}, "
        f"device {a.device} (`python bench/bench_pipeline.py --rounds {a.rounds}`), {seconds / 60:.0f} min. "
        f"Load average at the end: {os.getloadavg()[0]:.1f} (the machine is shared). Every process has one "
        f"thread; each configuration ran {a.rounds} times, interleaved; medians.", "",
        "## 1. Samples per second, and the speed-up over one process training the unsplit model", "",
        "*plain*: an ordinary loop (forward, loss, backward, step) on the original model in one process. "
        "*engine, 1 stage*: the same model through gradxform's engine (`split{stages=1}`, backprop): the "
        "engine's own overhead. The pipelines train `petra{stages=2}` (reversible couplings, two stages "
        "balanced on forward + recompute + backward) on 2 processes; gpipe and 1f1b run in "
        "torch.distributed.pipelining with 4 micro-batches per step; backprop sends one micro-batch at a "
        "time through both stages. J = 4 needs 4 cores; this machine has 2.", "",
        "| model | plain, 1 process | engine, 1 stage | petra, 2 proc. | 1f1b, 2 proc. | gpipe, 2 proc. | "
        "backprop, 2 proc. | petra speed-up | engine overhead |",
        "|---|---|---|---|---|---|---|---|---|"]
    for n, m in med.items():
        lines.append(f"| {MODELS[n][4]} | {m['plain']:.0f}/s | {m['engine1']:.0f}/s | {m['petra']:.0f}/s | "
                     f"{m['1f1b']:.0f}/s | {m['gpipe']:.0f}/s | {m['backprop']:.0f}/s | "
                     f"**{m['petra'] / m['plain']:.2f}x** | {m['plain'] / m['engine1']:.2f}x |")
    lines += ["", "## 2. Where each stage's time goes (petra, 2 processes, seconds of the last epoch)", "",
              "| model | stage | " + " | ".join(PHASES) + " | the rest | wall |",
              "|---|---|" + "---|" * len(PHASES) + "---|---|"]
    for n in med:
        rec = _median_record(records[n]["petra"])
        for j, phases in sorted(rec["phases"].items()):
            rest = rec["train_seconds"] - sum(phases.get(p, 0.0) for p in PHASES)
            lines.append(f"| {MODELS[n][4].split(',')[0]} | {j} | " + " | ".join(
                f"{phases.get(p, 0.0):.2f}" for p in PHASES) + f" | {rest:.2f} | {rec['train_seconds']:.2f} |")
    lines += ["", "*the rest*: Python, message packing and the tick loop, and whatever the machine's other "
                  "load took.", ""]
    if memory:
        kib = 1024
        lines += ["## 3. What each stage keeps for in-flight micro-batches", "",
                  "Exact bytes held from one tick to the next (a stash's weight copies included), peak over 16 "
                  "micro-batches of 32, in-process. The ResNet's stages each hold a block that cannot be "
                  "inverted, so under petra they keep their input like dsp; the ViT's middle stages are pure "
                  "reversible chains and keep nothing.", "",
                  "| model | J | schedule | " + " | ".join(f"stage {j}" for j in range(4)) + " | total | vs stash |",
                  "|---|---|---|" + "---|" * 4 + "---|---|"]
        for (label, J), res in memory.items():
            base = sum(res["stash"])
            for s in ("stash", "dsp", "petra"):
                cells = [f"{b / kib:.0f} KiB" for b in res[s]] + [""] * (4 - J)
                lines.append(f"| {label} | {J} | {s} | " + " | ".join(cells) +
                             f" | {sum(res[s]) / kib:.0f} KiB | {sum(res[s]) / base:.0%} |")
    lines += ["", "![samples per second](bench_pipeline.png)", ""]
    (ROOT / "docs" / "bench_pipeline.md").write_text("\n".join(lines))
    plot(med)
    print("\n".join(lines))


def plot(med: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["plain", "engine1", "petra", "1f1b", "gpipe", "backprop"]
    labels = ["plain (1)", "engine (1)", "petra (2)", "1f1b (2)", "gpipe (2)", "backprop (2)"]
    fig, axes = plt.subplots(1, len(med), figsize=(4 * len(med), 3.6), squeeze=False)
    for ax, (n, m) in zip(axes[0], med.items()):
        ax.bar(labels, [m[k] / m["plain"] for k in keys], color=["#888", "#aaa", "#2a7", "#47c", "#69d", "#c84"])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.0, color="k", lw=0.8, ls=":")
        ax.set_title(MODELS[n][4].split(",")[0], fontsize=9)
        ax.set_ylabel("samples/s vs plain, 1 process")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_pipeline.png", dpi=110)


if __name__ == "__main__":
    main()
