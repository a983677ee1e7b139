"""What is in a graph: residual blocks, reversible chains, and where a pipeline may be cut.

A *residual block* is an addition ``y = skip + f(x)`` whose two operands fork from one *entry* value
``x``: with an identity skip (``skip`` is ``x``), or a short projection skip (``skip`` is one to three
layers such as a strided 1x1 conv + BN applied to ``x``). ``act(y)`` right after the addition belongs
to the block (a post-activation ResNet). Only identity-skip blocks that keep their input's shape can
be made reversible; the others are reported with the reason.

A *cut point* is a position in the node order where the graph may be split into pipeline stages. It
is valid when every value crossing it is a tensor (or a size that can be re-read from a crossing
tensor's shape), when it does not fall inside a residual block, and when no buffer is used on both
sides of it. A parameter used on both sides (tied embeddings) does not forbid the cut: each stage
gets its own copy and the cut records it in ``tied``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from .cost import named, to_expr
from .match import ACTIVATIONS, op_kind, scope

# Layers that may form a projection skip (ResNet's downsample: conv + BN, or pool + conv + BN).
_SKIP_LAYERS = frozenset({"conv", "batch_norm", "avg_pool", "max_pool", "linear", "layer_norm",
                          "group_norm", "view", "identity"})
_MAX_SKIP_LEN = 3


@dataclass
class ResidualBlock:
    id: str
    entry: fx.Node
    add: fx.Node
    exit: fx.Node
    body: list[fx.Node]
    skip: list[fx.Node]
    post_act: fx.Node | None
    invertible: bool
    reason: str = ""

    @property
    def nodes(self) -> list[fx.Node]:
        """Every node of the block: body, skip path, addition, post-activation."""
        extra = [self.add] + ([self.post_act] if self.post_act is not None else [])
        return self.body + self.skip + extra

    @property
    def nodes_in_order(self) -> list[fx.Node]:
        members = set(self.nodes)
        return [n for n in self.add.graph.nodes if n in members]


@dataclass
class CutPoint:
    index: int            # the cut is just before order[index]
    after: str            # name of the last node before the cut
    crossing: list[fx.Node]
    bytes: sympy.Expr     # bytes crossing, symbolic in B/T
    valid: bool
    reason: str = ""
    tied: list[str] = field(default_factory=list)  # parameters used on both sides: copied per stage


@dataclass
class Analysis:
    order: list[fx.Node]                        # compute nodes in graph order
    blocks: list[ResidualBlock]
    chains: list[list[ResidualBlock]]           # maximal runs of invertible blocks
    cuts: list[CutPoint] = field(default_factory=list)
    rejected: list[tuple[ResidualBlock, str]] = field(default_factory=list)  # nested/overlapping matches

    @property
    def valid_cuts(self) -> list[CutPoint]:
        return [c for c in self.cuts if c.valid]


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that compute (not placeholders, attributes or the output), in graph order."""
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


def _is_activation(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor)


def _ancestors(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], dict[fx.Node, int], list[fx.Node]]:
    """Ancestor sets as bitsets over the graph order (Python ints: fast unions)."""
    nodes = list(gm.graph.nodes)
    bit = {n: 1 << i for i, n in enumerate(nodes)}
    anc: dict[fx.Node, int] = {}
    for n in nodes:
        a = 0
        for p in n.all_input_nodes:
            a |= anc[p] | bit[p]
        anc[n] = a
    return anc, bit, nodes


def _data_inputs(node: fx.Node, data: set[fx.Node]) -> list[fx.Node]:
    return [p for p in node.all_input_nodes if p in data]


