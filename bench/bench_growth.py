"""Growing networks (TINY) on digits: grown vs full width vs start size vs the grown shape from scratch.

For each model (the digits MLP of examples/mlp.py and the digits ResNet-18 of examples/resnet.py) and
each seed, four runs side by side, same data order, epochs, optimizer and cosine learning rate:

- full:   the model as written, trained from scratch;
- small:  ``grow{width=0.125}`` (every growable pair at 1/8 of its hidden width), trained as long;
- grown:  the small model, with a growth step (``gradxform.nn.growth.GrowthStep``) every few epochs
          until a budget of 50% of the full model's parameters;
- fixed:  ``grow{width=...}`` at the grown run's final widths, trained from scratch.

Training FLOPs are torch's flop counter (``torch.utils.flop_counter``): each training step's
forward + backward (counted once per parameter-shape and batch size, then multiplied by the steps
taken at that shape), plus every growth step counted whole (statistics pass, the products of the
statistics, line search). The counter counts matrix products and convolutions, not element-wise
ops or the optimizer's update, and not eigh/svd/solve (bounded here by the d^3 of the largest
layer: reported apart). Time is wall time of training and growth (evaluation excluded); the growth
steps run under the counter, so their time includes its overhead. Writes docs/bench_growth.md and
docs/bench_growth.png.

    python bench/bench_growth.py [--seeds 3] [--models mlp,resnet]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradxform.compiler import compile_loaded  # noqa: E402
from gradxform.frontend.loader import load  # noqa: E402
from gradxform.ir.growth import growable_pairs  # noqa: E402
from gradxform.nn.growth import GrowthConfig, GrowthStep  # noqa: E402
from gradxform.runtime.data import digits  # noqa: E402

# model: (spec, input shape, epochs, grow every, new neurons per pair per step as a fraction of its full
# width, learning rate, samples in the statistical batch (None: the whole training set but the held-out batch))
MODELS = {
    "mlp": ("mlp.py", ["x:[16,64]"], 30, 2, 0.125, 0.05, None),
    "resnet": ("resnet.py:digits_resnet", ["x:[16,1,8,8]"], 15, 2, 0.125, 0.05, 512),
}
BUDGET = 0.5            # of the full model's parameters
START = 0.125           # starting width: 1/8 of every growable pair


class FlopMeter:
    """Training FLOPs by torch's counter: a step is counted the first time its shapes are seen."""

    def __init__(self) -> None:
        self.total = 0.0
        self.decompositions = 0.0
        self.cache: dict[tuple, float] = {}

    def step(self, gm: torch.nn.Module, batch: int, run) -> None:
        key = (batch, tuple(tuple(p.shape) for p in gm.parameters()))
        if key not in self.cache:
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            self.cache[key] = float(counter.get_total_flops())
        else:
            run()
        self.total += self.cache[key]

    def growth(self, gm, optimizer, cfg, batches, held_out) -> None:
        """Count a growth step on a copy (untimed): the step itself then runs without the counter's
        overhead. The step is deterministic, so the copy does exactly what the real step will."""
        twin_gm, twin_opt = copy.deepcopy((gm, optimizer))
        counter = FlopCounterMode(display=False)
        with counter:
            report = GrowthStep(twin_gm, twin_opt, cfg)(batches, held_out)
        self.total += float(counter.get_total_flops())
        # eigh, SVD and solve have no formula in the counter: textbook operation counts (estimates)
        self.decompositions += sum(9 * g["d"] ** 3 + 12 * g["d"] * g["m"] * min(g["d"], g["m"]) + g["dB"] ** 3
                                   for g in report.gains.values())
        return report


def build(name: str, width: str | None, seed: int):
    spec, shapes, *_ = MODELS[name]
    torch.manual_seed(seed)
    loaded = load(str(ROOT / "examples" / spec), shapes)
    pipeline = f"grow{{width={width},seed={seed}}}" if width is not None else "grow{width=1.0}"
    return compile_loaded(loaded, pipeline, check=False).module


def accuracy(gm, x, y) -> float:
    was = gm.training
    gm.eval()
    with torch.no_grad():
        out = torch.cat([gm(x[i:i + 512]) for i in range(0, len(x), 512)])
    gm.train(was)
    return float((out.argmax(1) == y).float().mean())


