"""Threads on a busy machine: the tour's commands with two threads against the number gradxform picks.

gradxform gives each process the cores that are free (cores minus the 1-minute load average, shared
among the processes it starts; ``OMP_NUM_THREADS`` wins when set). This benchmark makes the machine
busy on purpose -- one process spinning on a core, as another job would -- and times each command twice,
interleaved: with ``OMP_NUM_THREADS=2`` (PyTorch's default on 2 cores) and with gradxform's choice.

    python bench/bench_threads.py [--rounds 2]

Writes docs/bench_threads.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
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
DIGITS = f"{ROOT / 'examples' / 'resnet.py'}:digits_resnet"
COMMANDS = {
    "train dgl{stages=4}, 2 epochs": ["train", DIGITS, "--pass", "dgl{stages=4}", "--epochs", "2"],
    "train fwd-local{stages=2}, 1 epoch": ["train", DIGITS, "--pass", "fwd-local{stages=2}", "--epochs", "1"],
    "train petra{stages=2}, 2 epochs": ["train", DIGITS, "--pass", "petra{stages=2}", "--epochs", "2"],
    "compile petra{stages=4}": ["compile", DIGITS, "--pass", "petra{stages=4}", "--emit", "pt"],
}


def _spin() -> None:
    while True:
        pass


def timed(args: list[str], threads: str | None, out: Path) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    flag = ["-o", str(out)] if args[0] == "compile" else ["--out", str(out), "--no-progress"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradxform", *args, *flag], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    burner = multiprocessing.Process(target=_spin, daemon=True)
    burner.start()
    time.sleep(65)  # let the 1-minute load average see the busy core
    results = {name: {"2": [], "auto": []} for name in COMMANDS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.rounds):
                for name, args in COMMANDS.items():
                    for mode in ("2", "auto"):
                        out = Path(tmp) / f"{abs(hash(name))}-{mode}-{r}"
                        results[name][mode].append(timed(args, mode if mode != "auto" else None, out))
                    print(f"round {r + 1}: {name}: 2 threads {results[name]['2'][-1]:.1f}s, "
                          f"chosen {results[name]['auto'][-1]:.1f}s", flush=True)
            load = os.getloadavg()[0]
    finally:
        burner.terminate()
        burner.join()
    lines = ["# Threads on a busy machine", "",
             f"Measured {date.today()} on {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch "
             f"{torch.__version__} (`python bench/bench_threads.py --rounds {a.rounds}`). One process spins on a "
             f"core throughout (load average {load:.1f} at the end). Wall time of each command, including "
             f"start-up; medians of {a.rounds} interleaved runs. *chosen*: no OMP_NUM_THREADS, gradxform picks "
             "(it printed 1 thread per process here).", "",
             "| command | 2 threads | chosen | 2 threads / chosen |", "|---|---|---|---|"]
    for name, res in results.items():
        two, auto = statistics.median(res["2"]), statistics.median(res["auto"])
        lines.append(f"| `gradxform {name}` | {two:.1f} s | {auto:.1f} s | **{two / auto:.2f}x** |")
    (ROOT / "docs" / "bench_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
