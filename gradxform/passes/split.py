"""``split``: cut a graph into balanced pipeline stages."""

from __future__ import annotations

import inspect
import operator
import time
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import PipelineError, did_you_mean
from .base import Pass, PassResult, option, register


@dataclass
class SplitOptions:
    stages: int = option(2, "number of pipeline stages")
    balance: Literal["flops", "params", "layers", "time"] = option(
        "flops", "what to equalise across stages (time: measured per node on the example inputs)")
    at: tuple[str, ...] = option((), "explicit cuts: each stage after the first starts at this module path")
    recompute: bool = option(False, "stages but the last recompute their forward in backward (petra, dsp, stash): "
                                    "balance forward + recompute + backward, so the last stage takes more layers")

    def validate(self) -> None:
        if self.stages < 1:
            raise ValueError(f"stages must be at least 1, got {self.stages}")


@register
class Split(Pass):
    """Cut the model into pipeline stages, optimally balanced over the valid cut points.

    Valid cuts lie between residual blocks (never inside one), carry only tensors, and never separate
    the users of one buffer. A parameter used on both sides of a cut (tied embeddings) is copied into
    each stage that uses it, the groups recorded in ``StagedModule.tied``. Among the valid cuts the
    partition minimising the most expensive stage is chosen exactly (dynamic programming, not greedy);
    ties go to the fewest bytes crossing stage boundaries. Values used by a later stage are carried
    through the stages in between; sizes are re-read from the received tensors instead of being sent.
    """

    name = "split"
    summary = "cut the model into balanced pipeline stages (a StagedModule)"
    Options = SplitOptions
    whole_model = True
    schedule = "petra"  # pipeline stages train with PETRA unless a later pass names another

    def compiles_for(self) -> str | None:
        return self.schedule if self.options.stages > 1 or self.options.at else None

    def run(self, gm: Any, ctx: Any) -> PassResult:
        from ..ir.analysis import analyse
        from ..ir.cost import evaluate, hints, node_costs
        from ..ir.partition import partition, stage_costs
        from ..nn.staged import StagedModule

        if isinstance(gm, StagedModule):
            raise PipelineError("the model is already split", hint="use one 'split' per pipeline")
        opts = self.options
        if unfold_chains(gm):
            from ..ir.meta import propagate

            propagate(gm)
        an = analyse(gm)
        order = an.order
        costs = node_costs(gm)
        values = hints(gm)
        valid = an.valid_cuts
        at = list(opts.at)
        if at:
            cuts = self._explicit_cuts(gm, an, at)
            if opts.stages not in (2, len(at) + 1):  # 2 is the default: 'at' alone decides
                raise PipelineError(f"split{{at=...}} gives {len(at) + 1} stages but stages={opts.stages}",
                                    hint="leave out 'stages' when giving 'at'")
            weights = self._weights(gm, order, costs, values, "flops", ctx)
        else:
            weights = self._weights(gm, order, costs, values, opts.balance, ctx)
            cross = [evaluate(c.bytes, values) for c in valid]
            try:
                cuts = partition(weights, [c.index for c in valid], opts.stages, cross, last=_last_share(opts))
            except ValueError:
                useful = _useful_cuts(weights, [c.index for c in valid])
                blocked = [c.reason for c in an.cuts if not c.valid and c.reason.startswith("buffer")]
                raise PipelineError(
                    f"cannot cut into {opts.stages} stages: the model has only {useful} valid cut "
                    f"points between layers that do work, enough for {useful + 1} stages",
                    hint=(f"{blocked[0]}; use fewer stages" if blocked
                          else "use fewer stages, or run 'gradxform inspect' to see the cut points")) from None
        staged = build_stages(gm, an, cuts)
        share = stage_costs(weights, cuts, last=_last_share(opts))
        whole = sum(share) or 1.0
        by_index = {c.index: c for c in an.cuts}
        notes = []
        for c in cuts:
            cut = by_index[c]
            tensors = [v for v in cut.crossing if _is_tensor(v)]
            notes.append(f"cut after '{cut.after}': {len(tensors)} tensor(s), "
                         f"{evaluate(cut.bytes, values) / 1024:.1f} KiB at the example size ({cut.bytes} bytes)")
        stages_info = []
        for s, sgm in enumerate(staged.stages):
            sc = node_costs(sgm)
            stages_info.append({
                "stage": s,
                "nodes": len(sgm.graph.nodes),
                "flops": evaluate(sum((c.flops for c in sc.values()), 0), values),
                "params": sum(p.numel() for p in sgm.parameters()),
                "balance_share": share[s] / whole,
            })
        for group in staged.tied:
            where = ", ".join(f"stage {j} '{name}'" for j, name in group)
            notes.append(f"tied parameter copied per stage: {where}; sum their gradients before each update "
                         f"(StagedModule.tied)")
        balance = "flops" if at else opts.balance
        notes.append(f"balanced on {balance}" + (" with the recompute of every stage but the last" if opts.recompute
                                                 else "") + ": stage shares " + ", ".join(f"{x / whole:.0%}" for x in share))
        return PassResult(staged, True, notes, {"cuts": [by_index[c].after for c in cuts],
                                                 "balance": balance, "stages": stages_info,
                                                 "tied": staged.tied})

    @staticmethod
    def _weights(gm: Any, order: list, costs: dict, values: dict, balance: str, ctx: Any) -> list[float]:
        from ..ir.cost import evaluate

        if balance == "flops":
            return [evaluate(costs[n].flops, values) for n in order]
        if balance == "params":
            return [evaluate(costs[n].param_bytes, values) + _param_reads(n, costs, values) for n in order]
        if balance == "layers":
            return [1.0 if _param_reads(n, costs, values) or evaluate(costs[n].param_bytes, values) else 0.0
                    for n in order]
        return measure_node_times(gm, order, ctx)

    @staticmethod
    def _explicit_cuts(gm: Any, an: Any, at: list[str]) -> list[int]:
        from ..ir.match import scope

        by_index = {c.index: c for c in an.cuts}
        cuts = []
        for name in at:
            index = next((i for i, n in enumerate(an.order)
                          if scope(n) == name or scope(n).startswith(name + ".")), None)
            if index is None:
                scopes = sorted({scope(n) for n in an.order if scope(n)})
                raise PipelineError(f"split{{at=...}}: no layer named '{name}' in the model",
                                    hint=did_you_mean(name, scopes))
            cut = by_index.get(index)
            if cut is None:
                raise PipelineError(f"split{{at={name}}}: '{name}' starts the model; nothing comes before it")
            if not cut.valid:
                raise PipelineError(f"split{{at={name}}}: cannot cut before '{name}': {cut.reason}",
                                    hint="run 'gradxform inspect' to list the valid cut points")
            cuts.append(index)
        if cuts != sorted(set(cuts)):
            raise PipelineError(f"split{{at={','.join(at)}}}: cut points must be distinct and in model order")
        return cuts


