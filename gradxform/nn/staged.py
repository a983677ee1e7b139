"""A model cut into pipeline stages whose composition equals the original."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from ..ir.meta import flat_inputs
from .reversible import ReversibleChain


class StagedModule(torch.nn.Module):
    """Holds ``stages`` (GraphModules); ``forward`` runs them in order.

    Every stage but the last returns a tuple of tensors that is the next stage's positional input.
    The first stage takes the model's own inputs; the last returns the model's own output structure.
    For a ``torch.export`` graph, whose stages take flat inputs, ``in_spec``/``out_spec`` flatten the
    call's (args, kwargs) and rebuild the output (a dict, a dataclass, ...).

    ``tied``: the groups of parameters that are one parameter of the original model but live in
    several stages (GPT-2's ``wte`` and ``lm_head``, a layer called in two stages), as pipeline systems
    do it: each stage holds its own copy. Each group lists ``(stage index, name)`` with ``name`` as
    ``stages[j].named_parameters()`` yields it, one entry per stage, in stage order, at least two
    entries. Contract for whoever trains the stages: the copies start equal (the split model computes
    what the original does); to train as the original would, sum the copies' gradients over the group
    (in one process, or with an all-reduce between the ranks holding those stages) before each
    optimizer step and give every copy the same update, so they stay equal. A stage's optimizer
    that steps its copy alone lets the copies drift apart.
    """

    def __init__(self, stages: list[fx.GraphModule], in_spec: Any = None, out_spec: Any = None,
                 tied: list[list[tuple[int, str]]] | None = None):
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.tied: list[list[tuple[int, str]]] = [list(g) for g in tied or []]

    def first_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The model's own (args, kwargs) bound to the first stage's placeholders, as a flat tuple."""
        if self.in_spec is not None:
            return tuple(fx_pytree.tree_flatten_spec((list(args), dict(kwargs)), self.in_spec))
        return tuple(flat_inputs(self.stages[0], args, kwargs))

    def first(self, *args: Any, **kwargs: Any) -> Any:
        """The first stage's output for a call with the model's own inputs."""
        return self.stages[0](*self.first_inputs(args, kwargs))

    def finish(self, out: Any) -> Any:
        """The model's output structure from the last stage's output."""
        if self.out_spec is not None:
            return pytree.tree_unflatten(list(out), self.out_spec)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.first(*args, **kwargs)
        for stage in self.stages[1:]:
            out = stage(*out)
        return self.finish(out)

    def __len__(self) -> int:
        return len(self.stages)

    def inverses(self) -> dict[int, Any]:
        """The inverse of every stage made only of reversible couplings (``stage.inverse``, set by
        ``split``), by stage index: what the petra schedule rebuilds activations with."""
        return {j: stage.inverse for j, stage in enumerate(self.stages) if getattr(stage, "inverse", None)}


def stages_of(module: Any) -> list[fx.GraphModule] | None:
    """The stages of a :class:`StagedModule`, or None for anything else.

    Decided by type: a model may well have a submodule of its own called ``stages`` (timm's
    ConvNeXt does), and an fx GraphModule of it keeps that submodule.
    """
    return list(module.stages) if isinstance(module, StagedModule) else None


def stage_inverse(stage: fx.GraphModule) -> Any:
    """A function from the stage's outputs to its inputs, when the stage is invertible; else None.

    A stage is invertible when it only runs reversible-chain slices that take and return the
    coupling's two-tensor state (no entry or exit merge), possibly passing other inputs (an attention
    mask) through unchanged. Its inverse inverts the slices from last to first.
    """
    nodes = [n for n in stage.graph.nodes]
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    chains = [n for n in nodes if n.op == "call_module"]
    if not chains or any(n.op not in ("placeholder", "call_module", "call_function", "output") for n in nodes):
        return None
    mods = [stage.get_submodule(n.target) for n in chains]
    if not all(isinstance(m, ReversibleChain) and not m.enter and not m.exit for m in mods):
        return None
    getitems = [n for n in nodes if n.op == "call_function"]
    if not all(n.target is operator.getitem and n.args[0] in chains for n in getitems):
        return None
    # Each output must be a placeholder passed through or a stream of the last chain.
    outs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    state_in = list(chains[0].args[:2])
    sides = list(chains[0].args[2:])
    if not all(a in inputs for a in state_in + sides):
        return None
    for prev, nxt in zip(chains, chains[1:]):
        if [a.args[0] for a in nxt.args[:2]] != [prev, prev] or list(nxt.args[2:]) != sides:
            return None
    last = chains[-1]
    stream_of = {n: n.args[1] for n in getitems if n.args[0] is last}
    layout = []  # per output: ('stream', k) or ('input', index)
    for o in outs:
        if o in stream_of:
            layout.append(("stream", stream_of[o]))
        elif o in inputs:
            layout.append(("input", inputs.index(o)))
        else:
            return None
    if sorted(k for kind, k in layout if kind == "stream") != [0, 1]:
        return None
    side_pos = {inputs.index(s): s for s in sides}

    def inverse(*values: Any) -> tuple:
        state = [None, None]
        known: dict[int, Any] = {}
        for (kind, k), v in zip(layout, values):
            if kind == "stream":
                state[k] = v
            else:
                known[k] = v
        side = tuple(known[i] for i in sorted(side_pos))
        for mod in reversed(mods):
            state = list(mod.inverse(*state, *side))
        result = []
        for i, p in enumerate(inputs):
            result.append(state[state_in.index(p)] if p in state_in else known.get(i))
        return tuple(result)

    return inverse
