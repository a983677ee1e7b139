"""Reversible chains and stored-input blocks: the modules the ``reversible`` pass inserts.

``ReversibleChain`` runs consecutive residual blocks as a coupling (``gradxform.autodiff.reversible``
holds the couplings and the backward that inverts instead of storing); ``StoredInputBlock`` keeps only
its input for a block that cannot be inverted. Under tracing, ONNX export, or without gradients, both
run their plain forward maths instead of the custom Function. Both are leaves of gradxform's tracer
(``gx_leaf``): tracing into them would inline the Function and silently lose the memory saving.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..autodiff.reversible import (COUPLINGS, ChainFunction, LeapfrogCoupling, MomentumCoupling, State,
                                   StoredInputFunction)
from ..state import frozen_buffers, in_transient_graph
from ..state import plain_path as _plain_path

__all__ = ["ReversibleChain", "StoredInputBlock", "LeapfrogCoupling", "MomentumCoupling", "COUPLINGS"]


class ReversibleChain(nn.Module):
    """Consecutive residual blocks run as a reversible coupling.

    ``blocks[i](x, *side)`` computes block i's residual function ``f_i`` (any post-addition
    activation moved inside). ``side`` are tensors every block may read but never changes (an
    attention mask): they are saved, not reconstructed. With ``enter``/``exit`` false, the chain takes
    or returns the coupling's state instead of one tensor, so a pipeline can cut a chain into parts.
    ``memory_saving=False`` runs the same architecture with ordinary autograd (the reference).
    """

    gx_leaf = True

    def __init__(self, blocks: Sequence[nn.Module], coupling: Any, *, names: Sequence[str] | None = None,
                 enter: bool = True, exit: bool = True, random: Sequence[bool] | None = None,
                 memory_saving: bool = True, drift_every: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.coupling = coupling
        self.names = list(names or [str(i) for i in range(len(blocks))])
        self.enter, self.exit = enter, exit
        self.random = list(random or [False] * len(blocks))
        self.memory_saving = memory_saving
        self.drift_every = drift_every
        self.drift_log: list[dict[str, Any]] = []
        self._calls = 0

    # -- the coupling's maths, shared by every path ------------------------------------------
    def _f(self, i: int, side: tuple) -> Callable:
        return lambda a: self.blocks[i](a, *side)

    def run_steps(self, state: State, side: tuple, lo: int = 0, hi: int | None = None) -> State:
        for i in range(lo, len(self.blocks) if hi is None else hi):
            state = self.coupling.step(state, self._f(i, side))
        return state

    def inverse(self, *state_and_side: torch.Tensor) -> State:
        """The chain's input state from its output state (and side inputs); no gradients."""
        n = 2
        state, side = tuple(state_and_side[:n]), tuple(state_and_side[n:])
        with torch.no_grad(), frozen_buffers(self):
            for i in reversed(range(len(self.blocks))):
                state = self.coupling.inverse(state, self._f(i, side))
        return state

    # -- forward -----------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> Any:
        if self.enter:
            state, side = self.coupling.enter(inputs[0]), tuple(inputs[1:])
        else:
            state, side = tuple(inputs[:2]), tuple(inputs[2:])
        if self.training and self.drift_every and not _plain_path():
            self._calls += 1
            if self._calls % self.drift_every == 0:
                self.drift_log.append({"call": self._calls, "relative_error": self.measure_drift(state, side)})
        grads_needed = torch.is_grad_enabled() and (
            any(t.requires_grad for t in (*state, *side) if isinstance(t, torch.Tensor))
            or any(p.requires_grad for p in self.parameters()))
        if not self.memory_saving or not grads_needed or _plain_path() or in_transient_graph():
            out = self.run_steps(state, side)
        else:
            params = [p for p in self.parameters() if p.requires_grad]
            out = ChainFunction.apply(self, len(state), len(side), *state, *side, *params)
        return self.coupling.exit(out) if self.exit else tuple(out)

    def measure_drift(self, state: State, side: tuple) -> list[float]:
        """Relative error of each block's reconstructed input against the true one."""
        with torch.no_grad(), frozen_buffers(self), torch.random.fork_rng(devices=[]):
            states = [state]
            for i in range(len(self.blocks)):
                states.append(self.coupling.step(states[-1], self._f(i, side)))
            errors = []
            rec = states[-1]
            for i in reversed(range(len(self.blocks))):
                rec = self.coupling.inverse(rec, self._f(i, side))
                true = states[i]
                num = sum(float((r - t).double().norm() ** 2) for r, t in zip(rec, true)) ** 0.5
                den = sum(float(t.double().norm() ** 2) for t in true) ** 0.5 or 1.0
                errors.append(num / den)
        return errors[::-1]

    def slice(self, lo: int, hi: int, enter: bool, exit: bool) -> "ReversibleChain":
        """Blocks ``lo:hi`` as a chain of their own (sharing parameters), for pipeline stages."""
        return ReversibleChain(list(self.blocks[lo:hi]), self.coupling, names=self.names[lo:hi], enter=enter,
                               exit=exit, random=self.random[lo:hi], memory_saving=self.memory_saving,
                               drift_every=self.drift_every)

    def extra_repr(self) -> str:
        return (f"{self.coupling.describe()}, blocks=[{', '.join(self.names)}], enter={self.enter}, "
                f"exit={self.exit}, memory_saving={self.memory_saving}")

    def gx_subgraphs(self) -> list[nn.Module]:
        """The blocks' graphs, for the cost model."""
        return list(self.blocks)


class StoredInputBlock(nn.Module):
    """A block that keeps only its input for backward and recomputes itself there.

    For the blocks a reversible chain cannot absorb (strided or projection skips, docs/methods.md §1):
    like activation checkpointing, but with BatchNorm statistics updated once and dropout replayed.
    The maths is the block's own: the model's function does not change.
    """

    gx_leaf = True

    def __init__(self, block: nn.Module, name: str = "", random: bool = False):
        super().__init__()
        self.block = block
        self.name = name
        self.random = random

    def forward(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        grads_needed = torch.is_grad_enabled() and (
            x.requires_grad or any(isinstance(s, torch.Tensor) and s.requires_grad for s in side)
            or any(p.requires_grad for p in self.parameters()))
        if not grads_needed or _plain_path() or in_transient_graph():
            return self.block(x, *side)
        params = [p for p in self.parameters() if p.requires_grad]
        return StoredInputFunction.apply(self, len(side), x, *side, *params)

    def extra_repr(self) -> str:
        return f"block={self.name!r}, keeps its input only"

    def gx_subgraphs(self) -> list[nn.Module]:
        return [self.block]
