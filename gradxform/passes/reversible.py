"""``reversible``: residual chains become reversible couplings whose backward stores no activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .base import Pass, PassResult, option, register


@dataclass
class ReversibleOptions:
    coupling: Literal["leapfrog", "momentum"] = option("leapfrog", "how the two-tensor state is coupled")
    gamma: float = option(0.9, "momentum coupling: the velocity's decay (inverse divides by it per block)")
    merge: Literal["first", "mean"] = option("first", "leapfrog: how the two streams leave the chain")
    min_blocks: int = option(1, "convert only chains with at least this many invertible blocks")
    drift_every: int = option(0, "in training, measure reconstruction error every N forward calls (0: never)")
    memory_saving: bool = option(True, "false: the same architecture with ordinary autograd (a reference)")
    store_inputs: bool = option(True, "blocks that cannot be inverted keep only their input and recompute in "
                                      "backward (their maths is unchanged)")

    def validate(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if self.min_blocks < 1:
            raise ValueError("min_blocks must be at least 1")
        if self.drift_every < 0:
            raise ValueError("drift_every must be 0 or positive")


class _Skip(Exception):
    """A block that looked invertible but cannot be extracted (the reason goes to the report)."""


@register
class Reversible(Pass):
    """Convert every maximal chain of shape-preserving residual blocks into a ReversibleChain.

    Each block's residual function f is reused as it is, with its parameters; an activation after the
    addition (``relu(x + f(x))``) moves into f, as in PETRA's RevNets. The architecture changes (the
    leapfrog coupling adds the block's output to the state two steps back), so the model's function is
    not preserved: train it from scratch or fine-tune. Blocks with projection or strided skips, the
    stem and the head stay ordinary layers that store their input.
    """

    name = "reversible"
    summary = "residual chains -> reversible couplings whose backward stores no activations"
    Options = ReversibleOptions
    preserves_function = False

    def run(self, gm: Any, ctx: Any) -> PassResult:
        from ..ir.analysis import analyse
        from ..ir.cost import evaluate, hints, node_costs
        from ..nn.reversible import COUPLINGS, ReversibleChain, StoredInputBlock

        opts = self.options
        an = analyse(gm)
        costs = node_costs(gm)
        values = hints(gm)
        notes: list[str] = []
        for b in an.blocks:
            if not b.invertible:
                notes.append(f"block {b.id} not converted: {b.reason}")
        chains = extract_runs(gm, an.chains, notes)
        # Build every module from the untouched graph first, then rewrite it in one pass: a block's
        # entry may be the exit of a block replaced before it.
        plans = []  # (first node, last node, nodes, module name, module, sides, report entry)
        existing = sum(1 for n, _ in gm.named_children() if n.startswith(("rev", "stored")))
        for k, chain in enumerate(chains):
            names = [b.id for b, _ in chain]
            if len(chain) < opts.min_blocks:
                notes.append(f"chain {', '.join(names)} not converted: shorter than min_blocks={opts.min_blocks}")
                continue
            coupling = (COUPLINGS["momentum"](opts.gamma) if opts.coupling == "momentum"
                        else COUPLINGS["leapfrog"](opts.merge))
            sides = _ordered_union([x.sides for _, x in chain])
            module = ReversibleChain([x.build(gm, sides) for _, x in chain], coupling, names=names,
                                     random=[x.random for _, x in chain], memory_saving=opts.memory_saving,
                                     drift_every=opts.drift_every)
            first, last = chain[0][0], chain[-1][0]
            nodes = [n for b, _ in chain for n in b.nodes]
            kept = sum((costs[n].act_bytes for n in nodes), 0)
            state = 2 * tensor_bytes(last.exit)
            plans.append((first.entry, last.exit, nodes, f"rev{existing + k}", module, sides,
                          {"kind": "chain", "blocks": names, "coupling": coupling.describe(), "before": kept,
                           "after": state}))
        if opts.store_inputs:
            for k, b in enumerate(x for x in an.blocks if not x.invertible):
                try:
                    ex = extract_block(gm, b)
                except _Skip as e:
                    notes.append(f"block {b.id} keeps its activations: {e}")
                    continue
                module = StoredInputBlock(ex.build(gm, ex.sides, whole=True), b.id, ex.random)
                plans.append((b.entry, b.exit, b.nodes, f"stored{existing + k}", module, ex.sides,
                              {"kind": "stored", "blocks": [b.id], "before": sum((costs[n].act_bytes
                                                                                  for n in b.nodes), 0),
                               "after": tensor_bytes(b.entry)}))
        for i in install(gm, plans):
            _, _, _, name, _, sides, rec = plans[i]
            rec["module"], rec["side_inputs"] = name, [s.name for s in sides]
        converted = [p[6] for p in plans if p[6]["kind"] == "chain"]
        stored = [p[6] for p in plans if p[6]["kind"] == "stored"]
        before = after = 0.0
        for rec in converted + stored:
            b_v, a_v = evaluate(rec["before"], values), evaluate(rec["after"], values)
            before, after = before + b_v, after + a_v
            what = (f"blocks {', '.join(rec['blocks'])} -> {rec['coupling']}" if rec["kind"] == "chain"
                    else f"block {rec['blocks'][0]} keeps only its input")
            notes.append(f"{rec['module']}: {what}; activations kept for backward {b_v / 2**20:.2f} MiB -> "
                         f"{a_v / 2**20:.2f} MiB at the example (symbolic: {rec['before']} -> {rec['after']})")
            rec["before"], rec["after"] = str(rec["before"]), str(rec["after"])
        if plans:
            drop_unused_attrs(gm)
            total_acts = evaluate(sum((c.act_bytes for c in costs.values()), 0), values)
            notes.append(f"predicted activation memory of the whole model: {total_acts / 2**20:.2f} MiB -> "
                         f"{(total_acts - before + after) / 2**20:.2f} MiB (cost model: bytes of every "
                         f"activation; a reversible chain keeps its final two-tensor state, a stored-input "
                         f"block its input)")
        else:
            notes.append("no chain of invertible residual blocks found")
        return PassResult(gm, bool(plans), notes, {"chains": converted, "stored_input_blocks": stored})


def extract_runs(gm: Any, chains: list, notes: list[str], random_ok: bool = True) -> list[list]:
    """The chains as runs of (block, extracted) that can stand alone; a block that cannot ends its
    run (the reason goes to ``notes``). ``random_ok=False`` also refuses blocks that draw random
    numbers (a backward that re-runs them would draw others)."""
    runs: list[list] = []
    for chain in chains:
        kept: list = []
        for b in chain:
            try:
                ex = extract_block(gm, b)
                if ex.random and not random_ok:
                    raise _Skip("it draws random numbers (dropout); the backward's re-run would draw others")
                kept.append((b, ex))
            except _Skip as e:
                notes.append(f"block {b.id} not converted: {e}")
                runs.append(kept)
                kept = []
        runs.append(kept)
    return [r for r in runs if r]


def _ordered_union(lists: list[list]) -> list:
    seen, out = set(), []
    for xs in lists:
        for x in xs:
            if x not in seen:
                seen.add(x)
                out.append(x)
    return out


class _Extracted:
    """One block's residual function, ready to become a GraphModule taking (x, *sides)."""

    def __init__(self, block: Any, main: Any, sides: list, sizes: dict, random: bool, clone_input: bool):
        self.block, self.main, self.sides, self.sizes = block, main, sides, sizes
        self.random, self.clone_input = random, clone_input

    def build(self, gm: Any, sides: list, whole: bool = False, post_act: bool = True) -> Any:
        """f(x, *sides) as a GraphModule: the residual function, or with ``whole`` the entire block.

        ``post_act=False`` leaves out an activation after the addition (Highway keeps it in r)."""
        import torch.fx as fx

        from ..ir.subgraph import arg_lookup

        b = self.block
        graph = fx.Graph()
        x = graph.placeholder("x")
        x.meta = dict(b.entry.meta)
        env: dict = {}
        for s in sides:
            p = graph.placeholder(s.name)
            p.meta = dict(s.meta)
            env[s] = p
        start = graph.call_method("clone", (x,)) if self.clone_input else x
        env[b.entry] = start

        # sizes the block reads from outside are re-read from its input x
        lookup = arg_lookup(graph, env, lambda n: [(b.entry, d) for _, d in self.sizes.get(n, [])]
                            if n in self.sizes else None, getattr(gm, "_in_spec", None) is not None,
                            f"block {b.id}")

        if whole:
            for n in b.nodes_in_order:
                env[n] = graph.node_copy(n, lookup)
            out = env[b.exit]
        else:
            for n in b.body:
                env[n] = graph.node_copy(n, lookup)
            out = env[self.main]
            if b.post_act is not None and post_act:  # the activation after the addition moves into f
                out = graph.node_copy(b.post_act, lambda a: env[self.main] if a is b.add else lookup(a))
        graph.output(out)
        f = fx.GraphModule(gm, graph, class_name="ResidualFunction")
        f.meta.update({k: v for k, v in gm.meta.items() if k.startswith("gx_")})
        return f