def unfold_chains(gm: Any) -> bool:
    """Replace every multi-block ReversibleChain node by one-block slices passing the two-stream state.

    The pipeline may then cut between any two blocks of a chain; a stage made only of such slices is
    invertible (``gradxform.nn.staged.stage_inverse``), which is what PETRA needs.
    """
    from ..nn.reversible import ReversibleChain

    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        chain = gm.get_submodule(node.target)
        if not isinstance(chain, ReversibleChain) or len(chain.blocks) < 2:
            continue
        k = len(chain.blocks)
        state_in = list(node.args[:1] if chain.enter else node.args[:2])
        sides = list(node.args[len(state_in):])
        prev = None
        with gm.graph.inserting_before(node):
            for i in range(k):
                name = f"{node.target}_b{i}"
                gm.add_submodule(name, chain.slice(i, i + 1, enter=chain.enter and i == 0,
                                                   exit=chain.exit and i == k - 1))
                inputs = state_in if prev is None else [gm.graph.call_function(operator.getitem, (prev, s))
                                                        for s in (0, 1)]
                prev = gm.graph.call_module(name, (*inputs, *sides))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        changed = True
    if changed:
        gm.recompile()
    return changed


# Per unit of forward work, with a backward of about twice a forward: forward + recompute + backward = 4
# on the stages that recompute, forward + backward = 3 on the last stage.
LAST_STAGE_SHARE = 3 / 4


def _last_share(opts: SplitOptions) -> float:
    return LAST_STAGE_SHARE if opts.recompute else 1.0


def _useful_cuts(weights: list[float], cuts: list[int]) -> int:
    """How many of ``cuts`` separate work from work (the most stages minus one)."""
    count, since = 0, 0.0
    for i, w in enumerate(weights):
        if i in cuts and since > 0:
            count, since = count + 1, 0.0
        since += w
    return count - (1 if count and since <= 0 else 0)


def _is_tensor(node: Any) -> bool:
    import torch

    return isinstance(node.meta.get("val"), torch.Tensor)


def _param_reads(node: Any, costs: dict, values: dict) -> float:
    """Bytes of parameters a node reads through get_attr inputs (export graphs)."""
    from ..ir.cost import evaluate

    return sum(evaluate(costs[p].param_bytes, values) for p in node.all_input_nodes if p.op == "get_attr")


