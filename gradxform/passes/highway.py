"""``highway``: residual streams become Highway-BP segments; GRUs become Highway GRUs.

Each maximal run of residual blocks with an identity skip and an unchanged shape becomes one
``HighwaySegment``: layer i is ``r_i(x, g_i(x))`` with g_i the block's body and r_i the cheap part,
``x + z`` (K = I), ``act(x + z)`` for a post-activation ResNet (K = diag(act')), or, for a pre-LN block
(the body starts with a normalisation of x), the γ form ``(1-γ)x + (g(x) + γx)`` with K = (1-γ)I.
Blocks with a projection or strided skip stay ordinary layers between segments: gradients cross them
exactly, and each segment is approximated on its own. Every ``nn.GRU`` becomes a ``HighwayGRU`` (same
parameters), one Highway layer per time step with K = diag(update gate); every ``nn.LSTM`` a
``HighwayLSTM`` over the state (h, c), whose K is a 2 x 2 matrix of diagonals.

The forward function is unchanged (the γ form computes the same values), so the PassManager checks
the outputs. Only the backward changes: k = ``iterations`` Highway iterations; k >= L is backprop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Pass, PassResult, option, register
from .reversible import _ordered_union, drop_unused_attrs, extract_runs, install

_PRE_NORMS = ("layer_norm", "group_norm")


@dataclass
class HighwayOptions:
    iterations: int = option(4, "k: Highway iterations in the backward (0: residual path only; >= layers: backprop)")
    gamma: float = option(0.2, "pre-LN blocks: share of the skip moved into the block (K = (1-gamma) I); 0: plain x + g")
    min_layers: int = option(2, "convert only residual runs with at least this many blocks")
    rnn: bool = option(True, "also unroll nn.GRU and nn.LSTM layers into one Highway layer per time step")

    def validate(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be 0 or more, got {self.iterations}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if self.min_layers < 1:
            raise ValueError("min_layers must be at least 1")


@register
class Highway(Pass):
    """Restructure residual streams for Highway-BP's iterative, layer-parallel backward.

    Identical blocks in a segment (same code, same parameter shapes) are run by the backward as one
    ``vmap`` over their stacked parameters; GRU time steps share one cell and run as one ``vmap``.
    Blocks that draw random numbers (dropout) are not converted: the backward re-runs every block
    and would draw a different mask.
    """

    name = "highway"
    summary = "residual streams and GRUs -> Highway-BP segments (k-iteration parallel backward)"
    Options = HighwayOptions
    preserves_function = True

    def run(self, gm: Any, ctx: Any) -> PassResult:
        import torch.nn as nn

        from ..ir.analysis import analyse
        from ..ir.match import op_kind
        from ..ir.subgraph import replace_module
        from ..nn.highway import HighwayGRU, HighwayLSTM, HighwaySegment

        opts = self.options
        an = analyse(gm)
        notes: list[str] = []
        for b in an.blocks:
            if not b.invertible:
                notes.append(f"block {b.id} stays an ordinary layer between highway segments ({b.reason}); "
                             f"its gradient is exact")
        runs = extract_runs(gm, an.chains, notes, random_ok=False)
        plans = []
        existing = sum(1 for n, _ in gm.named_children() if n.startswith("highway"))
        for run in runs:
            names = [b.id for b, _ in run]
            if len(run) < opts.min_layers:
                notes.append(f"blocks {', '.join(names)} not converted: fewer than min_layers={opts.min_layers}")
                continue
            sides = _ordered_union([x.sides for _, x in run])
            kinds = [_residual_kind(b, gm, opts.gamma, op_kind) for b, _ in run]
            blocks = [canonical(x.build(gm, sides, post_act=False)) for _, x in run]
            module = HighwaySegment(blocks, kinds, gamma=opts.gamma, iterations=opts.iterations, names=names)
            nodes = [n for b, _ in run for n in b.nodes]
            plans.append((run[0][0].entry, run[-1][0].exit, nodes, f"highway{existing + len(plans)}", module,
                          sides, names, kinds))
        segments = []
        for i in install(gm, plans):
            _, _, _, name, module, sides, names, kinds = plans[i]
            groups = [len(g) for g in module.group_layers]
            residual = _describe_kinds(kinds, opts.gamma)
            notes.append(f"{name}: {len(names)} layers {names[0]} .. {names[-1]}; residual {residual}; "
                         f"{len(groups)} group(s) of identical blocks {groups} run batched in the backward")
            segments.append({"module": name, "layers": names, "kinds": kinds, "groups": groups,
                             "side_inputs": [s.name for s in sides]})
        grus = []
        if opts.rnn:
            for n in list(gm.graph.nodes):
                if n.op != "call_module":
                    continue
                mod = gm.get_submodule(n.target)
                kind = "GRU" if type(mod) is nn.GRU else "LSTM" if type(mod) is nn.LSTM else None
                if kind is None:
                    continue
                try:
                    new_mod = (HighwayGRU.from_gru(mod, opts.iterations) if kind == "GRU"
                               else HighwayLSTM.from_lstm(mod, opts.iterations))
                except ValueError as e:
                    notes.append(f"{n.target}: not converted: {e}")
                    continue
                replace_module(gm, n.target, new_mod)
                steps = _steps(n, mod.batch_first)
                grus.append({"module": n.target, "kind": kind, "layers": mod.num_layers, "steps": steps})
                notes.append(f"{n.target}: {kind} ({mod.num_layers} layer(s)) unrolled, one Highway layer per time "
                             f"step ({steps} at the example); residual {new_mod.residual().describe()}")
        for n in gm.graph.nodes:
            if n.op == "call_function" and ("gru" in str(n.target) or "lstm" in str(n.target)):
                notes.append(f"'{n.name}': an exported recurrent kernel ({n.target}) is not converted; trace with "
                             f"the fx tracer to keep nn.GRU / nn.LSTM as a layer")
        if not plans and not grus:
            notes.append("no residual run or recurrent layer found: nothing to convert")
        else:
            notes.append(f"backward: {opts.iterations} Highway iteration(s); a segment of L layers is exact when "
                         f"iterations >= L")
        changed = bool(plans or grus)
        if plans:
            drop_unused_attrs(gm)
        if changed:
            gm.recompile()
        return PassResult(gm, changed, notes, {"segments": segments, "grus": grus, "iterations": opts.iterations})


def _residual_kind(block: Any, gm: Any, gamma: float, op_kind: Any) -> str:
    if block.post_act is not None:
        return op_kind(block.post_act, gm)
    body = set(block.body)
    first = [u for u in block.entry.users if u in body]
    if gamma > 0 and first and all(op_kind(u, gm) in _PRE_NORMS for u in first):
        return "gamma"
    return "add"


def _describe_kinds(kinds: list[str], gamma: float) -> str:
    from ..nn.highway import make_residual

    return "; ".join(make_residual(k, gamma).describe() for k in sorted(set(kinds)))


def _steps(node: Any, batch_first: bool) -> Any:
    x = node.args[0] if node.args else None
    val = getattr(x, "meta", {}).get("val")
    if val is None or val.dim() < 2:
        return "?"
    from ..ir.meta import concrete

    return concrete(val.shape[1] if batch_first and val.dim() == 3 else val.shape[0])


def canonical(g: Any) -> Any:
    """The same GraphModule with its layers and attributes renamed ``l0, l1, ...`` in order of use,
    so that identical blocks have identical code and parameter names (and can be stacked)."""
    import operator

    import torch
    import torch.fx as fx

    root: dict[str, Any] = {}
    rename: dict[str, str] = {}
    for n in list(g.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            # vmap has no batching rule for the op; the method reads the per-layer (logical) size
            with g.graph.inserting_before(n):
                size = g.graph.call_method("size", tuple(n.args), dict(n.kwargs))
            size.meta = dict(n.meta)
            n.replace_all_uses_with(size)
            g.graph.erase_node(n)
        if n.op not in ("call_module", "get_attr"):
            continue
        if n.target not in rename:
            rename[n.target] = f"l{len(rename)}"
            root[rename[n.target]] = operator.attrgetter(n.target)(g)
        n.target = rename[n.target]
    out = fx.GraphModule(root, g.graph, class_name="HighwayBlock")
    out.meta.update(getattr(g, "meta", {}))
    return out