def extract_block(gm: Any, block: Any) -> _Extracted:
    """Check that a block can stand alone as f(x, *sides) and collect what it needs."""
    import torch

    from ..ir.analysis import size_source
    from ..ir.match import draws_random

    inside = set(block.nodes)
    skip_end = block.skip[-1] if block.skip else block.entry
    main = next(a for a in block.add.args[:2] if a is not skip_end)
    for n in block.body + block.skip:
        outside = [u for u in n.users if u not in inside]
        if outside:
            raise _Skip(f"'{n.name}' inside it is also used by '{outside[0].name}' outside the block")
    if block.post_act is not None and len(block.add.users) != 1:
        raise _Skip("the value before its activation is used elsewhere")
    sides, sizes = [], {}
    for n in block.nodes:
        for a in n.all_input_nodes:
            if a in inside or a is block.entry or a.op == "get_attr":
                continue
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                if a not in sides:
                    sides.append(a)
                continue
            source = size_source(val, [block.entry])
            if source is None:
                raise _Skip(f"it reads '{a.name}', which is neither a tensor nor a size of its input")
            sizes[a] = source
    random = any(draws_random(n, gm) for n in block.nodes)
    clone = any(_mutates(n, gm) and n.args and n.args[0] is block.entry for n in block.body)
    return _Extracted(block, main, sides, sizes, random, clone)


