"""Shapes and dtypes on every node, symbolic in the batch size (and sequence length).

Propagation runs the graph on FakeTensors (no real memory: a 224x224 batch of 64 costs nothing),
with the batch dimension -- and for token-id or (N, T, D) inputs the sequence dimension -- as
SymInts named ``B`` and ``T``. Every node's ``meta['val']`` then has sizes such as ``(B, 64, 56, 56)``
and the cost model multiplies them into sympy expressions. When a layer insists on concrete sizes
(the shape environment specialises the symbol), expressions simply become numbers.

``torch.export`` graphs arrive with symbolic ``meta['val']`` from their own shape environment; the
same :func:`propagate` re-runs them on their own placeholder values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..state import frozen_buffers

# node.meta key for gradxform's own tags: block, stage, role.
GX = "gx"


def concrete(size: Any) -> int:
    """A size as an int: a symbolic size (B, T) gives its value at the example inputs."""
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else int(size)


def tags(node: fx.Node) -> dict:
    """gradxform's tags on a node (created on first use)."""
    return node.meta.setdefault(GX, {})


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Values for the graph's placeholders, in order, from a call's ``args`` and ``kwargs``.

    ``torch.export`` graphs flatten inputs through their recorded input spec; ``symbolic_trace``
    graphs have one placeholder per ``forward`` parameter, bound by position then name, with the
    placeholder's default for anything not given.
    """
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        import torch.fx._pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec((list(args), dict(kwargs)), in_spec))
    values = []
    remaining = list(args)
    for node in placeholders(gm):
        name = str(node.target).lstrip("*")
        if remaining:
            values.append(remaining.pop(0))
        elif name in kwargs:
            values.append(kwargs[name])
        else:
            values.append(node.args[0] if node.args else None)
    return values


class _ShapeProp(FakeTensorProp):
    """FakeTensorProp with shape rules for layers whose fake kernels specialise the batch size."""

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        mod = self.fetch_attr(target)
        if isinstance(mod, torch.nn.RNNBase) and args and isinstance(args[0], FakeTensor):
            return _rnn_rule(mod, args[0])
        return super().call_module(target, args, kwargs)


def _rnn_rule(mod: torch.nn.RNNBase, x: torch.Tensor) -> Any:
    # The fused RNN kernels guard on concrete sizes; their output shapes are simple to state.
    dirs = 2 if mod.bidirectional else 1
    batched = x.dim() == 3
    if batched:
        n, t = (x.shape[0], x.shape[1]) if mod.batch_first else (x.shape[1], x.shape[0])
        out_shape = (n, t, dirs * mod.hidden_size) if mod.batch_first else (t, n, dirs * mod.hidden_size)
        h_shape = (dirs * mod.num_layers, n, mod.hidden_size)
    else:
        out_shape = (x.shape[0], dirs * mod.hidden_size)
        h_shape = (dirs * mod.num_layers, mod.hidden_size)
    out = x.new_empty(out_shape)
    h = x.new_empty(h_shape)
    if isinstance(mod, torch.nn.LSTM):
        return out, (h, x.new_empty(h_shape))
    return out, h


def _fake_mode_of(values: list) -> FakeTensorMode | None:
    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def _symbolic_fakes(values: list) -> tuple[list, FakeTensorMode]:
    """Fake copies of real inputs, with the batch (and sequence) dimensions symbolic."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    made: dict[tuple[str, int], Any] = {}

    def sym(name: str, size: int) -> Any:
        # 0 and 1 are specialised by every shape environment; keep them concrete.
        if size < 2:
            return size
        key = (name, size)
        if key not in made:
            s = env.create_symbol(size, ConstantSource(f"{name}{len(made)}"), dynamic_dim=DimDynamic.DYNAMIC)
            made[key] = env.create_symintnode(s, hint=size)
        return made[key]

    batch = next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    fakes = []
    for v in values:
        if not isinstance(v, torch.Tensor):
            fakes.append(v)
            continue
        sizes: list[Any] = list(v.shape)
        if v.dim() > 0 and sizes[0] == batch:
            sizes[0] = sym("B", sizes[0])
        if is_sequence_input(v):
            sizes[1] = sym("T", sizes[1])
        with mode:
            fakes.append(torch.empty(sizes, dtype=v.dtype, device="meta" if v.is_meta else v.device))
    return fakes, mode


def is_sequence_input(v: torch.Tensor) -> bool:
    """Token ids (N, T) or features (N, T, D): dimension 1 is the sequence length."""
    if v.dim() == 2 and not v.is_floating_point():
        return True
    return v.dim() == 3 and v.is_floating_point()


def propagate(gm: fx.GraphModule, flat: list | None = None) -> fx.GraphModule:
    """Record ``meta['val']`` (FakeTensors, symbolic sizes) on every node of ``gm``.

    ``flat`` are real example values for the placeholders; without it the placeholders' existing
    ``meta['val']`` are reused (after a pass, or for a ``torch.export`` graph).
    """
    if flat is None:
        flat = [n.meta.get("val") for n in placeholders(gm)]
        mode = _fake_mode_of(flat)
        if mode is None:
            raise ValueError("propagate() needs example inputs for a graph without metadata")
        fakes = flat
    else:
        fakes, mode = _symbolic_fakes(flat)
    try:
        with frozen_buffers(gm):  # layers run on fake inputs still bump real batch counters
            _ShapeProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception:
        # Some layer has no symbolic rule: fall back to the example's concrete sizes.
        if all(not isinstance(v, torch.Tensor) or isinstance(v, FakeTensor) for v in flat):
            raise
        static = FakeTensorMode(allow_non_fake_inputs=True)
        with static:
            fakes = [static.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in flat]
        with frozen_buffers(gm):
            _ShapeProp(gm, static).propagate_dont_convert_inputs(*fakes)
    for node, value in zip(placeholders(gm), fakes):
        node.meta["val"] = value
    gm.meta["gx_symbols"] = symbol_names(gm)
    return gm


def has_metadata(gm: fx.GraphModule) -> bool:
    """Whether every node already carries ``meta['val']`` (true of a fresh ``torch.export`` graph)."""
    return all("val" in n.meta for n in gm.graph.nodes if n.op != "output")


def symbol_names(gm: fx.GraphModule) -> dict[str, tuple[str, int]]:
    """Map the shape environment's symbols (``s0``) to ``('B', hint)`` / ``('T', hint)``."""
    names: dict[str, tuple[str, int]] = {}
    for node in placeholders(gm):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        dims = [(0, "B")] + ([(1, "T")] if is_sequence_input(val) else [])
        for d, label in dims:
            size = val.shape[d]
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                if getattr(expr, "is_Symbol", False) and str(expr) not in names:
                    taken = {n for n, _ in names.values()}
                    name = label if label not in taken else f"{label}{len(taken)}"
                    names[str(expr)] = (name, int(size.node.hint))
    return names
