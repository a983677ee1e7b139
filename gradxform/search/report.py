"""What a search leaves in ``--out``: every trial (CSV and JSON), the Pareto front (a text table and
a PNG), and the best trial with the command that re-runs it.

The front is computed here from the completed trials, not taken from Optuna: a trial told the values
of an identical earlier one (``same_as``) is left out, so no configuration is listed twice. The *best*
trial is the front's best on the first objective of ``--objectives``, ties broken by the next ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from .objectives import OBJECTIVES, better_or_equal

COLUMNS = ("number", "state", "method", "acc", "mem", "mem_total", "throughput", "epochs_run", "seconds",
           "pipeline", "schedule", "train", "schedule_options", "params", "pruned", "error", "same_as", "command")


def dominates(a: dict, b: dict, objectives: Sequence[str]) -> bool:
    """``a`` is no worse than ``b`` on every objective and better on one."""
    return (all(better_or_equal(o, a[o], b[o]) for o in objectives)
            and any(a[o] != b[o] for o in objectives))


def completed(rows: list[dict], objectives: Sequence[str]) -> list[dict]:
    return [r for r in rows if r["state"] == "complete" and r["same_as"] is None
            and all(r[o] is not None for o in objectives)]


def front(rows: list[dict], objectives: Sequence[str]) -> list[dict]:
    """The non-dominated completed trials, best first on the first objective."""
    done = completed(rows, objectives)
    out = [r for r in done if not any(dominates(o, r, objectives) for o in done)]
    return sorted(out, key=lambda r: _rank_key(r, objectives))


def _rank_key(r: dict, objectives: Sequence[str]) -> tuple:
    return tuple(-r[o] if OBJECTIVES[o].direction == "maximize" else r[o] for o in objectives) + (r["number"],)


def best(rows: list[dict], objectives: Sequence[str]) -> dict | None:
    f = front(rows, objectives)
    return f[0] if f else None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "acc":
        return f"{value:.2%}"
    if key in ("mem", "mem_total"):
        return human_bytes(value)
    if key == "throughput":
        return f"{value:,.0f}/s"
    return str(value)


def settings(r: dict) -> str:
    """A trial's searched and fixed settings beyond its pipeline, as pipeline text."""
    parts = []
    if r["train"]:
        parts.append("train{" + ",".join(f"{k}={v}" for k, v in r["train"].items()) + "}")
    if r["schedule"]:
        parts.append(r["schedule"])
    return " ".join(parts)


MEASURES = (("acc", "accuracy"), ("mem", "mem/stage"), ("throughput", "samples/s"))


def table(rows: list[dict], objectives: Sequence[str], title: str = "") -> str:
    """Rows as an aligned text table: number, method, the measures (* an objective), the configuration."""
    heads = ["#", "method", *[h + ("*" if o in objectives else "") for o, h in MEASURES], "pipeline",
             "schedule, train"]
    body = [[str(r["number"]), r["method"], *[fmt(o, r[o]) for o, _ in MEASURES], r["pipeline"] or "(default)",
             settings(r)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join(([title] if title else []) + [line(heads), line(["-" * w for w in widths])]
                     + [line(b) for b in body])


def summary(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    same = sum(1 for r in rows if r["same_as"] is not None)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + (f" ({same} a repeat of an earlier trial)"
                                                                       if same else "")


def write(rows: list[dict], objectives: Sequence[str], out: Path, header: dict[str, Any]) -> dict | None:
    """``trials.csv``, ``trials.json``, ``pareto.txt``, ``pareto.png``, ``best.json``; returns the best row."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([json.dumps(r[c]) if isinstance(r[c], (dict, list)) else "" if r[c] is None else r[c]
                        for c in COLUMNS])
    (out / "trials.json").write_text(json.dumps({**header, "trials": rows}, indent=1, default=str) + "\n")
    f = front(rows, objectives)
    top = f[0] if f else None
    text = table(f, objectives, f"Pareto front over {', '.join(objectives)} ({len(f)} of {len(rows)} trials; "
                                f"* an objective)")
    if top is not None:
        text += f"\n\nbest (first on {objectives[0]}): trial {top['number']}, {top['method']}\n  {top['command']}"
    (out / "pareto.txt").write_text(text + "\n")
    if top is not None:
        (out / "best.json").write_text(json.dumps(
            {k: top[k] for k in ("number", "method", "pipeline", "schedule", "train", "schedule_options", "params",
                                 "acc", "mem", "mem_total", "throughput", "command")}, indent=1) + "\n")
    plot(rows, f, objectives, out / "pareto.png")
    return top


def plot(rows: list[dict], front_rows: list[dict], objectives: Sequence[str], path: Path) -> None:
    """Accuracy against memory and against throughput, one colour per method, the front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = completed(rows, [])
    pairs = [(x, "acc") for x in ("mem", "throughput") if any(r[x] is not None for r in done)]
    if not done or not pairs:
        return
    methods = sorted({r["method"] for r in done})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    on_front = {r["number"] for r in front_rows}
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs):
        for m in methods:
            pts = [r for r in done if r["method"] == m and r[x] is not None and r[y] is not None]
            ax.scatter([r[x] / (1024 if x == "mem" else 1) for r in pts], [100 * r[y] for r in pts],
                       color=colours[m], label=m, s=36, alpha=0.8)
        ring = [r for r in done if r["number"] in on_front and r[x] is not None]
        ax.scatter([r[x] / (1024 if x == "mem" else 1) for r in ring], [100 * r[y] for r in ring],
                   facecolors="none", edgecolors="black", s=110, linewidths=1.2, label="Pareto front")
        for r in ring:
            ax.annotate(str(r["number"]), (r[x] / (1024 if x == "mem" else 1), 100 * r[y]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel({"mem": "peak KiB held for backward per stage", "throughput": "training samples/s"}[x])
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"gradxform search · {len(done)} completed trials · front over {', '.join(objectives)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