def find_blocks(gm: fx.GraphModule, rejected_out: list | None = None) -> list[ResidualBlock]:
    """Residual blocks in graph order; nested or overlapping matches go to ``rejected_out`` with why."""
    anc, bit, nodes = _ancestors(gm)
    # 'data' values depend on a model input (not parameters or constants alone).
    data: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(p in data for p in n.all_input_nodes):
            data.add(n)
    blocks: list[ResidualBlock] = []
    for node in nodes:
        if node.op == "output" or op_kind(node, gm) != "add":
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or not all(o in data and _is_activation(o) for o in operands):
            continue
        found = _match_residual(node, operands, gm, anc, bit, data)
        if found is not None:
            blocks.append(found)
    blocks, rejected = _resolve_nesting(blocks)
    _name_blocks(blocks)
    _name_blocks([b for b, _ in rejected])
    if rejected_out is not None:
        rejected_out.extend(rejected)
    return blocks


def _resolve_nesting(blocks: list[ResidualBlock]) -> tuple[list[ResidualBlock], list[tuple[ResidualBlock, str]]]:
    """Keep blocks that neither lie inside another block nor partly overlap one.

    An addition inside a block's body may fork from one value too: GPT-2's tanh GELU computes
    ``x + 0.044715 x^3`` inside the MLP's residual block. The outer block is the model's residual
    connection (a pass that rewrites it rewrites everything inside); the inner one is dropped. Two
    blocks that share nodes without one containing the other cannot both be rewritten: neither is kept.
    """
    members = [set(b.nodes) for b in blocks]
    keep = [True] * len(blocks)
    why = [""] * len(blocks)
    for i, inner in enumerate(blocks):
        for j, outer in enumerate(blocks):
            if i == j or not members[i] & members[j]:
                continue
            if members[i] < members[j]:
                keep[i], why[i] = False, f"nested inside the block ending at {outer.add.name}"
            elif not members[j] < members[i]:
                keep[i], why[i] = False, f"overlaps the block ending at {outer.add.name}"
    rejected = [(b, w) for b, k, w in zip(blocks, keep, why) if not k]
    for b, w in rejected:
        b.invertible, b.reason = False, w
    return [b for b, k in zip(blocks, keep) if k], rejected


def _match_residual(add: fx.Node, operands: list[fx.Node], gm: fx.GraphModule,
                    anc: dict, bit: dict, data: set) -> ResidualBlock | None:
    best = None
    for skip_end, main in (operands, operands[::-1]):
        # Walk up the skip operand through single-input layers until reaching an ancestor of main.
        path: list[fx.Node] = []
        cur = skip_end
        for _ in range(_MAX_SKIP_LEN + 1):
            if anc[main] & bit[cur]:
                if best is None or len(path) < len(best[2]):
                    best = (cur, main, list(reversed(path)))
                break
            ins = _data_inputs(cur, data)
            if len(ins) != 1 or op_kind(cur, gm) not in _SKIP_LAYERS:
                break
            path.append(cur)
            cur = ins[0]
    if best is None:
        return None
    entry, main, skip = best
    entry_val, out_val = entry.meta.get("val"), add.meta.get("val")
    skip_val = (skip[-1] if skip else entry).meta.get("val")
    if not (isinstance(entry_val, torch.Tensor) and entry_val.is_floating_point()):
        return None  # e.g. token ids feeding both a token and a position embedding
    if not isinstance(skip_val, torch.Tensor) or tuple(skip_val.shape) != tuple(out_val.shape):
        return None  # a broadcast addend (an attention mask, a bias) is not a skip connection
    # Body: everything on a path entry -> main (main included), excluding the skip path.
    body = [n for n in bit if (anc[main] & bit[n] or n is main) and anc[n] & bit[entry]
            and n not in skip and n is not entry]
    inside = set(body)
    # Side-effect tails (an exported BatchNorm's copy_ into its running statistics) belong to the block.
    allowed = inside | {entry}
    tails = {u for n in body for u in n.users if not u.users and u is not add and u.op == "call_function"
             and all(p in allowed or p.op == "get_attr" for p in u.all_input_nodes)}
    if tails:
        body = [n for n in bit if n in inside or n in tails]
        inside = set(body)
    if not body or any(u in inside and op_kind(u, gm) == "add" for u in entry.users):
        # The entry is added in again inside the body: a value reused across layers (a mask
        # reaching this layer through the previous ones), not this block's input.
        return None
    post_act = None
    users = list(add.users)
    if len(users) == 1 and op_kind(users[0], gm) in ACTIVATIONS:
        post_act = users[0]
    invertible, reason = True, ""
    if skip:
        invertible = False
        reason = "projection skip through " + ", ".join(f"{scope(n) or n.name} ({op_kind(n, gm)})" for n in skip)
    elif tuple(entry_val.shape) != tuple(out_val.shape):
        invertible, reason = False, "output shape differs from input shape"
    return ResidualBlock(id="", entry=entry, add=add, exit=post_act or add, body=body, skip=skip,
                         post_act=post_act, invertible=invertible, reason=reason)


