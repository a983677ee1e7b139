"""Reversible vs original: exact bytes saved for backward, step time, peak resident memory.

ResNet-18/34/50/101 (CIFAR stem, 32x32, batch 64) and pre-LN transformers (the ViT example, 12/24/48
layers, batch 64). Each (model, variant) runs in its own process so peak RSS is its own. Saved bytes
are counted exactly with torch.autograd.graph.saved_tensors_hooks. Writes docs/bench_reversible.md
and docs/bench_reversible.png.

    python bench/bench_reversible.py [--steps 2] [--batch 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "ResNet-18": ("resnet", "resnet18"),
    "ResNet-34": ("resnet", "resnet34"),
    "ResNet-50": ("resnet", "resnet50"),
    "ResNet-101": ("resnet", "resnet101"),
    "pre-LN transformer, 12 layers": ("vit", 12),
    "pre-LN transformer, 24 layers": ("vit", 24),
    "pre-LN transformer, 48 layers": ("vit", 48),
}


def build(kind: str, arg):
    sys.path.insert(0, str(ROOT / "examples"))
    import torch

    if kind == "resnet":
        import resnet

        return getattr(resnet, arg)(), (3, 32, 32)
    import vit

    torch.manual_seed(0)
    return vit.ViT(depth=int(arg), dim=128, heads=4), (3, 32, 32)


def worker(name: str, variant: str, batch: int, steps: int) -> None:
    import torch

    import gradxform

    torch.manual_seed(0)
    model, shape = build(*MODELS[name])
    x = torch.randn(batch, *shape)
    # Both variants go through gradxform (the same graph machinery and imports), so RSS compares fairly.
    if variant == "reversible":
        model = gradxform.compile(model, "reversible", example_inputs=(x[:4],), check=False)
    else:
        model = gradxform.trace(model, (x[:4],))
    model.train()

    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return None  # counting only: this forward is never differentiated

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and caches
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(x).logsumexp(1).mean().backward()
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"saved": saved, "step": statistics.median(times[1:]), "rss": rss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="ResNet-18 and the 12-layer transformer only")
    ap.add_argument("--worker", nargs=2)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], a.batch, a.steps)
        return
    names = ["ResNet-18", "pre-LN transformer, 12 layers"] if a.quick else list(MODELS)
    rows = []
    for name in names:
        got = {}
        for variant in ("original", "reversible"):
            out = subprocess.run([sys.executable, __file__, "--worker", name, variant, "--batch", str(a.batch),
                                  "--steps", str(a.steps)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{name} {variant} failed:\n{out.stderr[-2000:]}")
            got[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        o, r = got["original"], got["reversible"]
        rows.append({"model": name, **{f"{k}_{v}": got[v][k] for v in got for k in ("saved", "step", "rss")}})
        print(f"{name}: saved {o['saved'] / 2**20:.0f} -> {r['saved'] / 2**20:.0f} MiB "
              f"({o['saved'] / r['saved']:.2f}x), step {o['step']:.2f} -> {r['step']:.2f} s "
              f"({r['step'] / o['step']:.2f}x), peak RSS {o['rss'] / 2**30:.2f} -> {r['rss'] / 2**30:.2f} GiB",
              flush=True)
    write(rows, a)


def write(rows: list[dict], a: argparse.Namespace) -> None:
    mib, gib = 2**20, 2**30
    lines = [
        "# Reversible chains: memory and time",
        "",
        f"Measured {date.today()} on {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPU "
        f"cores, torch {__import__('torch').__version__}, batch {a.batch}, 32x32 inputs, median of {a.steps} "
        "training steps after one warm-up (`python bench/bench_reversible.py`). ResNets use the CIFAR stem; "
        "the transformers are the ViT example (pre-LN, width 128, 4 heads, 65 tokens).",
        "",
        "Goal: at ResNet-101 depth and at 48 transformer layers, at least 4x fewer bytes saved for backward, "
        "with a step time at most 1.5x the original.",
        "",
        "| model | saved for backward: original | reversible | ratio | step time: original | reversible | ratio "
        "| peak RSS: original | reversible |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['saved_original'] / mib:.0f} MiB | {r['saved_reversible'] / mib:.0f} MiB | "
            f"{r['saved_original'] / r['saved_reversible']:.2f}x fewer | {r['step_original']:.2f} s | "
            f"{r['step_reversible']:.2f} s | {r['step_reversible'] / r['step_original']:.2f}x | "
            f"{r['rss_original'] / gib:.2f} GiB | {r['rss_reversible'] / gib:.2f} GiB |")
    lines += [
        "",
        "*Saved for backward*: exact bytes of every tensor autograd keeps for the backward pass of one "
        "forward (counted with `saved_tensors_hooks`). What stays in a reversible ResNet is what cannot be "
        "inverted: the stem, the first block of each stage (a strided projection skip), and the head. "
        "*Peak RSS*: the whole process, parameters and allocator included.",
        "",
        "![saved bytes and step time](bench_reversible.png)",
        "",
    ]
    (ROOT / "docs" / "bench_reversible.md").write_text("\n".join(lines))
    plot(rows)
    print("\n".join(lines))


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"].replace("pre-LN transformer, ", "TF-").replace(" layers", "") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [r["saved_original"] / 2**20 for r in rows], 0.4, label="original")
    left.bar([x + 0.2 for x in xs], [r["saved_reversible"] / 2**20 for r in rows], 0.4, label="reversible")
    left.set_yscale("log")
    left.set_ylabel("bytes saved for backward (MiB, log)")
    left.set_xticks(list(xs), names, rotation=30, ha="right")
    left.legend()
    right.bar(list(xs), [r["step_reversible"] / r["step_original"] for r in rows], color="tab:orange")
    right.axhline(1.5, color="grey", linestyle="--", label="goal: at most 1.5x")
    right.set_ylabel("step time, reversible / original")
    right.set_xticks(list(xs), names, rotation=30, ha="right")
    right.legend()
    fig.suptitle("Reversible chains, batch 64, 32x32 inputs (CPU)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_reversible.png", dpi=110)


if __name__ == "__main__":
    main()
