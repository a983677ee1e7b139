"""Moonwalk: bytes held for backward and step time against backprop, reversible chains and naive forward mode.

Four measurements, all in one process, every method side by side:

1. A residual stack (leapfrog couplings over Linear-GELU-Linear blocks, a Linear head): peak bytes held
   for backward at depth 8..64 for backprop, the reversible chain, Moonwalk mixed / forward and naive.
2. Step time against depth for backprop, mixed, forward and naive (interleaved medians), on a small
   stack (all four) and a wide one (backprop and mixed, where the kernels outweigh the Python).
3. ResNets with down-sampling stages: the original model, the ``reversible`` pass and ``moonwalk``.
4. The cost model: backprop's forward and backward (full and input-only) and Moonwalk's three sweeps,
   timed on the same stack; mixed mode predicted as F0 + (F + B_in) + (F + B) against backprop's F + B.

Bytes are counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` from pack until autograd
frees them (:mod:`gradxform.autodiff.memory`), the backward's own recomputes included. Writes
docs/bench_moonwalk.md and docs/bench_moonwalk.png.

    python bench/bench_moonwalk.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradxform  # noqa: E402
from gradxform.autodiff.memory import held_bytes  # noqa: E402
from gradxform.nn.moonwalk import MoonwalkChain  # noqa: E402
from gradxform.nn.reversible import LeapfrogCoupling, ReversibleChain  # noqa: E402

METHODS = ("backprop", "reversible", "mixed", "forward", "naive")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x, *side):
        return self.f(x)


class Head(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.m = nn.Linear(width, 10)

    def forward(self, x, *side):
        return self.m(x)


def stack(depth: int, method: str, width: int) -> nn.Module:
    """The same residual stack for every method (same seed, same weights)."""
    torch.manual_seed(0)
    chain = ReversibleChain([Block(width) for _ in range(depth)], LeapfrogCoupling())
    head = Head(width)
    if method in ("backprop", "reversible"):
        chain.memory_saving = method == "reversible"
        return nn.Sequential(chain, head)
    return MoonwalkChain([chain, head], ["coupling", "linear"], specs=[{}, {"weight": "m.weight"}], mode=method)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.logsumexp(-1).mean()


def peak_bytes(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    """(bytes held right after the forward, peak held through forward and backward)."""
    module.zero_grad(set_to_none=True)
    with held_bytes(exclude=module) as counter:  # parameters are held anyway: count what backward adds
        out = module(*inputs)
        out = out["logits"] if isinstance(out, dict) else out
        kept = counter.live
        loss_of(out).backward()
    return kept, counter.peak


def step_time(module: nn.Module, x: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss_of(module(x)).backward()
    return time.perf_counter() - start


def interleaved(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median step time of each method, the methods taking turns (one warm-up round first)."""
    times: dict[str, list[float]] = {k: [] for k in modules}
    for r in range(repeats + 1):
        for k, m in modules.items():
            t = step_time(m, x)
            if r:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------- 1. memory vs depth


def memory_vs_depth(depths: list[int], batch: int, width: int) -> list[dict]:
    x = torch.randn(batch, width)
    rows = []
    for d in depths:
        row = {"depth": d}
        for method in METHODS:
            kept, peak = peak_bytes(stack(d, method, width), x)
            row[method] = peak
            row[method + "_kept"] = kept
        rows.append(row)
        print(f"memory depth {d}: " + ", ".join(f"{m} {row[m] / 2**10:.0f} KiB" for m in METHODS), flush=True)
    return rows


# ---------------------------------------------------------------------------------- 2. time vs depth