def _name_blocks(blocks: list[ResidualBlock]) -> None:
    """Name each block by the longest module path its layers share (``layer1.0``)."""
    for b in blocks:
        scopes = [s.split(".") for s in (scope(n) for n in b.body) if s]
        prefix: list[str] = []
        if scopes:
            for parts in zip(*scopes):
                if len(set(parts)) != 1:
                    break
                prefix.append(parts[0])
        b.id = ".".join(prefix) or b.add.name
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.id] = counts.get(b.id, 0) + 1
    seen: dict[str, int] = {}
    for b in blocks:
        if counts[b.id] > 1:  # e.g. a transformer layer's attention and MLP sub-blocks
            i = seen.get(b.id, 0)
            seen[b.id] = i + 1
            b.id = f"{b.id}[{i}]"


def find_chains(blocks: list[ResidualBlock]) -> list[list[ResidualBlock]]:
    """Maximal runs of invertible blocks, each starting where the previous one ends."""
    chains: list[list[ResidualBlock]] = []
    current: list[ResidualBlock] = []
    for b in blocks:
        if not b.invertible:
            if current:
                chains.append(current)
            current = []
            continue
        if current and not (b.entry is current[-1].exit and _only_feeds(current[-1].exit, b)):
            chains.append(current)
            current = []
        current.append(b)
    if current:
        chains.append(current)
    return chains


def _only_feeds(value: fx.Node, block: ResidualBlock) -> bool:
    inside = set(block.nodes)
    return all(u in inside for u in value.users)


def find_cuts(gm: fx.GraphModule, order: list[fx.Node], blocks: list[ResidualBlock]) -> list[CutPoint]:
    pos = {n: i for i, n in enumerate(order)}
    end = len(order)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            pos[n] = -1
        elif n.op == "output":
            pos[n] = end

    def last_use(n: fx.Node) -> int:
        return max((pos[u] for u in n.users if u in pos), default=pos[n])

    # Positions strictly inside a block (between its first node and its exit) are not valid cuts.
    inside = [0] * (end + 1)
    for b in blocks:
        first = min(pos[n] for n in b.nodes if n in pos)
        for i in range(first + 1, pos[b.exit] + 1):
            inside[i] = 1
    # A parameter used on both sides of a cut (tied weights, a layer called twice) gets a copy in each
    # stage, the copies' gradients summed before every update (StagedModule.tied). A buffer cannot
    # be shared that way: BatchNorm statistics updated in two stages would drift apart.
    uses: dict[int, tuple[str, list[int]]] = {}
    buffer_ids = {id(b) for b in gm.buffers()}
    for n in gm.graph.nodes:
        for key, name in _state_of(n, gm, buffer_ids):
            at = [pos[u] for u in n.users if u in pos] if n.op == "get_attr" else [pos[n]]
            uses.setdefault(key, (name, []))[1].extend(at)
    spans = [(min(at), max(at), name, key in buffer_ids) for key, (name, at) in uses.items()
             if at and min(at) != max(at)]
    attr_span = [(lo, hi, name) for lo, hi, name, buffer in spans if buffer]
    tied_span = [(lo, hi, name) for lo, hi, name, buffer in spans if not buffer]

    live: list[fx.Node] = [n for n in gm.graph.nodes if n.op == "placeholder"]
    cuts: list[CutPoint] = []
    for i in range(1, end):
        node = order[i - 1]
        live.append(node)
        live = [v for v in live if last_use(v) >= i]
        crossing = [v for v in live if v.users]
        reason = ""
        if inside[i]:
            reason = "inside a residual block"
        else:
            shared = next((k for lo, hi, k in attr_span if lo < i <= hi), None)
            if shared is not None:
                reason = f"buffer '{shared}' is used on both sides (a copy per stage would drift apart)"
            else:
                bad = [v for v in crossing if not _carriable(v, crossing)]
                if bad:
                    reason = f"'{bad[0].name}' is not a tensor"
        nbytes = sum((tensor_bytes(v) for v in crossing), sympy.Integer(0))
        tied = [k for lo, hi, k in tied_span if lo < i <= hi]
        cuts.append(CutPoint(i, node.name, crossing, named(nbytes, gm), not reason, reason, tied))
    return cuts


