"""The module the ``moonwalk`` pass inserts: layers and reversible chains whose backward is Moonwalk.

``MoonwalkChain`` holds a chain of *pieces* (``ReversibleChain`` modules and plain layers or blocks, each a
module ``piece(h, *side)``) and runs them inside one ``autograd.Function`` that saves only the chain's
input (plus, with ``anchors="store"``, the inputs of the pieces that cannot be rebuilt). ``loss.backward()``
then runs the Moonwalk engine (:mod:`gradxform.autodiff.moonwalk`): every parameter gradient, exactly,
formed in forward order. Under tracing, ONNX export, or without gradients, the chain runs its plain
forward maths; ``mode="autograd"`` runs the same architecture with ordinary autograd (the reference).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..autodiff.moonwalk import ANCHORS, MODES, Engine, Enter, Exit, Map, Step, Unit
from ..state import frozen_buffers
from ..state import plain_path as _plain_path
from .reversible import ReversibleChain

log = logging.getLogger("gradxform.moonwalk")
LOW_PRECISION = (torch.float16, torch.bfloat16)


class MoonwalkChain(nn.Module):
    """A chain of pieces trained by Moonwalk.

    ``rules[k]`` says how piece k carries a cotangent forward (``coupling`` for a ``ReversibleChain``,
    else one of :attr:`gradxform.autodiff.moonwalk.Map.RULES`); ``specs[k]`` what the rule needs to know
    of the layer; ``side_index[k]`` which of the chain's side inputs it reads. ``mode``: ``mixed``,
    ``forward``, ``naive`` (the baseline), or ``autograd`` (ordinary backprop, for reference).
    """

    gx_leaf = True  # a tracer leaf: tracing into it would inline the Function and lose Moonwalk

    def __init__(self, pieces: Sequence[nn.Module], rules: Sequence[str], names: Sequence[str] | None = None,
                 specs: Sequence[dict] | None = None, side_index: Sequence[Sequence[int]] | None = None, *,
                 mode: str = "mixed", anchors: str = "recompute", chunk: int = 256, independent: bool | None = None,
                 drift_every: int = 1):
        super().__init__()
        if mode not in MODES + ("autograd",):
            raise ValueError(f"mode must be one of {', '.join(MODES + ('autograd',))}, got {mode!r}")
        if anchors not in ANCHORS:
            raise ValueError(f"anchors must be one of {', '.join(ANCHORS)}, got {anchors!r}")
        self.pieces = nn.ModuleList(pieces)
        self.rules = list(rules)
        self.names = list(names or [str(k) for k in range(len(pieces))])
        self.specs = [dict(s) for s in (specs or [{} for _ in pieces])]
        self.side_index = [list(s) for s in (side_index or [[] for _ in pieces])]
        self.mode, self.anchors, self.chunk, self.independent = mode, anchors, chunk, independent
        self.drift_every = drift_every
        self.drift_log: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self._calls = 0
        self._warned = False
        self._units: list[Unit] | None = None
        for p, r in zip(self.pieces, self.rules):
            if (r == "coupling") != isinstance(p, ReversibleChain):
                raise ValueError("rule 'coupling' goes with a ReversibleChain piece, and only with one")
            if isinstance(p, ReversibleChain) and not (p.enter and p.exit):
                raise ValueError("a ReversibleChain inside a MoonwalkChain must enter and exit its coupling")

    # -- the chain as engine units ----------------------------------------------------------------
    def units(self) -> list[Unit]:
        if self._units is None:
            units: list[Unit] = []
            for piece, rule, name, spec, sides in zip(self.pieces, self.rules, self.names, self.specs, self.side_index):
                if isinstance(piece, ReversibleChain):
                    units.append(Enter(piece.coupling, f"{name}.enter"))
                    units += [Step(piece.coupling, b, n, r, sides) for b, n, r in
                              zip(piece.blocks, piece.names, piece.random)]
                    units.append(Exit(piece.coupling, f"{name}.exit"))
                else:
                    units.append(Map(piece, rule, name, spec, sides, spec.get("random")))
            self._units = units
        return self._units

    def engine(self) -> Engine:
        return Engine(self.units(), self.mode, self.anchors, self.chunk, self.independent)

    # -- forward -------------------------------------------------------------------------------------
    def run_plain(self, h: torch.Tensor, sides: tuple, autograd_chains: bool = False) -> torch.Tensor:
        for piece, idx in zip(self.pieces, self.side_index):
            mine = tuple(sides[k] for k in idx)
            if isinstance(piece, ReversibleChain) and autograd_chains:
                h = piece.coupling.exit(piece.run_steps(piece.coupling.enter(h), mine))
            else:
                h = piece(h, *mine)
        return h

    def forward(self, h: torch.Tensor, *sides: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        grads_needed = torch.is_grad_enabled() and (
            h.requires_grad or any(isinstance(s, torch.Tensor) and s.requires_grad for s in sides) or params)
        if self.mode == "autograd" or not grads_needed or _plain_path():
            return self.run_plain(h, sides, autograd_chains=self.mode == "autograd")
        return _MoonwalkFunction.apply(self, len(sides), h, *sides, *params)

    # -- what the last backward found ----------------------------------------------------------------
    def record(self, sink: Any, dtype: torch.dtype) -> None:
        self._calls += 1
        drift = max((e for _, e in sink.drift), default=0.0)
        where = max(sink.drift, key=lambda d: d[1])[0] if sink.drift else ""
        self.last = {"drift": drift, "at": where, "exit_residual": sink.exit_residual, "jvps": sink.jvps,
                     "cg_iterations": sink.cg_iterations, "fragment_bytes": dict(sink.fragment_bytes)}
        if self.drift_every and self._calls % self.drift_every == 0:
            self.drift_log.append({"call": self._calls, "relative_error": drift, "at": where,
                                   "exit_residual": sink.exit_residual})
        log.debug("moonwalk backward %d: carried cotangent vs the loss gradient %.3g (at %s), exit residual %.3g",
                  self._calls, drift, where, sink.exit_residual)
        if dtype in LOW_PRECISION and not self._warned:
            self._warned = True
            warnings.warn(f"Moonwalk in {str(dtype).replace('torch.', '')}: the carried cotangent misses the loss "
                          f"gradient by {drift:.2g} (relative, at {where or 'the output'}); float32 keeps it near "
                          f"1e-6", stacklevel=2)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, anchors={self.anchors}, pieces=[{', '.join(f'{n}: {r}' for n, r in zip(self.names, self.rules))}]"

    def gx_subgraphs(self) -> list[nn.Module]:
        """The graphs of the pieces (a chain's blocks), for the cost model."""
        out: list[nn.Module] = []
        for p in self.pieces:
            out += list(p.gx_subgraphs()) if hasattr(p, "gx_subgraphs") else [p]
        return out


class _MoonwalkFunction(torch.autograd.Function):
    """The whole chain; saves its input, side inputs, recorded statistics and (optionally) anchors."""

    @staticmethod
    def forward(ctx, owner: MoonwalkChain, n_side: int, h0: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        sides = tuple(rest[:n_side])
        engine = owner.engine()
        h_out, anchors = engine.first_forward(h0, sides)
        stats = engine.replay.pack()
        engine.side = ()
        ctx.owner, ctx.engine, ctx.n_side = owner, engine, n_side
        ctx.params = rest[n_side:]
        ctx.anchor_sizes = [len(a) for a in anchors]
        ctx.n_stats = len(stats)
        ctx.save_for_backward(h0, *sides, *[t for a in anchors for t in a], *stats)
        return h_out

    @staticmethod
    def backward(ctx, g_out: torch.Tensor) -> tuple:
        owner, engine = ctx.owner, ctx.engine
        saved = list(ctx.saved_tensors)
        h0, sides = saved[0], tuple(saved[1:1 + ctx.n_side])
        k = 1 + ctx.n_side
        anchors = []
        for size in ctx.anchor_sizes:
            anchors.append(tuple(saved[k:k + size]))
            k += size
        engine.replay.unpack(saved[k:])
        engine.side = sides
        params = list(ctx.params)
        want_g0 = ctx.needs_input_grad[2]
        side_wants = [bool(ctx.needs_input_grad[3 + j]) for j in range(ctx.n_side)]
        with frozen_buffers(owner):
            g0, sink = engine.gradients(h0, g_out, anchors, params, want_g0, side_wants)
        owner.record(sink, g_out.dtype)
        ctx.engine = None
        return (None, None, g0 if want_g0 else None, *sink.sides, *sink.params)


__all__ = ["MoonwalkChain"]
