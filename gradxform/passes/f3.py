"""``f3``: a feedback connector after every block (or stage), for F³ and its baselines DFA, DRTP, LLO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..errors import GradxformError
from .base import Pass, PassResult, option, register

ErrorKind = Literal["auto", "delayed-error", "delayed-error-softmax", "delayed-loss", "delayed-loss-softmax",
                    "delayed-error-one-hot", "delayed-error-softmax-one-hot", "delayed-loss-one-hot",
                    "delayed-loss-softmax-one-hot"]

# ops a "layer with its activation" may have between the layer and the activation
_BETWEEN = frozenset({"batch_norm", "layer_norm", "group_norm", "dropout", "identity"})
_PROBABILITIES = frozenset({"Sigmoid", "sigmoid", "Softmax", "softmax", "_softmax"})


@dataclass
class F3Options:
    at: Literal["blocks", "stages"] = option("blocks", "blocks: after every residual block (or, in a model without "
                                                       "them, every layer with its activation); stages: after every "
                                                       "stage of a split model but the last")
    feedback: Literal["kaiming", "trinomial", "binomial", "identity"] = option(
        "kaiming", "how each fixed feedback matrix B is drawn: kaiming-uniform, {-1,0,1}, {0,1}, or +-identity tiled")
    error: ErrorKind = option("auto", "the error stored per sample after each step, with the sign of -dL/dy_hat "
                                      "(-one-hot: only the true class keeps its value); auto: delayed-error-softmax "
                                      "for cross-entropy, else delayed-error")
    loss: Literal["auto", "bce", "cross-entropy", "mse"] = option(
        "auto", "the training loss the error is taken of: auto is bce when the model ends in a sigmoid, else "
                "cross-entropy; mse for regression")
    seed: int = option(0, "seed of the feedback matrices (connector k draws from (seed, k): the same B on every rank)")


@register
class F3(Pass):
    """Put a feedback connector after every block but the last, or after every stage but the last.

    A block is a residual block (sub-blocks sharing a layer, such as a transformer layer's attention and
    MLP, count as one), or in a model without residual blocks a layer (Linear, convolution) with its
    activation. The block that produces the output (with everything after the last connector: pooling,
    the classifier) trains on the true loss gradient. A connector's fixed feedback matrix B is
    C x n, with n the values per sample of the activation it sits on ((N, C, H, W), (N, T, D) or
    (N, D)), stored as a buffer. A block position with no trainable layer before the next connector
    gets no connector (it would train nothing), and neither does one where another value crossing there
    carries gradient to the same parameters (backprop would go around the connector).

    Connectors are the identity until the training loop hands them error rows, so the model's forward
    and outputs are unchanged (the PassManager checks it) and backprop still trains it as it was.
    """

    name = "f3"
    summary = "feedback connectors after blocks or stages: F3 (delayed error x fixed random B), DFA, DRTP, LLO"
    Options = F3Options
    whole_model = True
    preserves_function = True
    schedule: ClassVar[str] = "f3"

    def run(self, gm: Any, ctx: Any) -> PassResult:
        from ..autodiff.feedback import check_error_kind
        from ..ir.meta import concrete
        from ..nn.feedback import FeedbackConnector, connectors
        from ..nn.staged import stages_of

        opts = self.options
        staged = stages_of(gm) is not None
        graphs = stages_of(gm) if staged else [gm]
        if connectors(gm):
            return PassResult(gm, False, ["the model already has feedback connectors; left as it is"],
                              {"connectors": []})
        if opts.at == "stages" and len(graphs) < 2:
            raise GradxformError("f3{at=stages} needs a model split into two stages or more",
                                 hint="put 'split{stages=K}' before it, or use f3{at=blocks}")
        pred = _prediction(graphs[-1], gm.out_spec if staged else getattr(gm, "_out_spec", None))
        classes = concrete(pred.meta["val"].shape[1])
        loss = opts.loss
        producer = _raw(pred, graphs[-1])
        if loss == "auto":
            loss = "bce" if producer in ("Sigmoid", "sigmoid") else "cross-entropy"
        elif loss == "bce" and producer not in _PROBABILITIES:
            raise GradxformError(f"f3{{loss=bce}} needs the model's output to be probabilities, but it comes from "
                                 f"'{pred.name}' ({producer}), not a sigmoid",
                                 hint="end the model with a sigmoid (as the F3 authors' MLPs do), or use "
                                      "loss=cross-entropy on logits")
        error = opts.error
        if error == "auto":
            error = "delayed-error-softmax" if loss == "cross-entropy" else "delayed-error"
        check_error_kind(error, loss)

        notes = [f"loss {loss}" + (" (auto: the model ends in a sigmoid)" if opts.loss == "auto" and loss == "bce"
                                   else " (auto: the output is not a sigmoid)" if opts.loss == "auto" else "")
                 + f", error kind {error}" + (" (auto)" if opts.error == "auto" else "")
                 + f", feedback {opts.feedback}, {classes} outputs"]
        plans = []
        for j, g in enumerate(graphs):
            plans += _plan(g, j, j == len(graphs) - 1, opts.at, staged, notes)
        rows, total = [], 0
        for k, (j, g, node, where, only_output) in enumerate(plans):
            val = node.meta["val"]
            shape = tuple(concrete(s) for s in val.shape[1:])
            param = next(g.parameters(), None)
            conn = FeedbackConnector(shape, classes, opts.feedback, opts.seed, k, dtype=val.dtype,
                                     device=param.device if param is not None else None)
            name = _free_name(g, f"feedback{k}")
            g.add_submodule(name, conn)
            _insert(g, node, name, only_output)
            nbytes = conn.B.numel() * conn.B.element_size()
            total += nbytes
            dims = ", ".join(map(str, shape))
            rows.append({"name": name, "stage": j, "after": where, "node": node.name, "shape": list(shape),
                         "feedback_shape": [classes, conn.B.shape[1]], "bytes": nbytes})
            notes.append(f"{(f'stage {j}: ' if staged else '')}{name} after {where} ('{node.name}'): activation "
                         f"(N, {dims}), B {classes} x {conn.B.shape[1]} ({opts.feedback}), {_kb(nbytes)}")
        if not rows:
            notes.append("no connector inserted: no block boundary with a trainable layer after it")
        one_hot = error.endswith("-one-hot")
        per_sample = 4 if one_hot else 4 * classes
        values = "one value" if one_hot else f"{classes} values"
        notes.append(f"{len(rows)} connector(s), feedback matrices {_kb(total)} together; the error buffer holds "
                     f"{per_sample} bytes per training sample in fp32 ({values})"
                     f"{', plus its 8-byte label' if loss != 'mse' else ''}; a micro-batch in flight keeps its error "
                     f"rows (N x {classes}) per connector for the backward")
        gm.gx_f3 = {"error": error, "loss": loss, "classes": classes, "at": opts.at}
        return PassResult(gm, bool(rows), notes, {"connectors": rows, "bytes": total, "classes": classes,
                                                  "loss": loss, "error": error, "schedule": self.schedule})


def _kb(nbytes: int) -> str:
    return f"{nbytes / 1e3:.1f} kB" if nbytes < 1e6 else f"{nbytes / 1e6:.2f} MB"


def _raw(node: Any, gm: Any) -> str:
    from ..ir.match import raw_name

    return raw_name(node, gm)


def _output_values(g: Any) -> list:
    out = next(n for n in g.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _prediction(last: Any, spec: Any) -> Any:
    """The model's prediction node: its single output, which must be an (N, C) floating-point tensor."""
    import torch
    import torch.fx as fx

    out = next(n for n in last.graph.nodes if n.op == "output").args[0]
    if spec is not None and isinstance(out, (tuple, list)):
        # an exported graph returns its outputs flat; the spec says whether they were one tensor
        import torch.utils._pytree as pytree

        out = pytree.tree_unflatten(list(out), spec)
    val = out.meta.get("val") if isinstance(out, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        kind = type(out).__name__ if not isinstance(out, fx.Node) else "a non-tensor value"
        raise GradxformError(f"F3 needs the model to return one (N, C) tensor, it returns {kind}",
                             hint="return the prediction tensor itself (F3's error buffer holds C values per "
                                  "sample of it)")
    if val.dim() != 2 or not val.is_floating_point():
        from ..ir.meta import concrete

        dims = ", ".join("N" if i == 0 else str(concrete(s)) for i, s in enumerate(val.shape))
        raise GradxformError(f"F3 needs the model's output to be (N, C), one row of C values per sample; it is "
                             f"({dims}) {str(val.dtype).replace('torch.', '')} at the example inputs",
                             hint="pool or flatten the prediction to (N, C) (per-token outputs are not "
                                  "supported; a regression model returns (N, 1))")
    return out


def _reads_params(g: Any) -> set:
    """Nodes that read a trainable parameter themselves (a layer, or an op on a parameter)."""
    reads = set()
    for n in g.graph.nodes:
        if n.op == "call_module" and any(p.requires_grad for p in g.get_submodule(n.target).parameters()):
            reads.add(n)
        elif n.op != "get_attr" and any(p.op == "get_attr" and _is_param(g, p) for p in n.all_input_nodes):
            reads.add(n)
    return reads


def _upstream(g: Any, reads: set, barriers: set) -> dict:
    """For every node, the parameter-reading nodes its gradient reaches (a bitset), stopping at connectors."""
    bit = {n: 1 << i for i, n in enumerate(reads)}
    up: dict = {}
    for n in g.graph.nodes:
        mask = bit.get(n, 0)
        for p in n.all_input_nodes:
            mask |= up[p]
        up[n] = 0 if n in barriers else mask
    return up


def _is_param(g: Any, node: Any) -> bool:
    import torch

    obj: Any = g
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.nn.Parameter) and obj.requires_grad


