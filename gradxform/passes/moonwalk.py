"""``moonwalk``: reversible couplings, then the model's chain(s) of layers marked for the Moonwalk engine.

After ``reversible`` has turned residual chains into couplings, the graph is cut at every point where
a single tensor carries the model forward (plus side inputs computed before, such as an attention mask).
Each maximal run of such pieces becomes one ``MoonwalkChain`` whose backward is Moonwalk
(docs/methods.md §4); each piece is classified by how its cotangent is carried forward: invertible (a
coupling, a view), submersive with a right inverse (a selection or disjoint pooling, a Linear with
out <= in by least squares, a strided convolution by conjugate gradients), a fragmental checkpoint
(ReLU masks, BatchNorm's 2 scalars per channel, LayerNorm's 2 per row, the whole cotangent of a
dimension-raising layer or of a block that is not a chain), or, where none applies, a stored-input block
with exact gradients between two chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..errors import GradxformError
from .base import Pass, PassResult, option, register

_DIAG = {"relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "LeakyReLU", "leaky_relu", "ELU", "elu",
         "Softplus", "softplus", "Hardtanh", "hardtanh", "Mish", "mish"}
_MONOTONE = {"tanh", "sigmoid", "LeakyReLU", "leaky_relu", "ELU", "elu", "Softplus", "softplus"}
_VIEWS = {"view", "reshape", "flatten", "Flatten", "unflatten", "transpose", "permute", "t", "squeeze", "unsqueeze",
          "contiguous", "clone", "Identity", "alias", "_unsafe_view", "getitem", "select", "slice"}
_RANDOM = ("bernoulli", "rand", "randn", "rand_like", "randn_like", "randint", "normal", "multinomial",
           "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout", "native_dropout")


@dataclass
class MoonwalkOptions:
    mode: Literal["mixed", "forward", "naive", "autograd"] = option(
        "mixed", "how g_0 and the fragments are found: mixed (a reverse sweep of input cotangents), forward "
                 "(JVPs along input directions), naive (forward-mode baseline, quadratic in depth), autograd "
                 "(the same architecture trained by ordinary backprop)")
    anchors: Literal["recompute", "store"] = option(
        "recompute", "mixed mode, the inputs of pieces that cannot be inverted: recomputed from the chain's input "
                     "in the reverse sweep (the last one is kept: rebuilding it would cost a whole forward), or "
                     "all stored by the forward")
    fragments: bool = option(True, "keep the cotangent parts a non-submersive piece erases (ReLU masks, BatchNorm's "
                                   "2 scalars per channel, whole cotangents); false: such pieces store their input")
    coupling: Literal["leapfrog", "momentum"] = option("leapfrog", "how reversible's two-tensor state is coupled")
    gamma: float = option(0.9, "momentum coupling: the velocity's decay")
    merge: Literal["first", "mean"] = option("first", "leapfrog: how the two streams leave a chain")
    min_blocks: int = option(1, "make reversible only chains with at least this many invertible blocks")
    low_precision: Literal["refuse", "warn"] = option(
        "refuse", "float16/bfloat16 chains: refuse with the drift measured on the example, or warn and compile")
    chunk: int = option(256, "forward and naive modes: tangents per batched JVP")

    def validate(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if self.min_blocks < 1:
            raise ValueError("min_blocks must be at least 1")
        if self.chunk < 1:
            raise ValueError("chunk must be at least 1")


@dataclass
class _Piece:
    nodes: list          # graph nodes, in order
    h_in: Any            # the carried tensor it reads
    h_out: Any           # the node producing the carried tensor
    sides: list          # side inputs it reads (nodes computed before the chain)
    name: str = ""
    rule: str = ""
    spec: dict | None = None
    why: str = ""
    module: Any = None


@register
class Moonwalk(Pass):
    """Train the model by Moonwalk: reversible couplings, then chains whose backward is Moonwalk.

    Architecture changes as in ``reversible`` (the couplings); every other layer computes what it did.
    ``loss.backward()`` on the result runs the engine: the ``moonwalk`` schedule trains it (backprop's
    tick table; it checks that the model holds a MoonwalkChain and may override the sweep's mode).
    """

    name = "moonwalk"
    summary = "reversible couplings + chains whose backward is Moonwalk (exact gradients in forward order)"
    Options = MoonwalkOptions
    preserves_function = False
    schedule: ClassVar[str] = "moonwalk"

    def run(self, gm: Any, ctx: Any) -> PassResult:
        from ..ir.analysis import analyse
        from ..nn.moonwalk import LOW_PRECISION, MoonwalkChain
        from ..nn.reversible import ReversibleChain, StoredInputBlock
        from .reversible import Reversible, ReversibleOptions, drop_unused_attrs, install

        opts = self.options
        if any(isinstance(m, MoonwalkChain) for m in gm.modules()):
            return PassResult(gm, False, ["the model already has Moonwalk chains: nothing to do"])
        rev = Reversible(ReversibleOptions(coupling=opts.coupling, gamma=opts.gamma, merge=opts.merge,
                                           min_blocks=opts.min_blocks, store_inputs=False)).run(gm, ctx)
        notes = [f"reversible: {n}" for n in rev.notes if not n.startswith("predicted activation memory")]
        gm = rev.module
        if rev.changed:
            gm.recompile()
            for n in gm.graph.nodes:  # a chain's output has its input's shape: no need to propagate again
                if n.op == "call_module" and "val" not in n.meta and isinstance(gm.get_submodule(n.target),
                                                                                ReversibleChain):
                    n.meta["val"] = n.args[0].meta["val"]
        an = analyse(gm)
        regions = _regions(gm, an)
        exported = getattr(gm, "_in_spec", None) is not None
        for region in regions:
            for k, p in enumerate(region):
                p.name = _piece_name(gm, p, k)
                if len(p.nodes) == 1 and p.nodes[0].op == "call_module" and isinstance(
                        gm.get_submodule(p.nodes[0].target), ReversibleChain):
                    p.rule, p.module = "coupling", gm.get_submodule(p.nodes[0].target)
                    p.why = f"{p.module.coupling.describe()} over {', '.join(p.module.names)}"
                else:
                    p.rule, p.spec, p.why = _classify(gm, p)
        # pieces that cannot be carried become stored-input blocks and split their chain
        chains: list[list[_Piece]] = []
        stored: list[list[_Piece]] = []
        for region in regions:
            run: list[_Piece] = []
            blocked: list[_Piece] = []
            for p in region:
                stops = p.rule == "stored" or (not opts.fragments and _needs_fragment(p))
                if stops:
                    if run:
                        chains.append(run)
                    run = []
                    blocked.append(p)
                    continue
                if blocked:
                    stored.append(blocked)
                blocked = []
                run.append(p)
            if run:
                chains.append(run)
            if blocked:
                stored.append(blocked)
        useful = [c for c in chains if any(_useful(p) for p in c)]
        if not useful:
            raise _nothing_to_carry(regions, rev, opts)
        for c in chains:
            if c not in useful and any(n.op == "call_module" or any(a.op == "get_attr" for a in n.all_input_nodes)
                                       for p in c for n in p.nodes):
                notes.append(f"layers {c[0].name} .. {c[-1].name} left as they are: nothing in them carries a "
                             f"cotangent forward")
        plans = []
        existing = sum(1 for n, _ in gm.named_children() if n.startswith("moonwalk"))
        existing_stored = sum(1 for n, _ in gm.named_children() if n.startswith("stored"))
        for k, c in enumerate(useful):
            sides = _ordered([s for p in c for s in p.sides])
            pieces = []
            for p in c:
                pieces.append(p.module if p.rule == "coupling" else _build(gm, p.nodes, p.h_in, p.h_out, p.sides,
                                                                           exported, p.name))
            for piece in pieces:
                for g in ([piece] if not isinstance(piece, ReversibleChain) else list(piece.blocks)):
                    _vmap_safe(g)
            module = MoonwalkChain(pieces, [p.rule for p in c], [p.name for p in c], [p.spec or {} for p in c],
                                   [[sides.index(s) for s in p.sides] for p in c], mode=opts.mode,
                                   anchors=opts.anchors, chunk=opts.chunk)
            plans.append((c[0].h_in, c[-1].h_out, [n for p in c for n in p.nodes], f"moonwalk{existing + k}", module,
                          sides, c))
        for k, group in enumerate(stored):
            sides = _ordered([s for p in group for s in p.sides])
            block = _build(gm, [n for p in group for n in p.nodes], group[0].h_in, group[-1].h_out, sides, exported,
                           group[0].name)
            random = any(_draws_random(n, gm) for p in group for n in p.nodes)
            plans.append((group[0].h_in, group[-1].h_out, [n for p in group for n in p.nodes],
                          f"stored{existing_stored + k}", StoredInputBlock(block, group[0].name, random), sides, group))
        install(gm, [p[:6] for p in plans])
        drop_unused_attrs(gm)
        gm.recompile()
        for p in plans:  # the new nodes hand on what the runs they replace handed on
            node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == p[3])
            node.meta["val"] = p[1].meta["val"]

        chains_info = []
        measured = _measure(gm, ctx, [p[4] for p in plans if isinstance(p[4], MoonwalkChain)])
        for name, module, c in [(p[3], p[4], p[6]) for p in plans if isinstance(p[4], MoonwalkChain)]:
            dtype = _dtype(c[0].h_in)
            got = measured.get(name, {})
            blocks = []
            for p in c:
                entry = {"block": p.name, "kind": _kind(p), "rule": p.rule, "detail": p.why,
                         "bytes_kept": _bytes_kept(p, got.get("fragment_bytes", {}))}
                blocks.append(entry)
            drift = got.get("drift")
            chains_info.append({"module": name, "mode": opts.mode, "anchors": opts.anchors, "dtype": str(dtype),
                                "blocks": blocks, "drift_at_example": drift, "input_bytes": got.get("input_bytes")})
            notes.append(f"{name}: {len(c)} pieces, {c[0].name} .. {c[-1].name}, backward by Moonwalk "
                         f"(mode={opts.mode}" + (f", anchors={opts.anchors}" if opts.mode == "mixed" else "") + ")")
            for b in blocks:
                kept = "" if b["bytes_kept"] is None else f" ({_show_bytes(b['bytes_kept'])} kept at the example)"
                notes.append(f"  {b['block']}: {b['kind']}: {b['detail']}{kept}")
            if drift is not None:
                notes.append(f"  drift check at the example: the carried cotangent misses the loss gradient by "
                             f"{drift:.2g} (relative)")
            if dtype in LOW_PRECISION:
                figure = f"{drift:.2g}" if drift is not None else "unmeasured"
                if opts.low_precision == "refuse":
                    raise GradxformError(
                        f"Moonwalk chain {name} runs in {str(dtype).replace('torch.', '')}: on the example inputs "
                        f"the carried cotangent misses the loss gradient by {figure} (relative), against about "
                        f"1e-7 in float32", where=f"pass 'moonwalk', chain {c[0].name} .. {c[-1].name}",
                        hint="compile the model in float32, or pass moonwalk{low_precision=warn} to train anyway")
                import warnings

                warnings.warn(f"moonwalk: {name} runs in {dtype}; drift at the example {figure}", stacklevel=2)
                notes.append(f"  low precision ({dtype}): compiled anyway (low_precision=warn); drift {figure}")
        stored_info = []
        for name, module, group in [(p[3], p[4], p[6]) for p in plans if isinstance(p[4], StoredInputBlock)]:
            why = "; ".join(f"{p.name}: {p.why}" for p in group)
            reason = "fragments are off" if not opts.fragments and all(p.rule != "stored" for p in group) else why
            stored_info.append({"module": name, "blocks": [p.name for p in group], "reason": reason})
            notes.append(f"{name}: stored input ({', '.join(p.name for p in group)}): {reason}; exact gradients by "
                         f"recompute")
        if opts.mode == "forward":
            notes.append("forward mode: no reverse sweep; g_0 and every fragment come from batched JVPs, one per "
                         "dimension they cover (see each block)")
        info = {"chains": chains_info, "stored_input_blocks": stored_info, "schedule": self.schedule}
        return PassResult(gm, True, notes, info)


# ---------------------------------------------------------------------------------- finding chains


def _is_tensor(n: Any) -> bool:
    import torch

    return isinstance(n.meta.get("val"), torch.Tensor)


def _is_float(n: Any) -> bool:
    import torch

    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _dtype(n: Any) -> Any:
    return n.meta["val"].dtype


def _ordered(xs: list) -> list:
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _regions(gm: Any, an: Any) -> list[list[_Piece]]:
    """Maximal runs of pieces, each reading the previous one's tensor (and side inputs from before the run).

    Pieces lie between valid cut points; a stretch that reads nothing of the carried tensor (the class
    token expanded to the batch) or hands on no tensor (a size) is merged into the piece after it.
    """
    order = an.order
    pos = {n: i for i, n in enumerate(order)}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            pos[n] = -1
    cuts = {c.index: c for c in an.cuts}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    bounds = [0] + [i for i in range(1, len(order)) if not cuts[i].reason or "used on both sides" in
                    cuts[i].reason] + [len(order)]

    def crossing(i: int) -> list:
        if i == 0:
            return [n for n in gm.graph.nodes if n.op == "placeholder" and n.users]
        if i == len(order):
            return list(output.all_input_nodes)
        return list(cuts[i].crossing)

    regions: list[list[_Piece]] = []
    current: list[_Piece] = []
    start = 0

    def close() -> None:
        nonlocal current
        while current:  # nothing made inside the run but its last tensor may be read after it
            end = pos[current[-1].nodes[-1]] + 1
            if not [v for v in crossing(end) if pos.get(v, -1) >= start and v is not current[-1].h_out]:
                break
            current.pop()
        if current:
            regions.append(current)
        current = []

    k = 0
    while k < len(bounds) - 1:
        lo = bounds[k]
        piece = None
        for j in range(k + 1, len(bounds)):
            hi = bounds[j]
            nodes = order[lo:hi]
            inside = set(nodes)
            ins = [v for v in crossing(lo) if any(v in n.all_input_nodes for n in nodes)]
            outs = [v for v in crossing(hi) if v in inside]
            tensors = [v for v in outs if _is_tensor(v)]
            first = nodes[0]
            entry = first.args[0] if len(nodes) == 1 and first.op == "call_module" and first.args else None
            if current:
                h = current[-1].h_out
            else:
                floats = [v for v in ins if _is_float(v)]
                h = entry if entry in floats else floats[0] if len(floats) == 1 else None
            if not tensors or (h is not None and h in crossing(hi)):
                continue  # hands on no tensor, or still needs the carried one: merge with the next stretch
            if h is None or h not in ins or len(tensors) != 1 or not _is_float(tensors[0]):
                break
            sides = [v for v in ins if v is not h and _is_tensor(v)]
            if (entry is None or entry is h) and (not current or all(pos.get(v, -1) < start for v in sides)):
                piece = _Piece(nodes, h, tensors[0], sides)
            break
        if piece is None:
            if current:
                close()
                continue  # the same stretch may start the next run
            k += 1
            continue
        if not current:
            start = lo
        current.append(piece)
        k = bounds.index(pos[piece.nodes[-1]] + 1)
    close()
    return regions


def _piece_name(gm: Any, p: _Piece, k: int) -> str:
    from ..ir.match import scope

    if len(p.nodes) == 1 and p.nodes[0].op == "call_module":
        return str(p.nodes[0].target)
    scopes = [scope(n) for n in p.nodes if scope(n)]
    if scopes:
        parts = [s.split(".") for s in scopes]
        prefix = []
        for xs in zip(*parts):
            if len(set(xs)) != 1:
                break
            prefix.append(xs[0])
        if prefix:
            return ".".join(prefix)
    return p.h_out.name


# ---------------------------------------------------------------------------------- classifying pieces


def _numel(n: Any) -> int:
    from ..ir.meta import concrete

    v = n.meta["val"]
    total = 1
    for s in v.shape:
        total *= concrete(s)
    return total


def _depends(gm: Any, p: _Piece) -> list:
    """The piece's tensor nodes that depend on its carried input."""
    reach = {p.h_in}
    out = []
    for n in p.nodes:
        if any(a in reach for a in n.all_input_nodes):
            reach.add(n)
            if _is_tensor(n):
                out.append(n)
    return out


def _draws_random(n: Any, gm: Any) -> bool:
    from ..ir.match import op_kind, raw_name

    return op_kind(n, gm) == "dropout" or raw_name(n, gm) in _RANDOM


def _attr_path(gm: Any, node: Any, arg: Any, attr: str) -> str | None:
    """The piece-relative path of a layer's weight: ``target.attr`` for a module, the get_attr target else."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return f"{node.target}.{attr}" if getattr(mod, attr, None) is not None else None
    if arg is not None and getattr(arg, "op", "") == "get_attr":
        return str(arg.target)
    return None


def _classify(gm: Any, p: _Piece) -> tuple[str, dict, str]:
    """(rule, spec, why) for a piece that is not a coupling."""
    from ..ir.match import op_kind, raw_name

    for n in p.nodes:
        if raw_name(n, gm) in _RANDOM:
            return "stored", {}, f"it draws random numbers ({raw_name(n, gm)}) that Moonwalk cannot replay"
    core = _depends(gm, p)
    n_in, n_out = _numel(p.h_in), _numel(p.h_out)
    random = any(_draws_random(n, gm) for n in p.nodes)
    spec: dict = {"random": random}
    size = f"{n_in} -> {n_out} values"
    if len(core) != 1:
        if core and all(raw_name(n, gm) in _VIEWS or op_kind(n, gm) == "identity" for n in core) and \
                all(_plain_index(n) for n in core) and n_out <= n_in:
            return "isometry", spec, "views and selections: J J^T = I"
        what = "raises the dimension" if n_out > n_in else "is a block, not a chain of layers"
        return "whole", spec, f"it {what} ({size}): its cotangent is kept whole"
    n = core[0]
    kind, raw = op_kind(n, gm), raw_name(n, gm)
    mod = gm.get_submodule(n.target) if n.op == "call_module" else None
    data = [a for a in n.all_input_nodes if a in core or a is p.h_in]
    if raw == "detach":
        return "whole", spec, "it detaches its input: its cotangent is kept whole"
    if kind in ("identity", "view") or raw in _VIEWS:
        if n_out > n_in or not _plain_index(n):
            return "whole", spec, f"it repeats or gathers values ({size}): its cotangent is kept whole"
        return "isometry", spec, ("a view: invertible" if n_out == n_in else f"a selection ({size}): J J^T = I")
    if kind in ("add", "sub") and len(data) == 1:
        return "isometry", spec, "adds a tensor that does not depend on the chain: J = I"
    if kind in ("mul", "div") and len(data) == 1 and n_out == n_in and (kind == "mul" or n.args[0] in data):
        return "diag", spec, "an elementwise scaling: divide by the factor"
    if kind in _DIAG or raw in _DIAG:
        if raw in _MONOTONE or kind in _MONOTONE:
            return "diag", spec, "elementwise and strictly monotone: divide by its derivative"
        return "diag", spec, "elementwise: divide by its derivative; where it vanishes (mask 0) the cotangent is kept"
    if kind == "batch_norm":
        eps = mod.eps if mod is not None else float(n.args[7]) if len(n.args) > 7 else 1e-5
        weight_arg = None if mod is not None else n.args[1]
        spec.update(weight=_attr_path(gm, n, weight_arg, "weight"), eps=eps)
        return "bn", spec, "BatchNorm: in training it erases mean(g) and mean(g x_hat): 2 scalars per channel kept"
    if kind == "layer_norm":
        if mod is not None:
            dims, eps, w = list(mod.normalized_shape), mod.eps, _attr_path(gm, n, None, "weight")
        else:
            dims = list(n.args[1])
            eps = float(n.args[4]) if len(n.args) > 4 else float(n.kwargs.get("eps", 1e-5))
            w = _attr_path(gm, n, n.args[2] if len(n.args) > 2 else n.kwargs.get("weight"), "weight")
        if raw in ("RMSNorm", "rms_norm"):
            return "whole", spec, "RMSNorm: its cotangent is kept whole"
        spec.update(dims=dims, eps=eps, weight=w)
        return "ln", spec, "LayerNorm: erases mean(g w) and mean(g w x_hat): 2 scalars per row kept"
    if kind == "linear":
        w_arg = None if mod is not None else n.args[1]
        weight = _attr_path(gm, n, w_arg, "weight")
        w_val = (mod.weight if mod is not None else w_arg.meta.get("val")) if weight else None
        if w_val is not None and w_val.shape[0] <= w_val.shape[1]:
            spec.update(weight=weight)
            return "linear", spec, (f"Linear {w_val.shape[1]} -> {w_val.shape[0]}: least squares through a "
                                    f"factorisation of W W^T")
        if w_val is not None:
            return "whole", spec, f"Linear {w_val.shape[1]} -> {w_val.shape[0]} raises the dimension: its cotangent is kept whole"
    if kind in ("avg_pool", "max_pool"):
        disjoint = _disjoint_windows(gm, n, mod)
        if disjoint:
            return "isometry", spec, f"pooling with disjoint windows ({size}): J J^T = c I"
        if kind == "avg_pool" and n_out <= n_in:
            return "cg", spec, f"pooling with overlapping windows ({size}): least squares by conjugate gradients"
        return "whole", spec, "max pooling with overlapping windows can route two outputs to one input: its cotangent is kept whole"
    if kind == "conv" and n_out <= n_in:
        return "cg", spec, f"a convolution ({size}): least squares by conjugate gradients"
    what = "raises the dimension" if n_out > n_in else "has no right inverse gradxform knows"
    return "whole", spec, f"'{raw}' {what} ({size}): its cotangent is kept whole"


def _plain_index(n: Any) -> bool:
    """A getitem with ints, slices, None and Ellipsis only (a selection), or any other view."""
    import operator

    if n.op == "call_function" and n.target is operator.getitem:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx)
    return n.target not in ("expand", "repeat", "expand_as")


def _disjoint_windows(gm: Any, n: Any, mod: Any) -> bool:
    from ..ir.meta import concrete

    x, y = n.args[0].meta["val"], n.meta["val"]
    name = type(mod).__name__ if mod is not None else str(getattr(n.target, "__name__", n.target))
    if "adaptive" in name.lower() or "Adaptive" in name:
        return all(concrete(a) % concrete(b) == 0 for a, b in zip(x.shape[2:], y.shape[2:]))
    if mod is not None:
        k, s, pad = mod.kernel_size, mod.stride, mod.padding
    else:
        args = list(n.args) + [None] * 4
        k, s, pad = args[1], args[2] or args[1], args[3] or 0
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    return as_tuple(k) == as_tuple(s) and all(v == 0 for v in as_tuple(pad)) and not getattr(mod, "ceil_mode", False)


def _needs_fragment(p: _Piece) -> bool:
    return p.rule in ("whole", "bn", "ln") or (p.rule == "diag" and "monotone" not in p.why and "scaling" not in p.why)


def _useful(p: _Piece) -> bool:
    """A piece Moonwalk gains from: a coupling, or a submersive piece that lowers the dimension."""
    return p.rule in ("coupling", "linear", "cg") or (p.rule == "isometry" and _numel(p.h_out) < _numel(p.h_in))


def _kind(p: _Piece) -> str:
    if p.rule == "coupling":
        return "invertible"
    if p.rule == "isometry":
        return "invertible" if _numel(p.h_out) == _numel(p.h_in) else "submersive with a right inverse"
    if p.rule in ("linear", "cg"):
        return "submersive with a right inverse"
    if p.rule == "diag" and not _needs_fragment(p):
        return "invertible"
    return "fragmental checkpoint"


def _bytes_kept(p: _Piece, fragment_bytes: dict) -> int | None:
    if p.rule == "coupling":
        return fragment_bytes.get(f"{p.name}.enter")
    if _kind(p) == "fragmental checkpoint":
        return fragment_bytes.get(p.name)
    return None


def _show_bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _nothing_to_carry(regions: list, rev: Any, opts: Any) -> GradxformError:
    pieces = [p for r in regions for p in r]
    first = next((p for p in pieces if not _useful(p)), None)
    skipped = [n.split(": ", 1)[0].replace("block ", "") for n in rev.notes if "not converted" in n]
    if first is None:
        where, why = "the model", "no layer reads one tensor and hands one on"
    else:
        where, why = f"block '{first.name}'", first.why
    hint = ("run `gradxform compile ... --pass reversible` first to see why " + ", ".join(skipped[:3])
            + " could not be made reversible" if skipped else
            "the model has no identity-skip residual block for `reversible` to turn into a coupling")
    if not opts.fragments:
        hint += ", or allow fragmental checkpoints: moonwalk{fragments=true}"
    else:
        hint += "; Moonwalk gains nothing on a chain of layers that all raise the dimension or erase part of " \
                "their cotangent: train it with ordinary backprop"
    return GradxformError(f"moonwalk: the model has no reversible or submersive part: the chain stops at {where}: "
                          f"{why}", where="pass 'moonwalk'", hint=hint)


# ---------------------------------------------------------------------------------- building pieces


def _build(gm: Any, nodes: list, h_in: Any, h_out: Any, sides: list, exported: bool, name: str) -> Any:
    """``piece(x, *sides)`` as a GraphModule."""
    import torch.fx as fx

    from ..ir.analysis import size_source
    from ..ir.subgraph import arg_lookup
    from .reversible import _mutates

    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta = dict(h_in.meta)
    env: dict = {}
    for s in sides:
        ph = graph.placeholder(s.name)
        ph.meta = dict(s.meta)
        env[s] = ph
    # a piece that writes into its input would corrupt the engine's copy of it
    env[h_in] = graph.call_method("clone", (x,)) if any(_mutates(n, gm) and n.args and n.args[0] is h_in
                                                      for n in nodes) else x
    lookup = arg_lookup(graph, env, lambda n: size_source(n.meta.get("val"), [h_in, *sides]), exported,
                        f"piece {name}")
    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[h_out])
    piece = fx.GraphModule(gm, graph, class_name="MoonwalkPiece")
    piece.meta.update({k: v for k, v in gm.meta.items() if k.startswith("gx_")})
    return piece


def _vmap_safe(g: Any) -> None:
    """``aten.sym_size.int`` has no batching rule: read sizes with the tensor method (the logical size)."""
    import torch

    graph = getattr(g, "graph", None)
    if graph is None:
        return
    changed = False
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            with graph.inserting_before(n):
                size = graph.call_method("size", tuple(n.args), dict(n.kwargs))
            size.meta = dict(n.meta)
            n.replace_all_uses_with(size)
            graph.erase_node(n)
            changed = True
    if changed:
        g.recompile()


# ---------------------------------------------------------------------------------- measuring at the example


def _measure(gm: Any, ctx: Any, chains: list) -> dict[str, dict]:
    """One mixed-mode backward on the example inputs (buffers, RNG and gradients untouched): the bytes of
    every fragment, the drift of the carried cotangent, and the chain's input size."""
    import torch
    import torch.utils._pytree as pytree

    from ..state import frozen_buffers

    names = {id(m): n for n, m in gm.named_children()}
    modes = [(c, c.mode) for c in chains]
    inputs: dict[str, int] = {}

    def grab(mod: Any, args: tuple) -> None:
        inputs[names[id(mod)]] = args[0].numel() * args[0].element_size()

    hooks = [c.register_forward_pre_hook(grab) for c in chains]
    try:
        for c in chains:
            c.mode = "mixed"
        with frozen_buffers(gm), torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(ctx.seed)
            out = gm(*ctx.args, **ctx.kwargs)
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            params = [p for p in gm.parameters() if p.requires_grad]
            if leaves and params:
                gen = torch.Generator().manual_seed(0)
                loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum() for t in leaves)
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        for c, mode in modes:
            c.mode = mode
    got = {}
    for c in chains:
        name = names[id(c)]
        got[name] = dict(c.last, input_bytes=inputs.get(name))
        c.drift_log.clear()
        c._calls = 0
    return got
