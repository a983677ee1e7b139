"""Nodes that compute nothing: removed before the analysis so that they cannot hide structure.

Real models carry operations that leave every value as it was but add users to it: shape assertions
(``torch._assert(x.dim() == 3, ...)`` in torchvision's ViT blocks, ``aten._assert_tensor_metadata``
that ``torch.export`` writes beside every ``.to()``), conversions to the dtype a tensor already has
(export records Llama's ``x.to(torch.float32)`` as ``aten.to.dtype`` even when ``x`` is float32, and
every later use of ``x`` reads that alias), and ``nn.Identity`` layers (timm's ``shortcut``,
``drop_path`` at rate 0). Each of them, sitting on a block boundary, makes the boundary value look
used outside the next block or makes an identity skip look like a projection. The outputs are
unchanged by construction; the compiler's trace check compares them with the model's anyway.
"""

from __future__ import annotations

import torch
import torch.fx as fx

_ASSERTS = {torch._assert, torch.ops.aten._assert_tensor_metadata.default}
# aten.to returns its input itself when nothing changes (unlike _to_copy, which always copies)
_CONVERSIONS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device}
_KWARGS_SAME = ("dtype", "device", "layout")


def remove_no_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Drop assertions, same-dtype conversions and ``nn.Identity`` calls; returns how many of each kind.

    Needs ``meta['val']`` on the nodes (a conversion is an alias only when the dtype is unchanged).
    """
    counts = {"assertion": 0, "conversion": 0, "identity layer": 0}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            inputs = node.all_input_nodes
            gm.graph.erase_node(node)
            _erase_dead(gm.graph, inputs)
            counts["assertion"] += 1
        elif _is_alias(node, gm):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            counts["conversion" if node.op == "call_function" else "identity layer"] += 1
    if any(counts.values()):
        gm.recompile()
    return {k: v for k, v in counts.items() if v}


def _is_alias(node: fx.Node, gm: fx.GraphModule) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is torch.nn.Identity and len(node.args) == 1 \
            and not node.kwargs
    if node.op != "call_function" or node.target not in _CONVERSIONS:
        return False
    if node.kwargs.get("copy") or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    return all(getattr(src, k) == getattr(out, k) for k in _KWARGS_SAME) and src.shape == out.shape


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` left without users (an assertion's condition), and then their inputs.

    Also the shape reads of the assertion's message (``f"... got {x.shape}"`` leaves a ``getattr``
    node that nothing uses). Only reads of sizes and arithmetic on them are erased: a layer whose
    output is unused may still update buffers (BatchNorm's running statistics).
    """
    todo = list(nodes) + [n for n in graph.nodes if _reads_metadata(n)]
    while todo:
        n = todo.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.is_impure():
            continue
        if not (_reads_metadata(n) or n in nodes):
            continue
        todo += n.all_input_nodes
        graph.erase_node(n)


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.op != "call_function":
        return False
    return node.target is getattr or node.target is torch.ops.aten.sym_size.int or \
        getattr(node.target, "__module__", None) == "_operator"