def train(name: str, gm, seed: int, data, grow: GrowthConfig | None = None) -> dict:
    _, _, epochs, _, _, lr, _ = MODELS[name]
    (x, y), (xt, yt) = data
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    step = GrowthStep(gm, optimizer, grow) if grow is not None else None
    meter, gen = FlopMeter(), torch.Generator().manual_seed(seed)
    seconds, history = 0.0, []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]

            def run() -> None:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(gm(x[idx]), y[idx]).backward()

            meter.step(gm, len(idx), run)
            optimizer.step()
        schedule.step()
        report = None
        seconds += time.perf_counter() - start
        if step is not None and step.due(epoch):
            # statistical batch: the training set in machine batches of 256, a fresh held-out batch each time
            order = torch.randperm(len(x), generator=gen)
            batches = [(x[order[i:i + 256]], y[order[i:i + 256]]) for i in range(0, len(x), 256)]
            twin = meter.growth(gm, optimizer, grow, batches[:-1], batches[-1:])
            start = time.perf_counter()
            report = step(batches[:-1], batches[-1:], epoch=epoch)
            seconds += time.perf_counter() - start
            if (twin.grown, twin.gamma, twin.pairs) != (report.grown, report.gamma, report.pairs):
                raise RuntimeError(f"the counted copy grew differently from the model at epoch {epoch}")
        history.append({"epoch": epoch, "accuracy": accuracy(gm, xt, yt),
                        "params": sum(p.numel() for p in gm.parameters()), "flops": meter.total,
                        "seconds": seconds, "grown": bool(report and report.grown)})
    widths = [p.hidden(gm) for p in growable_pairs(gm)[0]]
    return {"history": history, "accuracy": history[-1]["accuracy"], "params": history[-1]["params"],
            "flops": meter.total, "seconds": seconds, "widths": widths, "steps": step.log if step else [],
            "decompositions": meter.decompositions}


def data_for(name: str):
    train_set, test_set = digits(flat=name == "mlp")
    return train_set.tensors, test_set.tensors


