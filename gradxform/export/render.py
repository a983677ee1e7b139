"""DOT and SVG pictures of a (possibly staged) graph: clusters per stage and per block, colours by role."""

from __future__ import annotations

import contextlib
import html
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..ir.cost import named, to_expr
from ..ir.match import op_kind

ROLE_COLOURS = {
    "stem": "#cfe2f3",     # blue
    "block": "#d9ead3",    # green
    "skip": "#fce5cd",     # orange
    "head": "#ead1dc",     # pink
    "aux": "#fff2cc",      # yellow
    "between": "#eeeeee",  # grey
    "input": "#ffffff",
}
STAGE_COLOURS = ["#f4f8ff", "#f6fff4", "#fffaf2", "#fbf4ff", "#f4fffd", "#fffff0"]


def _shape(node: fx.Node, gm: fx.GraphModule) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "×".join(str(named(to_expr(s), gm)) for s in val.shape) or "scalar"
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        return "(" + ", ".join("×".join(str(named(to_expr(s), gm)) for s in t.shape) for t in val
                               if isinstance(t, torch.Tensor)) + ")"
    return ""


def _label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        title = f"{node.target}<br/><i>{type(gm.get_submodule(node.target)).__name__}</i>"
    elif node.op == "placeholder":
        title = f"input {node.name}"
    else:
        title = f"{node.name}<br/><i>{op_kind(node, gm)}</i>"
    shape = _shape(node, gm)
    return f"<{title}<br/><font point-size='8'>{html.escape(shape)}</font>>" if shape else f"<{title}>"


def _quote(s: str) -> str:
    return '"' + s.replace('"', r'\"') + '"'


def to_dot(module: Any, title: str = "") -> str:
    """DOT text for a GraphModule or a StagedModule."""
    from ..nn.staged import stages_of

    staged = stages_of(module) is not None
    stages = stages_of(module) or [module]
    lines = ["digraph gradxform {", "  rankdir=TB; compound=true; newrank=true;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, penwidth=0.6];',
             '  edge [arrowsize=0.6, color="#555555"];']
    if title:
        lines.append(f"  labelloc=t; label={_quote(title)}; fontname=Helvetica;")
    defined: dict[str, str] = {}      # value name -> DOT id of the node that produced it
    edges: list[str] = []
    for s, gm in enumerate(stages):
        indent = "  "
        if staged:
            lines.append(f"  subgraph cluster_stage{s} {{")
            lines.append(f'    label="stage {s}"; style="rounded,filled"; '
                         f'fillcolor="{STAGE_COLOURS[s % len(STAGE_COLOURS)]}"; fontname=Helvetica;')
            indent = "    "
        blocks: dict[str, list[str]] = {}
        loose: list[str] = []
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "output") or (node.op == "placeholder" and s > 0):
                continue
            if op_kind(node, gm) == "view" and not isinstance(node.meta.get("val"), torch.Tensor):
                continue  # size reads: noise in a picture
            ident = f"s{s}_{node.name}"
            defined[node.name] = ident
            gx = node.meta.get("gx", {})
            role = "input" if node.op == "placeholder" else gx.get("role", "between")
            shape = "ellipse" if node.op == "placeholder" else "box"
            text = f"{ident} [label={_label(node, gm)}, fillcolor=\"{ROLE_COLOURS.get(role, '#eeeeee')}\", shape={shape}];"
            (blocks.setdefault(gx["block"], []) if gx.get("block") else loose).append(text)
            for arg in node.all_input_nodes:
                if arg.op != "get_attr" and arg.name in defined:
                    edges.append(f"  {defined[arg.name]} -> {ident};")
        for i, (block, texts) in enumerate(blocks.items()):
            lines.append(f"{indent}subgraph cluster_s{s}_b{i} {{")
            lines.append(f'{indent}  label={_quote(block)}; style="rounded,dashed"; color="#6a8f5a"; fontsize=9;')
            lines += [f"{indent}  {t}" for t in texts]
            lines.append(f"{indent}}}")
        lines += [f"{indent}{t}" for t in loose]
        if staged:
            lines.append("  }")
    out_ids = []
    last = stages[-1]
    for node in last.graph.nodes:
        if node.op == "output":
            for arg in node.all_input_nodes:
                if arg.name in defined:
                    out_ids.append(defined[arg.name])
    lines.append('  output [label="output", shape=ellipse, fillcolor="#ffffff"];')
    edges += [f"  {i} -> output;" for i in out_ids]
    lines += edges
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(module: Any, path: str | Path, title: str = "") -> Path:
    """Draw the graph to ``path`` (SVG, PNG or PDF by suffix) with the Graphviz bundled in pygraphviz."""
    import pygraphviz

    path = Path(path)
    dot = to_dot(module, title)
    graph = pygraphviz.AGraph(string=dot)
    with _quiet_stderr():  # the bundled Graphviz warns about the system's fontconfig files
        graph.draw(str(path), format=path.suffix.lstrip(".") or "svg", prog="dot")
    return path


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C libraries write there directly, past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
