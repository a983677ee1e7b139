"""Plain data parallelism against AB-training on 4 gloo processes: bytes all-reduced, accuracy, speed.

Both train the digits ResNet-18 (examples/resnet.py:digits_resnet, width 16) on scikit-learn's digits
for the same epochs, 4 replicas of batch 16 (a global batch of 64), one thread per rank:

- ``ddp``: the dense model, ``--schedule backprop --replicas 4`` (every step all-reduces every gradient);
- ``ab``: the model compiled with ``lowrank{mode=factor}``, ``--schedule ab{...} --replicas 4``: two
  groups of two ranks, one training A, the other B.

The bytes are what gradxform's collective wrapper tallied (``allreduce_bytes`` in metrics.jsonl: the
size of every all-reduced tensor, syncs, full-rank phases and the end-of-epoch BatchNorm averages
included), per rank. A table of bytes per step against the compiled rank and the model size is computed
from the parameter counts (what one A/B step all-reduces), and checked against the measured run.

    python bench/bench_dp.py [--epochs 6]

Writes docs/bench_dp.md and docs/bench_dp.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "resnet.py"
RANK = 0.5
AB = "ab{group_size=2,sync_every=20,full_steps=3,cutoff=0.1,sync=with-stale,rebound=5}"
RUNS = {
    "ddp": ("split{stages=1}", "backprop"),
    "ab": (f"lowrank{{mode=factor,rank={RANK}}},split{{stages=1}}", AB),
}


def train(name: str, out: Path, epochs: int) -> tuple[list[dict], float]:
    pipeline, schedule = RUNS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "gradxform", "train", f"{RESNET}:digits_resnet", "--pass", pipeline, "--schedule",
           schedule, "--replicas", "4", "--batch-size", "16", "--epochs", str(epochs), "--lr", "0.05",
           "--out", str(out / name), "--no-progress"]
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()], wall


def step_bytes(target: str, pipeline: str) -> dict[str, int]:
    """Bytes one step all-reduces per rank: every parameter for plain data parallelism; for an A/B step,
    the trained factor, the 1-D parameters and the full-rank layers."""
    from gradxform.compiler import compile
    from gradxform.nn.lowrank import LowRankConv2d, LowRankLinear, factor_weights

    torch.manual_seed(0)
    module = compile(target, pipeline, check=False).module
    params = list(module.parameters())
    a_ids, b_ids = set(), set()
    for m in module.modules():
        if isinstance(m, (LowRankLinear, LowRankConv2d)):
            a, b = factor_weights(m)
            a_ids.add(id(a))
            b_ids.add(id(b))
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    rest = [p for p in params if id(p) not in a_ids | b_ids]
    return {"all": size(params), "A": size([p for p in params if id(p) in a_ids]) + size(rest),
            "B": size([p for p in params if id(p) in b_ids]) + size(rest)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    runs = {name: train(name, out, args.epochs) for name in RUNS}

    summary = {}
    for name, (history, wall) in runs.items():
        per_epoch = [sum(h["allreduce_bytes"].values()) / len(h["allreduce_bytes"]) for h in history]
        steps = history[-1]["updates"]["0"]  # the executor's count runs on across epochs
        samples = sum(h["samples"] for h in history)
        seconds = sum(h["train_seconds"] for h in history)
        summary[name] = {"bytes_per_epoch": sum(per_epoch) / len(per_epoch), "bytes_per_step": sum(per_epoch) / steps,
                         "accuracy": history[-1]["test_accuracy"], "throughput": samples / seconds,
                         "train_seconds": seconds, "wall": wall, "curve": per_epoch,
                         "accuracies": [h["test_accuracy"] for h in history],
                         "ab": history[-1].get("ab"),
                         "per_rank": {k: sum(h["allreduce_bytes"][k] for h in history) / len(history)
                                      for k in history[0]["allreduce_bytes"]}}
    ddp, ab = summary["ddp"], summary["ab"]
    ratio = ab["bytes_per_epoch"] / ddp["bytes_per_epoch"]
    gap = 100 * (ddp["accuracy"] - ab["accuracy"])

    table = []
    for depth, target in ((18, f"{RESNET}:digits_resnet"), (34, f"{RESNET}:digits_resnet34")):
        dense = step_bytes(target, "split{stages=1}")["all"]
        for rank in (0.25, 0.5):
            b = step_bytes(target, f"lowrank{{mode=factor,rank={rank}}},split{{stages=1}}")
            table.append((depth, rank, dense, b["A"], b["B"], (b["A"] + b["B"]) / 2 / dense))

    cores = os.cpu_count()
    lines = [
        "# Data parallelism vs AB-training (4 gloo processes)", "",
        f"Measured {date.today()} on `{' '.join(platform.uname()[:3])}` ({platform.machine()}), {cores} CPU cores "
        f"(shared with other jobs), torch {torch.__version__}; one thread per rank. `python bench/bench_dp.py "
        f"--epochs {args.epochs}`.", "",
        f"digits ResNet-18 (width 16), {args.epochs} epochs, 4 replicas x batch 16, SGD lr 0.05 cosine. "
        f"ddp: the dense model, `--schedule backprop --replicas 4`. ab: `lowrank{{mode=factor,rank={RANK}}}`, "
        f"`--schedule '{AB}' --replicas 4` (groups {{0,1}} train A, {{2,3}} B).", "",
        "| run | bytes all-reduced / epoch / rank | / step | test accuracy | samples/s (train) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in RUNS:
        s = summary[name]
        lines.append(f"| {name} | {s['bytes_per_epoch'] / 1e6:.2f} MB | {s['bytes_per_step'] / 1e3:.1f} kB | "
                     f"{100 * s['accuracy']:.2f}% | {s['throughput']:.0f} | {s['wall']:.0f} |")
    final = ab["ab"] or {}
    lines += [
        "",
        f"- ab all-reduces **{100 * ratio:.1f}%** of ddp's bytes per epoch (target <= 50%: "
        f"{'met' if ratio <= 0.5 else 'missed'}).",
        "- per rank, bytes / epoch: ab " + ", ".join(f"rank {k} {v / 1e6:.2f} MB" for k, v in ab["per_rank"].items())
        + f" (the A-groups all-reduce the k x k convolutions' factors, the B-groups the 1x1 ones: "
        f"{100 * max(ab['per_rank'].values()) / ddp['bytes_per_epoch']:.1f}% of ddp on the busiest rank, "
        f"{'within' if max(ab['per_rank'].values()) <= 0.5 * ddp['bytes_per_epoch'] else 'above'} the 50% target).",
        f"- accuracy gap ddp - ab: **{gap:+.2f} points** (target within 1.5: {'met' if abs(gap) <= 1.5 else 'missed'}).",
        f"- final compression of the ab model: {final.get('compression', float('nan')):.2f}:1 "
        f"({final.get('dense_params')} dense parameters -> {final.get('params')}); ranks {final.get('ranks')}.",
        f"- throughput ab / ddp: {ab['throughput'] / ddp['throughput']:.2f} (the factored layers cost fewer FLOPs; "
        "a full-rank phase computes W through B = I).",
        "",
        "Bytes per step per rank against the compiled rank and the model size (from the parameter counts, "
        "float32): a plain data-parallel step all-reduces every gradient, an A/B step the trained factor, the "
        "1-D parameters and the full-rank first and last layers. Syncs and full-rank phases come on top (in "
        "the measured totals above).", "",
        "| model | rank | ddp / step | ab A-group / step | ab B-group / step | ab mean / ddp |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for depth, rank, dense, a, b, share in table:
        lines.append(f"| digits ResNet-{depth} | {rank} | {dense / 1e3:.1f} kB | {a / 1e3:.1f} kB | {b / 1e3:.1f} kB "
                     f"| {100 * share:.1f}% |")
    lines += ["", "![accuracy vs bytes](bench_dp.png)", ""]
    (ROOT / "docs" / "bench_dp.md").write_text("\n".join(lines))
    (ROOT / "docs" / "bench_dp_raw.json").write_text(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in RUNS:
        s = summary[name]
        cum, total = [], 0.0
        for b in s["curve"]:
            total += b
            cum.append(total / 1e6)
        ax.plot(cum, [100 * a for a in s["accuracies"]], marker="o", label=name)
    ax.set_xlabel("MB all-reduced per rank (cumulative)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits ResNet-18, 4 replicas: accuracy vs bytes sent")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_dp.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