def time_vs_depth(depths: list[int], batch: int, width: int, methods: tuple, repeats: int,
                  naive_max: int) -> list[dict]:
    x = torch.randn(batch, width)
    rows = []
    for d in depths:
        chosen = [m for m in methods if m != "naive" or d <= naive_max]
        got = interleaved({m: stack(d, m, width) for m in chosen}, x, repeats if d <= 32 else max(2, repeats // 2))
        rows.append({"depth": d, **got})
        print(f"time depth {d} (batch {batch}, width {width}): " + ", ".join(f"{m} {t * 1e3:.1f} ms"
                                                                           for m, t in got.items()), flush=True)
    return rows


# ---------------------------------------------------------------------------------- 3. ResNets


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def resnets(quick: bool) -> list[dict]:
    resnet = _example("resnet")
    cases = [("digits ResNet-18 (8x8, width 16), batch 32", lambda: resnet.digits_resnet(), (32, 1, 8, 8), False),
             ("digits ResNet-18 (8x8, width 16), batch 2", lambda: resnet.digits_resnet(), (2, 1, 8, 8), True)]
    if not quick:
        cases += [("ResNet-18, CIFAR stem (32x32, width 16), batch 16",
                   lambda: resnet.resnet18(width=16), (16, 3, 32, 32), False),
                  ("ResNet-18, ImageNet stem (64x64, width 16), batch 8",
                   lambda: resnet.resnet18(width=16, stem="imagenet", image_size=64), (8, 3, 64, 64), False)]
    variants = [("backprop", "split{stages=1}"), ("reversible", "reversible"),
                ("mixed (anchors recomputed)", "moonwalk"), ("mixed (anchors stored)", "moonwalk{anchors=store}"),
                ("forward", "moonwalk{mode=forward}")]
    rows = []
    for name, build, shape, with_forward in cases:
        x = torch.randn(*shape)
        row = {"model": name}
        for label, pipeline in variants:
            if label == "forward" and not with_forward:
                continue
            torch.manual_seed(0)
            module = gradxform.compile(build(), pipeline, example_inputs=(x[:2],), check=False).train()
            kept, peak = peak_bytes(module, x)
            row[label] = peak
            row[label + " kept"] = kept
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {v / 2**10:.0f} KiB" for k, v in row.items() if k != "model"
                                      and not k.endswith("kept")), flush=True)
    return rows


# ---------------------------------------------------------------------------------- 4. the cost model


def cost_model(depth: int, batch: int, width: int, repeats: int) -> dict:
    """The stack's parts, timed in turns: backprop's forward (F0 without a graph, F with one), its backward
    (B, input and weights) and an input-only backward (B_in); Moonwalk's first forward, reverse sweep and
    forward sweep, timed inside the engine."""
    from gradxform.autodiff import moonwalk as engine

    x = torch.randn(batch, width)
    ref, mixed = stack(depth, "backprop", width), stack(depth, "mixed", width)
    phases: dict[str, list[float]] = {}
    originals = {}

    def timed(name: str):
        fn = originals[name] = getattr(engine.Engine, name)

        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            phases.setdefault(name, []).append(time.perf_counter() - start)
            return out

        setattr(engine.Engine, name, run)

    for name in ("first_forward", "reverse_sweep", "forward_sweep"):
        timed(name)
    parts: dict[str, list[float]] = {"F0": [], "F": [], "B": [], "B_in": [], "mixed": []}
    try:
        for r in range(repeats + 1):
            ref.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.no_grad():
                ref(x)
            t0 = time.perf_counter()
            loss = loss_of(ref(x))
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            xi = x.detach().requires_grad_(True)
            loss = loss_of(ref(xi))
            t3 = time.perf_counter()
            torch.autograd.grad(loss, [xi])
            t4 = time.perf_counter()
            mixed_t = step_time(mixed, x)
            if r:
                for k, v in (("F0", t0 - start), ("F", t1 - t0), ("B", t2 - t1), ("B_in", t4 - t3), ("mixed", mixed_t)):
                    parts[k].append(v)
    finally:
        for name, fn in originals.items():
            setattr(engine.Engine, name, fn)
    med = {k: statistics.median(v) for k, v in parts.items()}
    med.update({k: statistics.median(v[1:]) for k, v in phases.items()})
    med["backprop"] = med["F"] + med["B"]
    med["predicted"] = med["F0"] + (med["F"] + med["B_in"]) + (med["F"] + med["B"])
    med["depth"] = depth
    return med