def measure_node_times(gm: Any, order: list, ctx: Any, repeats: int = 3) -> list[float]:
    """Seconds per node on the example inputs (median of ``repeats`` runs)."""
    import torch
    import torch.fx as fx

    from ..ir.meta import flat_inputs
    from ..state import frozen_buffers

    samples: dict[Any, list[float]] = {n: [] for n in order}

    class Timed(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            start = time.perf_counter()
            out = super().run_node(n)
            if n in samples:
                samples[n].append(time.perf_counter() - start)
            return out

    flat = flat_inputs(gm, ctx.args, ctx.kwargs)
    with torch.no_grad(), frozen_buffers(gm):
        for _ in range(repeats):
            Timed(gm).run(*flat)
    return [sorted(samples[n])[len(samples[n]) // 2] for n in order]


def build_stages(gm: Any, an: Any, cuts: list[int]) -> Any:
    """Copy the nodes of each stage into its own GraphModule and compose them."""
    import torch.fx as fx

    from ..ir.analysis import size_source
    from ..ir.meta import tags
    from ..ir.subgraph import arg_lookup
    from ..nn.staged import StagedModule, stage_inverse

    order = an.order
    bounds = [0, *cuts, len(order)]
    by_index = {c.index: c for c in an.cuts}
    exported = getattr(gm, "_in_spec", None) is not None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    originals = [n for n in gm.graph.nodes if n.op == "placeholder"]
    stages = []
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        graph = fx.Graph()
        env: dict[fx.Node, Any] = {}
        incoming = originals if s == 0 else [v for v in by_index[lo].crossing if _carried(v)]
        for v in incoming:
            p = graph.placeholder(v.name, default_value=v.args[0] if v.op == "placeholder" and v.args
                                  else inspect.Signature.empty)
            p.meta = dict(v.meta)
            env[v] = p

        lookup = arg_lookup(graph, env, lambda n: size_source(n.meta.get("val"), incoming), exported,
                            f"stage {s}")

        for node in order[lo:hi]:
            env[node] = graph.node_copy(node, lookup)
            tags(node)["stage"] = s
            env[node].meta.setdefault("gx", {})["stage"] = s
        if s == len(bounds) - 2:
            graph.output(fx.node.map_arg(output.args[0], lookup))
        else:
            outgoing = [v for v in by_index[hi].crossing if _carried(v)]
            graph.output(tuple(lookup(v) for v in outgoing))
        stage = fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        stage.meta.update({k: v for k, v in gm.meta.items() if k.startswith("gx_")})
        stage.meta["gx_stage"] = s
        inverse = stage_inverse(stage)
        if inverse is not None:  # a stage made only of reversible couplings
            stage.inverse = inverse
        stages.append(stage)
    tied = untie(stages, gm)
    return StagedModule(stages, getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None), tied)


def untie(stages: list, gm: Any) -> list[list[tuple[int, str]]]:
    """Give every stage but the first that uses a shared parameter its own copy; returns the groups.

    A stage's GraphModule refers to the model's own layers and parameters (``fx.GraphModule`` copies
    references), so a parameter reached from two stages is one object. Each later stage gets a clone,
    installed along a path of its own: layers on the way that are the model's own objects are copied
    (shallowly) first, so that the model passed in keeps its parameters tied.
    """
    import torch

    owners: dict[int, list[int]] = {}
    for j, stage in enumerate(stages):
        for p in {id(p) for p in stage.parameters()}:
            owners.setdefault(p, []).append(j)
    shared = {p for p, js in owners.items() if len(js) > 1}
    if not shared:
        return []
    groups: dict[int, list[tuple[int, str]]] = {}
    for j, stage in enumerate(stages):
        paths = [(name, p) for name, p in stage.named_parameters(remove_duplicate=False) if id(p) in shared]
        copies: dict[int, torch.nn.Parameter] = {}
        for name, p in paths:
            first = owners[id(p)][0] == j
            if not first:
                if id(p) not in copies:
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                _set_own(stage, name, copies[id(p)], gm)
            groups.setdefault(id(p), [])
        names = {id(p): name for name, p in stage.named_parameters()}
        for original, p in [(id(p), p) for _, p in paths]:
            mine = copies.get(original, p)
            entry = (j, names[id(mine)])
            if entry not in groups[original]:
                groups[original].append(entry)
    return [groups[p] for p in sorted(groups, key=lambda p: groups[p][0])]


def _set_own(stage: Any, path: str, value: Any, gm: Any) -> None:
    """Set the parameter at ``path`` of ``stage`` without touching any module outside the stage."""
    import copy

    *prefix, leaf = path.split(".")
    parent, original = stage, gm
    for part in prefix:
        child = getattr(parent, part)
        theirs = getattr(original, part, None) if original is not None else None
        if child is theirs:  # the model's own layer (fx.GraphModule made the containers above it anew)
            child = copy.copy(child)  # shares tensors, not the tables naming them
            child._parameters, child._buffers, child._modules = (dict(child._parameters), dict(child._buffers),
                                                                 dict(child._modules))
            setattr(parent, part, child)
        parent, original = child, theirs
    setattr(parent, leaf, value)


def _carried(node: Any) -> bool:
    """Values sent between stages: tensors, and inputs left at None; sizes are re-read instead."""
    import torch

    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or (val is None and node.op == "placeholder")