def bench(name: str, seeds: int) -> dict:
    data = data_for(name)
    _, _, epochs, every, neurons, _, samples = MODELS[name]
    runs: dict[str, list[dict]] = {"full": [], "small": [], "grown": [], "fixed": []}
    for seed in range(seeds):
        full = build(name, None, seed)
        limit = BUDGET * sum(p.numel() for p in full.parameters())
        runs["full"].append(train(name, full, seed, data))
        runs["small"].append(train(name, build(name, str(START), seed), seed, data))
        cfg = GrowthConfig(every=every, neurons=neurons, strategy="all", limit=limit, samples=samples)
        grown = train(name, build(name, str(START), seed), seed, data, cfg)
        runs["grown"].append(grown)
        fixed_width = ",".join(str(w) for w in grown["widths"])
        runs["fixed"].append(train(name, build(name, fixed_width, seed), seed, data))
        for k, v in runs.items():
            r = v[-1]
            print(f"{name} seed {seed} {k:5s} acc {r['accuracy']:.4f} params {r['params']} "
                  f"flops {r['flops']:.3g} time {r['seconds']:.1f}s widths {r['widths']}", flush=True)
    return {"runs": runs, "epochs": epochs, "every": every, "neurons": neurons, "samples": samples}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write(results: dict[str, dict], seeds: int) -> None:
    lines = [
        "# Growing networks (TINY): grown vs full width on digits",
        "",
        f"Measured {date.today()} on {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch "
        f"{torch.__version__}, one thread (`python bench/bench_growth.py`), {seeds} seeds, every variant of a seed run "
        "one after the other with the same data order. SGD (momentum 0.9, Nesterov), cosine learning rate, "
        "batch 64. *small* is `grow{width=0.125}`; *grown* starts there and takes a growth step "
        "(`GrowthStep`, strategy `all`: every growable pair, the closed-form best update and new neurons, "
        "line search on a held-out batch of 256) every few epochs until 50% of the full model's "
        "parameters; *fixed* is the grown run's final widths trained from scratch. Training FLOPs: torch's "
        "flop counter (matrix products and convolutions) over every forward + backward and over every "
        "growth step whole (statistics, their products, line search; counted on an untimed copy of the model "
        "and optimizer, so that the timed step runs without the counter); eigh/SVD/solve are not counted "
        "(estimated below each table). Time: training and growth, evaluation excluded, median over seeds. "
        "Accuracy: mean ± std over seeds.",
        "",
        "Goals (issue 15): grown within 1 point of full, at least 3 points above small, no worse than fixed, "
        "training FLOPs at most 0.6x full's; the check table under each model gives the per-seed differences.",
        "",
    ]
    for name, res in results.items():
        runs = res["runs"]
        full_flops = statistics.mean(r["flops"] for r in runs["full"])
        stat = f"{res['samples']} samples" if res["samples"] else "the training set less the held-out batch"
        lines += [f"## {name} ({res['epochs']} epochs; growth every {res['every']} epochs, at most "
                  f"{res['neurons']:g} of a pair's full width per step, statistics over {stat})", "",
                  "| variant | test accuracy | parameters (final) | training FLOPs | vs full | time |",
                  "|---|---|---|---|---|---|"]
        for variant in ("full", "small", "grown", "fixed"):
            rs = runs[variant]
            acc, sd = _mean_std([r["accuracy"] for r in rs])
            params = statistics.mean(r["params"] for r in rs)
            flops = statistics.mean(r["flops"] for r in rs)
            secs = statistics.median(r["seconds"] for r in rs)
            lines.append(f"| {variant} | {100 * acc:.2f}% ± {100 * sd:.2f} | {params / 1e3:.1f}k | "
                         f"{flops / 1e9:.2f}G | {flops / full_flops:.2f}x | {secs:.1f} s |")
        widths = "; ".join(str(r["widths"]) for r in runs["grown"])
        steps = [sum(s["grown"] for s in r["steps"]) for r in runs["grown"]]
        decomp = statistics.mean(r["decompositions"] for r in runs["grown"])
        g = [r["accuracy"] for r in runs["grown"]]
        lines += ["", f"Grown widths per seed: {widths}; growth steps that grew: {steps}. "
                      f"Decompositions, not in the count: about {decomp / 1e9:.2f}G FLOPs per grown run "
                      "(estimated from textbook operation counts: 9d³ for the eigh of S₋₂, 12 d m min(d, m) "
                      "for the SVD of S₋₂^-1/2 N, dB³ for the solve, per pair and step).", "",
                  "| check | per seed (grown − other, accuracy points) |", "|---|---|"]
        for other in ("full", "small", "fixed"):
            diffs = [100 * (a - r["accuracy"]) for a, r in zip(g, runs[other])]
            lines.append(f"| grown − {other} | {', '.join(f'{d:+.2f}' for d in diffs)} |")
        lines.append("")
    lines += ["![accuracy and parameters per epoch](bench_growth.png)", ""]
    (ROOT / "docs" / "bench_growth.md").write_text("\n".join(lines))
    plot(results)
    print("\n".join(lines))


def plot(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.2 * len(results), 6.4), squeeze=False)
    colours = {"full": "tab:blue", "small": "tab:orange", "grown": "tab:green", "fixed": "tab:gray"}
    for j, (name, res) in enumerate(results.items()):
        for variant, rs in res["runs"].items():
            epochs = [h["epoch"] for h in rs[0]["history"]]
            acc = [statistics.mean(r["history"][i]["accuracy"] for r in rs) for i in range(len(epochs))]
            params = [statistics.mean(r["history"][i]["params"] for r in rs) for i in range(len(epochs))]
            style = "--" if variant == "fixed" else "-"
            axes[0][j].plot(epochs, [100 * a for a in acc], style, color=colours[variant], label=variant)
            axes[1][j].plot(epochs, [p / 1e3 for p in params], style, color=colours[variant], label=variant)
        axes[0][j].set_title(f"digits {name}")
        axes[0][j].set_ylabel("test accuracy (%)")
        axes[0][j].set_ylim(bottom=max(0, axes[0][j].get_ylim()[0]))
        axes[1][j].set_ylabel("parameters (thousands)")
        axes[1][j].set_xlabel("epoch")
        axes[1][j].set_yscale("log")
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "bench_growth.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", default="mlp,resnet")
    args = parser.parse_args()
    # one thread: on this shared machine two threads made the small models slower than the full one
    # (waiting at every barrier of tiny products), which would measure the machine, not the method
    torch.set_num_threads(1)
    results = {name: bench(name, args.seeds) for name in args.models.split(",")}
    write(results, args.seeds)


if __name__ == "__main__":
    main()
