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


ROLE_NAMES = {"stem": "stem (before the first block)", "block": "residual block body", "skip": "projection skip",
              "head": "head (after the last block)", "aux": "auxiliary head", "between": "between blocks",
              "input": "model input"}


def _legend() -> str:
    rows = "".join(f'<tr><td bgcolor="{ROLE_COLOURS[r]}" border="1" color="#999999" width="18"> </td>'
                   f'<td align="left">{html.escape(t)}</td></tr>' for r, t in ROLE_NAMES.items())
    rows += ('<tr><td border="1" style="dashed" width="18"> </td><td align="left">a residual block</td></tr>'
             '<tr><td bgcolor="#ffffff" width="18">✉</td><td align="left">tensors a stage receives</td></tr>')
    return (f'  legend [shape=plaintext, style="", fontsize=9, label=<<table border="0" cellborder="0" '
            f'cellspacing="2"><tr><td colspan="2"><b>colours</b></td></tr>{rows}</table>>];')


def _received(s: int, gm: fx.GraphModule, inputs: list[fx.Node]) -> str:
    rows = "".join(f"<br/>{html.escape(p.name)}: {html.escape(_shape(p, gm) or 'not a tensor')}" for p in inputs)
    return f"<<b>from stage {s - 1}</b>{rows}>"


def to_dot(module: Any, title: str = "") -> str:
    """DOT text for a GraphModule or a StagedModule.

    Stages are drawn side by side, each a column (the edges between stages do not constrain the
    layout); each stage after the first starts with a note listing the tensors it receives and their
    shapes, the values that cross the boundary. A legend names the role colours.
    """
    from ..nn.staged import stages_of

    staged = stages_of(module) is not None
    stages = stages_of(module) or [module]
    lines = ["digraph gradxform {", "  rankdir=TB; compound=true; newrank=true; nodesep=0.25; ranksep=0.3;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, penwidth=0.6];',
             '  edge [arrowsize=0.6, color="#555555"];']
    if title:
        lines.append(f"  labelloc=t; label={_quote(title)}; fontname=Helvetica;")
    lines.append(_legend())
    producer: dict[str, str] = {}     # value name -> DOT id of what holds it (the latest stage's)
    edges: list[str] = []
    tops = ["legend"]                 # the first node of each column, kept in one row, in order
    for s, gm in enumerate(stages):
        indent = "  "
        local: dict[str, str] = {}    # this stage's values -> DOT ids
        if staged:
            lines.append(f"  subgraph cluster_stage{s} {{")
            lines.append(f'    label="stage {s}"; style="rounded,filled"; '
                         f'fillcolor="{STAGE_COLOURS[s % len(STAGE_COLOURS)]}"; fontname=Helvetica;')
            indent = "    "
        received = [n for n in gm.graph.nodes if n.op == "placeholder"] if s > 0 else []
        if received:
            ident = f"s{s}_received"
            lines.append(f'{indent}{ident} [label={_received(s, gm, received)}, shape=note, fillcolor="#ffffff", '
                         f'fontsize=9];')
            sources = {producer[p.name] for p in received if p.name in producer}
            edges += [f'  {src} -> {ident} [style=dashed, color="#1f4e79", penwidth=1.2, constraint=false];'
                      for src in sorted(sources)]
            for p in received:
                local[p.name] = ident
            tops.append(ident)
        blocks: dict[str, list[str]] = {}
        loose: list[str] = []
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "output") or (node.op == "placeholder" and s > 0):
                continue
            if op_kind(node, gm) == "view" and not isinstance(node.meta.get("val"), torch.Tensor):
                continue  # size reads: noise in a picture
            ident = f"s{s}_{node.name}"
            local[node.name] = ident
            if len(tops) == s + 1:
                tops.append(ident)
            gx = node.meta.get("gx", {})
            role = "input" if node.op == "placeholder" else gx.get("role", "between")
            shape = "ellipse" if node.op == "placeholder" else "box"
            text = f"{ident} [label={_label(node, gm)}, fillcolor=\"{ROLE_COLOURS.get(role, '#eeeeee')}\", shape={shape}];"
            (blocks.setdefault(gx["block"], []) if gx.get("block") else loose).append(text)
            for arg in node.all_input_nodes:
                if arg.op != "get_attr" and arg.name in local and local[arg.name] != ident:
                    edge = f"  {local[arg.name]} -> {ident};"
                    if edge not in edges:
                        edges.append(edge)
        for i, (block, texts) in enumerate(blocks.items()):
            lines.append(f"{indent}subgraph cluster_s{s}_b{i} {{")
            lines.append(f'{indent}  label={_quote(block)}; style="rounded,dashed"; color="#6a8f5a"; fontsize=9;')
            lines += [f"{indent}  {t}" for t in texts]
            lines.append(f"{indent}}}")
        lines += [f"{indent}{t}" for t in loose]
        if staged:
            lines.append("  }")
        producer.update(local)
    out_ids = []
    last = stages[-1]
    for node in last.graph.nodes:
        if node.op == "output":
            for arg in node.all_input_nodes:
                if arg.name in producer and producer[arg.name] not in out_ids:
                    out_ids.append(producer[arg.name])
    lines.append('  output [label="output", shape=ellipse, fillcolor="#ffffff"];')
    edges += [f"  {i} -> output;" for i in out_ids]
    lines += edges
    if staged:  # columns left to right in stage order: an invisible node whose edges keep their order
        lines.append('  columns [style=invis, shape=point, width=0, ordering=out];')
        lines += [f"  columns -> {t} [style=invis];" for t in tops]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(module: Any, path: str | Path, title: str = "") -> Path:
    """Draw the graph to ``path`` (SVG, PNG or PDF by suffix) with the Graphviz bundled in pygraphviz."""
    import pygraphviz

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
