"""Symbolic costs: FLOPs, parameter bytes and activation bytes per node, as sympy expressions.

Sizes come from the FakeTensor metadata (:mod:`gradxform.ir.meta`), so a convolution's FLOPs read
``2*B*...`` in the batch size ``B`` (and sequence length ``T``). Conventions: one multiply-add is two
FLOPs; normalisations count 5 per element, element-wise ops 1, softmax 3; views, embeddings and
ops not listed here count 0 FLOPs. Activation bytes are the bytes of the node's (non-view) outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .match import ELEMENTWISE, NORMS, module_of, op_kind, raw_name


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr = sympy.Integer(0)
    param_bytes: sympy.Expr = sympy.Integer(0)
    act_bytes: sympy.Expr = sympy.Integer(0)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.param_bytes + other.param_bytes,
                    self.act_bytes + other.act_bytes)


ZERO = Cost()


def to_expr(x: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression in the shape environment's symbols."""
    if isinstance(x, torch.SymInt):
        node = x.node
        return node.shape_env.simplify(node.expr) if node.shape_env is not None else node.expr
    return sympy.Integer(int(x))


def _numel(t: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*[to_expr(s) for s in t.shape]) if t.dim() else sympy.Integer(1)


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _tensors(v: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]


def _first_tensor_arg(node: fx.Node) -> torch.Tensor | None:
    for a in node.args:
        v = _val(a)
        if isinstance(v, torch.Tensor):
            return v
    return None


def _rnn_flops(mod: torch.nn.RNNBase, x: torch.Tensor) -> sympy.Expr:
    gates = {"GRU": 3, "LSTM": 4}.get(type(mod).__name__, 1)
    dirs = 2 if mod.bidirectional else 1
    steps = _numel(x) / to_expr(x.shape[-1])  # batch x time
    total = sympy.Integer(0)
    for layer in range(mod.num_layers):
        width = mod.input_size if layer == 0 else mod.hidden_size * dirs
        total += 2 * steps * dirs * gates * mod.hidden_size * (width + mod.hidden_size)
    return total


def _flops(node: fx.Node, gm: fx.GraphModule, kind: str, out: list[torch.Tensor]) -> sympy.Expr:
    if not out:
        return sympy.Integer(0)
    y = out[0]
    mod = module_of(node, gm)
    raw = raw_name(node, gm)
    if raw == "addmm":  # addmm(bias, x, w.t()): the reduction length is x's last dimension
        return 2 * _numel(y) * to_expr(_val(node.args[1]).shape[-1])
    if kind in ("conv", "linear"):
        weight = mod.weight if mod is not None else _val(node.args[1]) if len(node.args) > 1 else None
        if not isinstance(weight, torch.Tensor):
            return sympy.Integer(0)
        # weight is (out, in/groups, *kernel): each output element is one dot product of that size
        return 2 * _numel(y) * sympy.Mul(*[to_expr(s) for s in weight.shape[1:]])
    if kind == "matmul":
        a = _val(node.args[1] if raw == "baddbmm" else node.args[0])
        return 2 * _numel(y) * to_expr(a.shape[-1]) if isinstance(a, torch.Tensor) else sympy.Integer(0)
    if kind == "sdpa":
        q, k, v = (_val(a) for a in node.args[:3])
        rows = _numel(q) / to_expr(q.shape[-1])
        return 2 * rows * to_expr(k.shape[-2]) * (to_expr(q.shape[-1]) + to_expr(v.shape[-1]))
    custom = getattr(mod, "gx_flops", None)
    if custom is not None:  # a gradxform layer that states its own cost (a factored weight)
        return custom(_numel(y))
    subgraphs = getattr(mod, "gx_subgraphs", None)
    if subgraphs is not None:  # a gradxform module (a reversible chain): the work of its graphs
        return sum((total(node_costs(g).values()).flops for g in subgraphs()), sympy.Integer(0))
    if kind in ("gru", "lstm", "rnn") and mod is not None:
        return _rnn_flops(mod, _first_tensor_arg(node))
    if kind in NORMS:
        return 5 * _numel(y)
    if kind in ("max_pool", "avg_pool"):
        x = _first_tensor_arg(node)
        return _numel(x) if x is not None else _numel(y)
    if kind == "softmax":
        return 3 * _numel(y)
    if kind in ELEMENTWISE:
        x = _first_tensor_arg(node) if kind in ("mean", "sum") else y
        return _numel(x) if x is not None else sympy.Integer(0)
    return sympy.Integer(0)


def _param_bytes(node: fx.Node, gm: fx.GraphModule, seen: set[int]) -> sympy.Expr:
    tensors: Iterable[torch.Tensor] = ()
    if node.op == "call_module":
        tensors = gm.get_submodule(node.target).parameters()
    elif node.op == "get_attr":
        obj = _attr(gm, str(node.target))
        tensors = [obj] if isinstance(obj, torch.nn.Parameter) else ()
    total = 0
    for p in tensors:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return sympy.Integer(total)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_costs(gm: fx.GraphModule) -> dict[fx.Node, Cost]:
    """The cost of every node of ``gm``, symbols renamed to ``B``/``T`` where known."""
    seen: set[int] = set()
    costs: dict[fx.Node, Cost] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        kind = op_kind(node, gm)
        out = _tensors(node.meta.get("val"))
        flops = _flops(node, gm, kind, out) if node.op != "get_attr" else sympy.Integer(0)
        params = _param_bytes(node, gm, seen)
        acts = sympy.Integer(0)
        if kind not in ("view", "identity", "get_attr", "copy_"):
            acts = sum((_numel(t) * t.element_size() for t in out), sympy.Integer(0))
        costs[node] = Cost(*(named(e, gm) for e in (flops, params, acts)))
    return costs


def named(expr: Any, gm: fx.GraphModule) -> sympy.Expr:
    """``expr`` with the shape environment's symbols (``s0``) renamed to ``B``/``T``."""
    expr = sympy.sympify(expr)
    if not expr.free_symbols:
        return expr
    names = gm.meta.get("gx_symbols", {})
    swap = {s: sympy.Symbol(names[s.name][0], positive=True, integer=True)
            for s in expr.free_symbols if s.name in names}
    return sympy.expand(expr.xreplace(swap))


def hints(gm: fx.GraphModule) -> dict[sympy.Symbol, int]:
    """Values of ``B``/``T`` at the example inputs."""
    return {sympy.Symbol(name, positive=True, integer=True): hint
            for name, hint in gm.meta.get("gx_symbols", {}).values()}


def evaluate(expr: sympy.Expr, values: dict[sympy.Symbol, int]) -> float:
    """The expression's value at the example sizes (a plain number)."""
    if not getattr(expr, "free_symbols", None):
        return float(expr)
    # A bare symbol (a position-id add costs T FLOPs) is replaced by the plain int itself.
    out = sympy.sympify(expr.xreplace(values))
    # Symbols of the shape environment that were never named (rare): fall back to their hints.
    return float(out) if not out.free_symbols else math.nan


def total(costs: Iterable[Cost]) -> Cost:
    acc = ZERO
    for c in costs:
        acc = acc + c
    return acc
