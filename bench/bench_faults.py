"""Chaos: random kills of a 2-process PETRA run, each followed by --resume, against an uninterrupted run.

Each trial trains the digits ResNet (``petra{stages=2}``, 2 ranks, 3 epochs) and interrupts it once, at
random: SIGKILL of a rank at a random tick (``GRADXFORM_KILL_AT``), SIGKILL of a rank right after it
wrote its part of a checkpoint and before the commit, or SIGKILL / SIGTERM / SIGINT of the launcher
after a random delay. Then ``--resume`` (or, when no epoch was committed yet, a fresh ``--overwrite``
run) finishes it. A trial passes when the final metrics (every step loss, every test accuracy) and the
final weights are bit-identical to the uninterrupted run's, and no process of the job is left.

    python bench/bench_faults.py [--trials 20] [--seed 0]

Writes docs/bench_faults.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples' / 'resnet.py'}:digits_resnet"
EPOCHS = 3
KINDS = ("rank SIGKILL at a tick", "rank SIGKILL during the save", "launcher SIGKILL", "launcher SIGTERM",
         "launcher SIGINT")


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gradxform", "train", MODEL, "--pass", "petra{stages=2}", "--nproc", "2",
            "--epochs", str(EPOCHS), "--no-progress", "--out", str(out), *extra]


def run(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **(env or {})))


def leftovers(out: Path) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(out) in line and "ps -ww" not in line]


def final_state(out: Path) -> tuple[list, dict]:
    """(metrics, weights of every stage) of a finished run."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    folder = out / "checkpoints" / f"epoch-{EPOCHS:04d}"
    weights = {j: torch.load(folder / f"stage{j}.pt", weights_only=True)["module"] for j in range(2)}
    return [(r["epoch"], r["step_losses"], r["test_accuracy"]) for r in records], weights


def same(a: tuple, b: tuple) -> bool:
    (ma, wa), (mb, wb) = a, b
    return ma == mb and all(torch.equal(wa[j][k], wb[j][k]) for j in wa for k in wa[j])


def trial(rng: random.Random, reference: tuple, ticks: int, duration: float, tmp: Path, i: int) -> dict:
    out = tmp / f"trial{i}"
    kind = rng.choice(KINDS)
    detail = ""
    start = time.monotonic()
    if kind.startswith("rank"):
        stage = rng.randrange(2)
        if "save" in kind:
            epoch = rng.randrange(1, EPOCHS + 1)
            spec = f"{stage}:{epoch}:save"
        else:
            epoch = rng.randrange(EPOCHS)
            spec = f"{stage}:{epoch}:{rng.randrange(ticks)}"
        detail = f"GRADXFORM_KILL_AT={spec}"
        first = run(out, env={"GRADXFORM_KILL_AT": spec})
        code = first.returncode
    else:
        sig = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}[kind.split()[1]]
        delay = rng.uniform(0.2, 1.0) * duration
        detail = f"after {delay:.1f} s"
        proc = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        proc.communicate(timeout=300)
        code = proc.returncode
    stop = time.monotonic()
    deadline = time.monotonic() + 10
    while leftovers(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = leftovers(out)
    committed = sorted(p.parent.name for p in (out / "checkpoints").glob("epoch-*/COMMITTED.json"))
    resumed = run(out, "--resume") if committed else run(out, "--overwrite")
    ok = resumed.returncode == 0 and same(final_state(out), reference) and not left
    return {"trial": i, "kind": kind, "detail": detail, "exit": code, "stopped_s": stop - start,
            "committed": committed[-1] if committed else "none", "then": "--resume" if committed else "--overwrite",
            "identical": ok, "left": len(left), "error": "" if resumed.returncode == 0 else resumed.stderr[-300:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.monotonic()
        ref = run(tmp / "reference")
        if ref.returncode:
            raise SystemExit(ref.stderr)
        duration = time.monotonic() - start
        reference = final_state(tmp / "reference")
        ticks = len(reference[0][0][1]) + 2  # micro-batches per epoch + the pipeline's fill (J = 2)
        rows = []
        for i in range(args.trials):
            rows.append(trial(rng, reference, ticks, duration, tmp, i))
            r = rows[-1]
            print(f"trial {i}: {r['kind']} ({r['detail']}) exit {r['exit']}, committed {r['committed']}, "
                  f"{r['then']}: {'identical' if r['identical'] else 'DIFFERENT ' + r['error']}", flush=True)
    passed = sum(r["identical"] for r in rows)
    lines = [
        "# Faults: kills followed by --resume", "",
        f"Measured {date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"(`python bench/bench_faults.py --trials {args.trials} --seed {args.seed}`). Model: "
        f"`examples/resnet.py:digits_resnet` compiled with `petra{{stages=2}}`, 2 ranks over gloo, {EPOCHS} epochs; "
        f"the uninterrupted run took {duration:.0f} s.", "",
        f"**{passed} of {len(rows)} interrupted runs ended bit-identical to the uninterrupted one** (every step "
        "loss, every test accuracy, every weight of both stages), with no process of the job left 10 s after "
        "the interruption.", "",
        "| trial | interruption | when | exit code | job stopped after | last committed epoch | then | identical | "
        "processes left |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['kind']} | {r['detail']} | {r['exit']} | {r['stopped_s']:.1f} s | "
                     f"{r['committed']} | `{r['then']}` | {'yes' if r['identical'] else 'NO'} | {r['left']} |")
    (ROOT / "docs" / "bench_faults.md").write_text("\n".join(lines) + "\n")
    print(f"{passed}/{len(rows)} identical; wrote docs/bench_faults.md")


if __name__ == "__main__":
    main()