def _block_exits(g: Any, an: Any) -> list[tuple[Any, str]]:
    """(exit node, name): residual blocks (sub-blocks of one layer merged), else layers with their activation."""
    from ..ir.match import ACTIVATIONS, op_kind, scope

    if an.blocks:
        exits: list[tuple[Any, str]] = []
        for b in an.blocks:
            group = b.id.split("[")[0] if b.id.endswith("]") else b.id
            if exits and exits[-1][1] == group:
                exits[-1] = (b.exit, group)    # the layer ends with its last sub-block
            else:
                exits.append((b.exit, group))
        return exits
    found = []
    for n in an.order:
        if op_kind(n, g) not in ACTIVATIONS:
            continue
        cur = n
        for _ in range(4):
            ins = [p for p in cur.all_input_nodes if p.op != "get_attr"]
            if len(ins) != 1:
                break
            cur = ins[0]
            kind = op_kind(cur, g)
            if kind in ("linear", "conv"):
                found.append((n, f"{scope(cur) or cur.name} + {op_kind(n, g)}"))
                break
            if kind not in _BETWEEN:
                break
    return found


def _main_output(g: Any) -> Any:
    """A stage's main activation: of its floating-point (N, ...) outputs, the one with most values per sample."""
    import torch

    from ..ir.meta import concrete

    best, size = None, -1
    for n in _output_values(g):
        val = getattr(n, "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() >= 2:
            per = 1
            for s in val.shape[1:]:
                per *= concrete(s)
            if per > size:
                best, size = n, per
    return best


def _plan(g: Any, j: int, last: bool, at: str, staged: bool, notes: list[str]) -> list[tuple]:
    """The connectors of one graph: (stage, graph, node, where, only the output's use)."""
    import torch

    from ..ir.analysis import analyse

    an = analyse(g)
    pos = {n: i for i, n in enumerate(an.order)}
    reads = _reads_params(g)
    prefix = f"stage {j}: " if staged else ""
    cands: list[tuple[Any, str, bool]] = []
    if at == "blocks":
        cands = [(n, f"block {name}", False) for n, name in _block_exits(g, an)]
    boundary = None
    if staged and not last:
        boundary = _main_output(g)
        if boundary is None:
            notes.append(f"{prefix}no floating-point (N, ...) output to put a connector on")
        elif boundary not in {c[0] for c in cands}:
            cands.append((boundary, f"the end of stage {j}", True))
    cands = sorted((c for c in cands if c[0] in pos), key=lambda c: pos[c[0]])
    out_node = next(n for n in g.graph.nodes if n.op == "output")
    plans = []
    for i, (node, where, only_output) in enumerate(cands):
        val = node.meta.get("val")
        stop = pos[cands[i + 1][0]] if i + 1 < len(cands) else len(an.order) - 1
        if node is not boundary and not any(pos[n] > pos[node] and pos[n] <= stop for n in reads):
            if i + 1 < len(cands) or not last:   # else: the model's last block, which has none by design
                notes.append(f"{prefix}no connector after {where}: no trainable layer between it and the next "
                             f"connector")
            continue
        if not isinstance(val, torch.Tensor) or any(isinstance(s, torch.SymInt) and not _fixed(s)
                                                    for s in val.shape[1:]):
            notes.append(f"{prefix}no connector after {where}: its size per sample is not fixed (B needs a fixed "
                         f"width)")
            continue
        # a value crossing beside the block output whose gradient reaches the same parameters would
        # carry backprop around the connector (values behind an earlier connector carry nothing back)
        up = _upstream(g, reads, {p[2] for p in plans})
        around = [v.name for v in _crossing(an, pos, node, out_node) if v is not node and up[v] & up[node]]
        if around and node is not boundary:
            notes.append(f"{prefix}no connector after {where}: '{around[0]}' crosses there too and its gradient "
                         f"reaches the same parameters, around the connector")
            continue
        if around:
            notes.append(f"{prefix}stage output(s) {', '.join(around)} also carry gradient to the parameters before "
                         f"the connector: a pipeline stage never receives it")
        plans.append((j, g, node, where, only_output))
    return plans


def _fixed(size: Any) -> bool:
    try:
        int(str(size))
        return True
    except ValueError:
        return False


def _crossing(an: Any, pos: dict, node: Any, out_node: Any) -> list:
    """Values computed up to ``node`` and used after it (or by the graph's output)."""
    here = pos[node]
    return [v for v in an.order if pos[v] <= here
            and any(u is out_node or (u in pos and pos[u] > here) for u in v.users)]


def _free_name(g: Any, name: str) -> str:
    while hasattr(g, name):
        name += "_"
    return name


def _insert(g: Any, node: Any, name: str, only_output: bool) -> None:
    from ..ir.meta import tags

    with g.graph.inserting_after(node):
        call = g.graph.call_module(name, (node,))
    call.meta["val"] = node.meta["val"]
    tags(call)["role"] = "feedback"
    if only_output:
        out = next(n for n in g.graph.nodes if n.op == "output")
        out.replace_input_with(node, call)
    else:
        node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