# ---------------------------------------------------------------------------------- output


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {platform.machine()} CPU"


def fmt(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def write(mem: list[dict], small: list[dict], wide: list[dict], nets: list[dict], cost: dict, a,
          load_at_start: str) -> None:
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    at = {r["depth"]: r for r in mem}
    s_at = {r["depth"]: r for r in small}
    w_at = {r["depth"]: r for r in wide}
    d_lo, d_hi = min(at), max(at)
    lines = [
        "# Moonwalk: memory and time",
        "",
        f"Measured {date} on a {machine()}, torch {torch.__version__}, one thread "
        f"(`python bench/bench_moonwalk.py{' --quick' if a.quick else ''}`). Every number is from this run "
        "(raw values in bench_moonwalk.json); methods were measured side by side in one process.",
        "",
        "*Held for backward*: bytes of every tensor autograd saves, counted with `saved_tensors_hooks` from "
        "pack until autograd frees it, through the forward **and** the backward (a chain's own recomputes, "
        "Moonwalk's fragments and anchors included), one storage counted once; the peak is the most held at "
        "one time. The model's own parameters and buffers, which layers save for their backward but which "
        f"exist anyway, are left out. Load average during the run: {load_at_start} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (the machine is shared; step times are medians of interleaved "
        "steps, so the methods saw the same load).",
        "",
        f"## 1. A residual stack: peak held bytes against depth (batch {a.batch}, width {a.width})",
        "",
        "Leapfrog couplings over Linear-GELU-Linear blocks and a Linear head; *backprop* is the same "
        "architecture under ordinary autograd, *reversible* the `ReversibleChain` backward (§1).",
        "",
        "| depth | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for d, r in at.items():
        lines.append(f"| {d} | " + " | ".join(fmt(r[m]) for m in METHODS) + " |")
    mixed_flat = at[d_hi]["mixed"] / at[d_lo]["mixed"]
    fwd_flat = at[d_hi]["forward"] / at[d_lo]["forward"]
    d32 = 32 if 32 in at else d_hi
    lines += [
        "",
        f"Depth {d_hi} against depth {d_lo}: mixed {mixed_flat:.2f}x, forward {fwd_flat:.2f}x (goal: at most "
        f"1.2x). At depth {d32}: backprop holds {at[d32]['backprop'] / at[d32]['mixed']:.1f}x what mixed "
        f"holds (goal: at least 4x). After the forward, mixed keeps {fmt(at[d32]['mixed_kept'])} (the chain's "
        f"input and the last chain state, its anchor) against backprop's {fmt(at[d32]['backprop_kept'])}.",
        "",
        "## 2. Step time against depth",
        "",
        f"Small stack (batch {a.batch}, width {a.small_width}): all four methods, median of {a.repeats} "
        "interleaved steps (one warm-up round).",
        "",
        "| depth | backprop | mixed | forward | naive | mixed / backprop | naive / mixed |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, r in s_at.items():
        naive = r.get("naive")
        lines.append(f"| {d} | {r['backprop'] * 1e3:.1f} ms | {r['mixed'] * 1e3:.1f} ms | {r['forward'] * 1e3:.1f} ms | "
                     + (f"{naive * 1e3:.0f} ms" if naive else "not run") + f" | {r['mixed'] / r['backprop']:.2f}x | "
                     + (f"{naive / r['mixed']:.0f}x" if naive else "-") + " |")
    lines += [
        "",
        f"Wide stack (batch {a.wide_batch}, width {a.wide_width}), where the kernels outweigh the Python: "
        "backprop and mixed.",
        "",
        "| depth | backprop | mixed | mixed / backprop |",
        "|---|---|---|---|",
    ]
    for d, r in w_at.items():
        lines.append(f"| {d} | {r['backprop'] * 1e3:.0f} ms | {r['mixed'] * 1e3:.0f} ms | {r['mixed'] / r['backprop']:.2f}x |")
    s16 = s_at.get(16, {})
    lines += [
        "",
        f"At depth 32, mixed takes {w_at[32]['mixed'] / w_at[32]['backprop']:.2f}x backprop's step on the wide "
        f"stack and {s_at[32]['mixed'] / s_at[32]['backprop']:.2f}x on the small one (goal: at most 2x). "
        + (f"At depth 16 naive forward mode takes {s16['naive'] / s16['mixed']:.0f}x mixed's step (goal: at "
           f"least 20x); the gap grows with depth: "
           + ", ".join(f"{s_at[d]['naive'] / s_at[d]['mixed']:.0f}x at {d}" for d in s_at if s_at[d].get("naive"))
           + "." if s16.get("naive") else ""),
        "",
        "## 3. ResNets with down-sampling stages: peak held bytes",
        "",
        "*backprop* is the traced original model, *reversible* the `reversible` pass (couplings; the stem, "
        "every strided/projection block and the head keep their inputs), then `moonwalk` in mixed mode with "
        "anchors recomputed (default) or stored, and (on the smallest case only, its JVPs being many) forward mode.",
        "",
    ]
    labels = [k for k in nets[0] if k != "model" and not k.endswith("kept")]
    labels += [k for r in nets for k in r if k not in labels and k != "model" and not k.endswith("kept")]
    lines += ["| model | " + " | ".join(labels) + " | mixed / reversible | kept after the forward: reversible, "
              "mixed |", "|---|" + "---|" * (len(labels) + 2)]
    for r in nets:
        lines.append(f"| {r['model']} | " + " | ".join(fmt(r[k]) if k in r else "-" for k in labels)
                     + f" | {r['mixed (anchors recomputed)'] / r['reversible']:.2f}x | {fmt(r['reversible kept'])}, "
                       f"{fmt(r['mixed (anchors recomputed) kept'])} |")
    lines += [
        "",
        "Goal: mixed at most 0.5x the reversible pass. After the forward Moonwalk keeps almost nothing (the "
        "chain's input, BatchNorm's batch statistics, the last coupling's state); the peak comes during the "
        "backward. There, both methods hold the graph of the one residual block being recomputed (five "
        "activations of a stage-1 conv-BN-ReLU-conv-BN-ReLU block), and on top of it the reversible pass "
        "holds the stem's activations and the states of the chains below, Moonwalk the fragments of the "
        "pieces above: the whole cotangent of each projection block (a block, not a chain), the second "
        "stream's cotangent where each coupling starts, and at the bottom the stem convolution's whole "
        "cotangent (it raises the dimension), 2 scalars per channel per BatchNorm and the ReLU's masked "
        "entries. The block graph is common to both and is the larger part, so the ratio stays near 0.8.",
        "",
        f"## 4. The cost model (wide stack, depth {cost['depth']}, medians of {a.repeats} interleaved steps)",
        "",
        "Counted a block at a time, mixed mode runs the first forward (F0, no graph), the reverse sweep (a "
        "recompute of f for the inverse and a VJP for the input cotangent only: F + B_in) and the forward "
        "sweep (a recompute and the full VJP: F + B): 3 forwards + 2 backwards against backprop's F + B. "
        "Counting products, B_in = F and B = 2F for a Linear (the full backward is two products, the input "
        "cotangent one), so 6F against 3F: **2x is the floor of mixed mode, not a margin under it**. "
        "Below, every part timed on the same stack, in turns:",
        "",
        "| backprop: F0 (no graph) | F | B | B_in (input only) | F + B | predicted mixed F0 + (F + B_in) + (F + B) "
        "| measured mixed | its first forward | reverse sweep | forward sweep |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {cost['F0'] * 1e3:.0f} ms | {cost['F'] * 1e3:.0f} ms | {cost['B'] * 1e3:.0f} ms | {cost['B_in'] * 1e3:.0f} ms | "
        f"{cost['backprop'] * 1e3:.0f} ms | {cost['predicted'] * 1e3:.0f} ms ({cost['predicted'] / cost['backprop']:.2f}x) | "
        f"{cost['mixed'] * 1e3:.0f} ms ({cost['mixed'] / cost['backprop']:.2f}x) | {cost['first_forward'] * 1e3:.0f} ms | "
        f"{cost['reverse_sweep'] * 1e3:.0f} ms | {cost['forward_sweep'] * 1e3:.0f} ms |",
        "",
        f"Measured B / F = {cost['B'] / cost['F']:.2f} and B_in / F = {cost['B_in'] / cost['F']:.2f} (the count says 2 "
        "and 1). The prediction from backprop's own parts and the measured mixed step differ by the per-block "
        "bookkeeping: two autograd calls per block where backprop makes one for the whole stack.",
        "",
        "![held bytes and step time](bench_moonwalk.png)",
        "",
    ]
    (ROOT / "docs" / "bench_moonwalk.md").write_text("\n".join(lines))
    raw = {"memory": mem, "time_small": small, "time_wide": wide, "resnets": nets, "cost": cost}
    (ROOT / "docs" / "bench_moonwalk.json").write_text(json.dumps(raw, indent=1))
    plot(mem, small, wide, nets)
    print("\n".join(lines))


def plot(mem: list[dict], small: list[dict], wide: list[dict], nets: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    for m, style in zip(METHODS, ("-o", "-s", "-^", "--D", ":x")):
        ax.plot([r["depth"] for r in mem], [r[m] / 2**20 for r in mem], style, label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth (coupling blocks)")
    ax.set_ylabel("peak held for backward (MiB)")
    ax.set_title("residual stack: memory")
    ax.legend()
    ax = axes[0][1]
    for m in ("backprop", "mixed", "forward", "naive"):
        pts = [(r["depth"], r[m]) for r in small if r.get(m)]
        ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth")
    ax.set_ylabel("step time (ms)")
    ax.set_title("residual stack: time (small)")
    ax.legend()
    ax = axes[1][0]
    labels = []
    for r in nets:
        labels += [k for k in r if k != "model" and not k.endswith("kept") and k not in labels]
    width = 0.8 / len(labels)
    for j, k in enumerate(labels):
        ax.bar([i + j * width for i in range(len(nets))], [r.get(k, 0) / 2**20 for r in nets], width, label=k)
    short = [r["model"].replace("ResNet-18, ", "").replace(" ResNet-18", "").split(" (")[0] + "\n"
             + r["model"].split(", ")[-1] for r in nets]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(nets))], short, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("peak held for backward (MiB)")
    ax.set_title("ResNets with down-sampling")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot([r["depth"] for r in wide], [r["mixed"] / r["backprop"] for r in wide], marker="o", label="wide stack")
    ax.plot([r["depth"] for r in small], [r["mixed"] / r["backprop"] for r in small], marker="o", label="small stack")
    ax.axhline(2.0, color="grey", linestyle="--", label="goal / cost model: 2x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth")
    ax.set_ylabel("mixed step / backprop step")
    ax.set_title("mixed mode against backprop")
    ax.legend()
    fig.suptitle("Moonwalk (CPU)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_moonwalk.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer depths and models")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=64, help="memory stack width")
    ap.add_argument("--small-width", type=int, default=64)
    ap.add_argument("--wide-batch", type=int, default=64)
    ap.add_argument("--wide-width", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(1)
    load_at_start = f"{os.getloadavg()[0]:.1f}"
    depths = [8, 16, 32] if a.quick else [8, 16, 32, 64]
    mem = memory_vs_depth(depths, a.batch, a.width)
    small = time_vs_depth([4] + depths, a.batch, a.small_width, ("backprop", "mixed", "forward", "naive"),
                          a.repeats, naive_max=32 if a.quick else 64)
    wide = time_vs_depth(depths, a.wide_batch, a.wide_width, ("backprop", "mixed"), a.repeats, naive_max=0)
    nets = resnets(a.quick)
    cost = cost_model(32, a.wide_batch, a.wide_width, a.repeats)
    write(mem, small, wide, nets, cost, a, load_at_start)


if __name__ == "__main__":
    main()
