"""Copying part of a graph into a new one (a pipeline stage, a block's residual function).

Values the copied nodes read from outside the part come in three kinds: those the new graph receives
as placeholders (already in ``env``), parameters and buffers (re-read with ``get_attr`` on first use),
and sizes such as the sequence length, which are re-read from the shape of a received tensor rather
than passed in as Python ints.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx


def replace_module(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``root``'s module tree (a layer a ``call_module`` node calls)."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def arg_lookup(graph: fx.Graph, env: dict[fx.Node, Any],
               size_source: Callable[[fx.Node], list[tuple[fx.Node, int]] | None],
               exported: bool, where: str) -> Callable[[fx.Node], Any]:
    """The ``arg_transform`` for ``graph.node_copy``.

    ``size_source(n)`` says how to re-read a size node ``n``: ``[(tensor, dim), ...]`` whose product it
    is, ``[]`` for a constant, ``None`` when it cannot be re-read. ``exported`` graphs (ATen level) read
    sizes with ``aten.sym_size.int``, module-level graphs with ``tensor.size(dim)``.
    """

    def lookup(n: fx.Node) -> Any:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            env[n] = graph.get_attr(n.target)
            env[n].meta = dict(n.meta)
            return env[n]
        val = n.meta.get("val")
        source = size_source(n)
        if source is None:
            raise RuntimeError(f"value '{n.name}' is needed in {where} but was not passed in")
        if not source:
            return int(val)
        parts = []
        for t, d in source:
            part = (graph.call_function(torch.ops.aten.sym_size.int, (env[t], d)) if exported
                    else graph.call_method("size", (env[t], d)))
            part.meta["val"] = t.meta["val"].shape[d]
            parts.append(part)
        env[n] = parts[0] if len(parts) == 1 else graph.call_function(operator.mul, tuple(parts))
        env[n].meta["val"] = val
        return env[n]

    return lookup
