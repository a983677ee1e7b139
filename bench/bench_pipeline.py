"""Pipeline schedules side by side: kept memory, throughput and efficiency, accuracy vs wall time.

1. Memory: exact bytes each stage keeps for in-flight micro-batches (stash vs dsp vs petra), same
   staged reversible ResNet, J = 2 and 4, in-process.
2. Throughput on 2 gloo processes (one stage each, one thread each): petra on gradxform's engine vs
   GPipe and 1F1B in torch.distributed.pipelining vs backprop, same stages, same micro-batches; the
   pipeline efficiency of gradxform's engine is useful stage time / (J x wall time).
3. Test accuracy vs wall time on digits, from the same runs.

Writes docs/bench_pipeline.md and docs/bench_pipeline.png.

    python bench/bench_pipeline.py [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples' / 'resnet.py'}:digits_resnet34"


VIT = f"{ROOT / 'examples' / 'vit.py'}"


def kept_memory(stages: int, model: str = MODEL, micro_batches: int = 16, batch: int = 32) -> dict[str, list[int]]:
    from gradxform.compiler import compile
    from gradxform.runtime.data import digits
    from gradxform.runtime.engine import InProcess, run_schedule
    from gradxform.runtime.executor import StageExecutor
    from gradxform.runtime.losses import classification_loss
    from gradxform.runtime.schedules import make_schedule

    if model == MODEL:
        train, _ = digits()
        x, y = train.tensors
    else:  # the ViT example's 3x32x32 inputs, random labels: memory does not depend on the data
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(micro_batches * batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (micro_batches * batch,))
    out = {}
    for schedule in ("stash", "dsp", "petra"):
        torch.manual_seed(0)
        staged = compile(model, f"petra{{stages={stages}}}", check=False).module
        inverses = staged.inverses() if schedule == "petra" else {}
        sched = make_schedule(schedule)
        exs = {j: StageExecutor(j, stages, st, sched, torch.optim.SGD(st.parameters(), lr=0.01),
                                classification_loss, inverses.get(j)) for j, st in enumerate(staged.stages)}
        run_schedule(sched.ticks(stages, micro_batches), exs, InProcess(stages),
                     lambda mb: staged.first_inputs((x[mb * batch:(mb + 1) * batch],), {}),
                     lambda mb: y[mb * batch:(mb + 1) * batch])
        out[schedule] = [exs[j].stats.peak_kept_bytes for j in range(stages)]
        out[f"{schedule}_invertible"] = sorted(inverses)
    return out


def train_run(schedule: str, epochs: int, out: Path, nproc: int = 2) -> list[dict]:
    cmd = [sys.executable, "-m", "gradxform", "train", MODEL, "--pass", "petra{stages=2}", "--schedule", schedule,
           "--epochs", str(epochs), "--batch-size", "32", "--nproc", str(nproc),
           *(["--micro-batches", "4"] if schedule in ("gpipe", "1f1b") else []),
           "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    a = ap.parse_args()
    import tempfile

    memory = {(name, J): kept_memory(J, model) for name, model in (("ResNet-34", MODEL), ("ViT", VIT))
              for J in (2, 4)}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("backprop", "petra", "gpipe", "1f1b"):
            runs[schedule] = train_run(schedule, a.epochs, Path(tmp) / schedule)
            print(schedule, runs[schedule][-1]["test_accuracy"], flush=True)
    write(memory, runs, a)


def write(memory: dict, runs: dict, a: argparse.Namespace) -> None:
    kib = 1024
    lines = [
        "# Pipeline schedules: memory, throughput, accuracy",
        "",
        f"Measured {date.today()} on {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch "
        f"{torch.__version__} (`python bench/bench_pipeline.py`). Model: `examples/resnet.py:digits_resnet34` "
        "(ResNet-34, width 16, 8x8 digits) compiled with `petra{stages=J}`; micro-batches of 32.",
        "",
        "## 1. What each stage keeps for in-flight micro-batches",
        "",
        "Exact bytes (tensors held from one tick to the next, including a stash's weight copies), peak over "
        "16 micro-batches of 32, in-process. Goal: petra at least 50% below stash at J = 4. The ResNet's "
        "balanced stages each contain a block that cannot be inverted (the stem, or a strided projection "
        "block), so under petra they keep their input, exactly like dsp: petra's saving over stash there is "
        "the weight copies. In the ViT every block is reversible; its middle stages are pure reversible "
        "chains and keep nothing.",
        "",
        "| model | J | schedule | " + " | ".join(f"stage {j}" for j in range(4)) + " | total | vs stash | "
        "invertible stages |",
        "|---|---|---|" + "---|" * 4 + "---|---|---|",
    ]
    for (name, J), res in memory.items():
        stash_total = sum(res["stash"])
        for schedule in ("stash", "dsp", "petra"):
            cells = [f"{b / kib:.0f} KiB" for b in res[schedule]] + ["" for _ in range(4 - J)]
            total = sum(res[schedule])
            inv = (", ".join(map(str, res["petra_invertible"])) or "none") if schedule == "petra" else ""
            lines.append(f"| {name} | {J} | {schedule} | " + " | ".join(cells) + f" | {total / kib:.0f} KiB | "
                         f"{total / stash_total:.0%} | {inv} |")
    lines += [
        "",
        "## 2. Throughput on 2 gloo processes",
        "",
        "Same two stages, one process and one thread each. petra and backprop run on gradxform's engine "
        "(pipeline efficiency = useful stage time / (J x wall time), measured per stage); gpipe and 1f1b run "
        "in `torch.distributed.pipelining` with 4 micro-batches per step, whose bubble is (J-1)/(M+J-1) = 20%. "
        "Samples per second over the last epoch's training (evaluation excluded).",
        "",
        "| schedule | engine | samples/s | pipeline efficiency | final test accuracy |",
        "|---|---|---|---|---|",
    ]
    for schedule, hist in runs.items():
        last = hist[-1]
        engine = "torch.distributed.pipelining" if schedule in ("gpipe", "1f1b") else "gradxform"
        eff = "-"
        if engine == "gradxform":
            busy = sum(last["busy_seconds"].values()) if isinstance(last["busy_seconds"], dict) else 0
            eff = f"{busy / (2 * last['train_seconds']):.2f}"
        lines.append(f"| {schedule} | {engine} | {last['samples'] / last['train_seconds']:.0f} | {eff} | "
                     f"{last['test_accuracy']:.2%} |")
    lines += ["", "## 3. Accuracy against wall time (digits)", "", "![accuracy vs wall time](bench_pipeline.png)", ""]
    (ROOT / "docs" / "bench_pipeline.md").write_text("\n".join(lines))
    plot(runs)
    print("\n".join(lines))


def plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for schedule, hist in runs.items():
        ax.plot([h["wall_time"] for h in hist], [100 * h["test_accuracy"] for h in hist], marker="o", label=schedule)
    ax.set_xlabel("wall time (s), 2 processes")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, ResNet-34 (width 16), J = 2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_pipeline.png", dpi=110)


if __name__ == "__main__":
    main()