def _state_of(node: fx.Node, gm: fx.GraphModule, buffer_ids: set[int]) -> list[tuple[int, str]]:
    """(identity, name) of each parameter or buffer the node reads; tied weights share an identity."""
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        is_state = isinstance(obj, torch.nn.Parameter) or id(obj) in buffer_ids
        return [(id(obj), str(node.target))] if is_state else []
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        named = list(mod.named_parameters()) + list(mod.named_buffers())
        return [(id(t), f"{node.target}.{k}") for k, t in named]
    return []


def tensor_bytes(v: fx.Node) -> sympy.Expr:
    """Bytes of the tensor a node produces (0 for non-tensors), in the shape environment's symbols."""
    val = v.meta.get("val")
    if isinstance(val, torch.Tensor):
        shape = [to_expr(s) for s in val.shape]
        return sympy.Mul(*shape) * val.element_size() if shape else sympy.Integer(val.element_size())
    return sympy.Integer(0)


def _carriable(v: fx.Node, crossing: list[fx.Node]) -> bool:
    val = v.meta.get("val")
    if isinstance(val, torch.Tensor):
        return True
    if val is None and v.op == "placeholder":
        return True  # an optional input left at its default (None)
    return size_source(val, crossing) is not None


def size_source(val: Any, crossing: list[fx.Node]) -> list[tuple[fx.Node, int]] | None:
    """How to re-read an int (a size) from crossing tensors: [(tensor, dim)] whose product it is.

    Sizes such as the sequence length flow through a graph as ints; a stage that needs one re-reads
    it from a tensor it receives, instead of sending a Python int between processes.
    """
    if isinstance(val, int) and not isinstance(val, bool):
        return []  # a constant: nothing to carry
    if not isinstance(val, torch.SymInt):
        return None
    target = to_expr(val)
    dims = [(t, d, to_expr(t.meta["val"].shape[d])) for t in crossing
            if isinstance(t.meta.get("val"), torch.Tensor) for d in range(t.meta["val"].dim())]
    for t, d, e in dims:
        if e == target:
            return [(t, d)]
    # a product of two sizes (B*T), common in attention reshapes
    for t1, d1, e1 in dims:
        for t2, d2, e2 in dims:
            if (t1, d1) != (t2, d2) and sympy.expand(e1 * e2 - target) == 0:
                return [(t1, d1), (t2, d2)]
    return None


def analyse(gm: fx.GraphModule) -> Analysis:
    """Blocks, chains and cut points of a graph whose nodes carry ``meta['val']``."""
    order = compute_nodes(gm)
    rejected: list[tuple[ResidualBlock, str]] = []
    blocks = find_blocks(gm, rejected)
    return Analysis(order=order, blocks=blocks, chains=find_chains(blocks),
                    cuts=find_cuts(gm, order, blocks), rejected=rejected)