def _mutates(node: Any, gm: Any) -> bool:
    """Whether a node writes into its first argument (ReLU(inplace=True), x.relu_(), x += y)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.kwargs.get("inplace"):
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return bool(schema.arguments) and schema.arguments[0].alias_info is not None and \
                schema.arguments[0].alias_info.is_write
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") or name in ("iadd", "isub", "imul", "itruediv")
    return False


def install(gm: Any, plans: list) -> list[int]:
    """Put each plan ``(entry, exit, nodes, name, module, sides, ...)`` in the graph, in graph order,
    as ``call_module(name, (entry, *sides))`` in place of its nodes; returns the plans' indices in
    that order. Build every module before calling it: an entry (or side input) may be the exit of a
    run replaced before it, and is followed to its replacement."""
    renamed: dict = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = sorted(range(len(plans)), key=lambda i: order[plans[i][1]])
    for i in done:
        entry, exit_node, nodes, name, module, sides = plans[i][:6]
        gm.add_submodule(name, module)
        renamed[exit_node] = replace_chain(gm, renamed.get(entry, entry), exit_node, nodes, name,
                                           [renamed.get(s, s) for s in sides])
    return done


def replace_chain(gm: Any, entry: Any, exit_node: Any, nodes: list, name: str, sides: list) -> Any:
    """Put ``call_module(name, (entry, *sides))`` in place of the chain's nodes."""
    graph = gm.graph
    with graph.inserting_after(exit_node):
        new = graph.call_module(name, (entry, *sides))
    members = set(nodes)
    exit_node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new and u not in members)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    return new


def tensor_bytes(node: Any) -> Any:
    """Bytes of the tensor a node produces, named in B/T (views included: they are what is kept)."""
    from ..ir import analysis
    from ..ir.cost import named

    return named(analysis.tensor_bytes(node), node.graph.owning_module)


def drop_unused_attrs(gm: Any) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
