"""The readable summaries printed by ``gradxform compile`` and ``gradxform inspect``."""

from __future__ import annotations

from typing import Any


def human(x: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def table(rows: list[list[str]], header: list[str], indent: str = "  ") -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = indent + "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), indent + "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _arrow(pair: list[Any], fn: Any = human) -> str:
    a, b = pair
    return fn(a) if a == b else f"{fn(a)} → {fn(b)}"


def format_compile(report: dict[str, Any]) -> str:
    out = [f"model     {report['model']}  (tracer: {report['tracer']})"]
    inputs = ", ".join(f"{k} {v['dtype']}{v['shape']}" if isinstance(v, dict) else f"{k}={v}"
                       for k, v in report["inputs"].items())
    symbols = ", ".join(f"{k}={v}" for k, v in report.get("symbols", {}).items())
    out.append(f"inputs    {inputs}" + (f"   (symbols: {symbols})" if symbols else ""))
    for note in report.get("trace_notes", []):
        out.append(f"note      {note}")
    t = report.get("timings", {})
    out.append("timings   " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    rows = []
    for p in report["passes"]:
        diff = p.get("max_abs_diff")
        rows.append([p["spec"], f"{p['seconds']:.2f}s", _arrow(p["nodes"], str), _arrow(p["params"]),
                     _arrow(p["flops"]), "-" if diff is None else f"{diff:.2g}"])
    out.append("\npasses" + (f"   (outputs checked on {report['check']})" if report.get("check") else ""))
    out.append(table(rows, ["pass", "time", "nodes", "params", "FLOPs", "max|Δ|"]))
    for p in report["passes"]:
        if p.get("unchanged"):
            out.append(f"  ! {p['unchanged']}")
    for p in report["passes"]:
        for note in p["notes"]:
            out.append(f"  · {p['name']}: {note}")
    for p in report["passes"]:
        stages = p.get("info", {}).get("stages")
        if stages:
            out.append(f"\nstages ({p['info'].get('balance')}-balanced)")
            rows = [[s["stage"], s["nodes"], human(s["flops"]), f"{s['balance_share']:.1%}", human(s["params"])]
                    for s in stages]
            out.append(table(rows, ["stage", "nodes", "FLOPs", "share", "params"]))
    onnx = report.get("onnx")
    if onnx:
        out.append("\nonnx (onnxruntime vs PyTorch)")
        for o in onnx:
            state = f"max|Δ| {o['max_abs_diff']:.2g}" if o["ok"] else f"FAILED: {o['error']}"
            out.append(f"  {o['name']:<8} {state}")
    artefacts = report.get("artefacts")
    if artefacts:
        out.append("\nwrote     " + ", ".join(artefacts))
    for failure in report.get("failures", []):
        out.append(f"failed    {failure}")
    return "\n".join(out)


def format_inspect(info: dict[str, Any]) -> str:
    out = [f"model     {info['model']}  (tracer: {info['tracer']}, {info['nodes']} nodes)"]
    inputs = ", ".join(f"{k} {v['dtype']}{v['shape']}" if isinstance(v, dict) else f"{k}={v}"
                       for k, v in info["inputs"].items())
    symbols = ", ".join(f"{k}={v}" for k, v in info["symbols"].items())
    out.append(f"inputs    {inputs}" + (f"   (symbols: {symbols})" if symbols else ""))
    for note in info.get("trace_notes", []):
        out.append(f"note      {note}")
    blocks = info["blocks"]
    n_inv = sum(b["invertible"] for b in blocks)
    out.append(f"\nresidual blocks: {len(blocks)} found, {n_inv} invertible, in {len(info['chains'])} chain(s)")
    if blocks:
        rows = [[b["id"], b["skip"] + (" + act" if b["post_activation"] else ""),
                 "-" if b["chain"] is None else b["chain"],
                 "yes" if b["invertible"] else f"no: {b['reason']}"] for b in blocks]
        out.append(table(rows, ["block", "skip", "chain", "invertible"]))
    cuts = info["cuts"]
    out.append(f"\nvalid stage cut points: {len(cuts)}")
    if cuts:
        rows = [[c["after"], c["tensors"], c["bytes"], human(c["bytes_at_example"], "B")] for c in cuts]
        out.append(table(rows, ["cut after", "tensors", "bytes crossing", "at example"]))
    for reason, count in info["invalid_cuts"].items():
        out.append(f"  ({count} other positions: {reason})")
    symbols_text = " and ".join(info["symbols"]) or "nothing (static sizes)"
    out.append(f"\ncost per segment (symbolic in {symbols_text}; value at the example)")
    rows = [[s["segment"], s["flops"], human(s["flops_at_example"]), human(s["param_bytes_at_example"], "B"),
             s["act_bytes"], human(s["act_bytes_at_example"], "B")] for s in info["segments"]]
    out.append(table(rows, ["segment", "FLOPs", "", "params", "activation bytes", ""]))
    t = info["total"]
    out.append(f"  total FLOPs {t['flops']} = {human(t['flops_at_example'])}")
    return "\n".join(out)
