"""The reversible-chain gradient engine: couplings, and a backward that inverts instead of storing.

A chain of residual blocks ``y = x + f_i(x)`` becomes a *coupling* over a two-tensor state whose input
can be recomputed from its output (docs/methods.md §1):

- ``LeapfrogCoupling``: ``(a, b) -> (b + f(a), a)``; inverse ``(a', b') -> (b', a' - f(b'))``.
  Entering sets ``a = b = x``; leaving merges the streams (``first``: ``a``; ``mean``: ``(a+b)/2``).
- ``MomentumCoupling(gamma)``: ``v <- gamma v + (1-gamma) f(x); x <- x + v``; inverse
  ``x <- x - v; v <- (v - (1-gamma) f(x)) / gamma``. Starts from ``v = 0``.

:class:`ChainFunction` runs every step of a chain inside one ``autograd.Function`` that saves only the
final state (and side inputs such as an attention mask): memory is O(1) in depth. Its backward walks
the blocks from last to first, reconstructing each block's input by inversion and recomputing ``f``
once under autograd, which serves both the inverse and the vector-Jacobian product.
:class:`StoredInputFunction` is the same recompute for a block that cannot be inverted: it keeps only
its input.

Correctness traps handled here: buffers (BatchNorm running statistics) are restored after every
recompute, so they are updated once per step; the RNG state of blocks with randomness is captured in
forward and replayed in backward; ``f`` that mutates its input works on a copy.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ..state import frozen_buffers

State = tuple[torch.Tensor, ...]
# f_vjp(a, g) -> (f(a) detached, g·∂f/∂a); parameter and side-input gradients are accumulated inside.
FVjp = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LeapfrogCoupling:
    """``(a, b) -> (b + f(a), a)``: the two-stream form PETRA uses for ResNets."""

    name = "leapfrog"

    def __init__(self, merge: str = "first"):
        if merge not in ("first", "mean"):
            raise ValueError(f"merge must be 'first' or 'mean', got {merge!r}")
        self.merge = merge

    def enter(self, x: torch.Tensor) -> State:
        return (x, x)

    def exit(self, state: State) -> torch.Tensor:
        a, b = state
        return a if self.merge == "first" else (a + b) * 0.5

    def step(self, state: State, f: Callable) -> State:
        a, b = state
        return (b + f(a), a)

    def inverse(self, state: State, f: Callable) -> State:
        a2, b2 = state
        return (b2, a2 - f(b2))

    def step_backward(self, state: State, grads: State, f_vjp: FVjp) -> tuple[State, State]:
        a2, b2 = state
        ga2, gb2 = grads
        fa, ga_f = f_vjp(b2, ga2)        # a = b2; one recompute of f gives both
        return (b2, a2 - fa), (gb2 + ga_f, ga2)

    def describe(self) -> str:
        return f"leapfrog(merge={self.merge})"


class MomentumCoupling:
    """Momentum ResNet: ``v <- gamma v + (1-gamma) f(x); x <- x + v``.

    The inverse divides by ``gamma`` at every block, so reconstruction error grows like
    ``gamma**-depth``: keep ``gamma`` moderate (0.9).
    """

    name = "momentum"

    def __init__(self, gamma: float = 0.9):
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma}")
        self.gamma = gamma

    def enter(self, x: torch.Tensor) -> State:
        return (x, torch.zeros_like(x))

    def exit(self, state: State) -> torch.Tensor:
        return state[0]

    def step(self, state: State, f: Callable) -> State:
        x, v = state
        v = self.gamma * v + (1.0 - self.gamma) * f(x)
        return (x + v, v)

    def inverse(self, state: State, f: Callable) -> State:
        x2, v2 = state
        x = x2 - v2
        return (x, (v2 - (1.0 - self.gamma) * f(x)) / self.gamma)

    def step_backward(self, state: State, grads: State, f_vjp: FVjp) -> tuple[State, State]:
        x2, v2 = state
        gx2, gv2 = grads
        gv = gv2 + gx2                   # v2 feeds x2 = x + v2
        x = x2 - v2
        fx, gx_f = f_vjp(x, (1.0 - self.gamma) * gv)
        return (x, (v2 - (1.0 - self.gamma) * fx) / self.gamma), (gx2 + gx_f, self.gamma * gv)

    def describe(self) -> str:
        return f"momentum(gamma={self.gamma})"


COUPLINGS = {"leapfrog": LeapfrogCoupling, "momentum": MomentumCoupling}


def rng_state(device: torch.device) -> Any:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(state: Any, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class Chain(Protocol):
    """What the engine needs of a chain module: its blocks, coupling, which blocks draw random
    numbers, ``f(i, side)`` (block i's residual function) and its parameters."""

    blocks: Sequence[nn.Module]
    coupling: Any
    random: Sequence[bool]

    def _f(self, i: int, side: tuple) -> Callable: ...

    def parameters(self) -> Any: ...


def _accumulate(slots: list, k: int, g: torch.Tensor | None) -> None:
    if g is not None:
        slots[k] = g if slots[k] is None else slots[k] + g


def recompute_vjp(module: nn.Module, x: torch.Tensor, side: tuple, grad_out: torch.Tensor, rng: Any,
                  device: torch.device, index: dict[int, int], param_grads: list, side_grads: list
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute ``module(x, *side)`` under autograd and apply the VJP of ``grad_out``.

    Buffers are restored afterwards (BatchNorm statistics were already updated by the forward) and a
    captured RNG state is replayed (dropout draws the same mask). Parameter and side-input gradients
    are added into ``param_grads`` (by ``index[id(param)]``) and ``side_grads``. Returns the detached
    output and the gradient with respect to ``x``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    wants_side = [isinstance(s, torch.Tensor) and s.requires_grad for s in side]
    replay = replayed_rng(rng, device) if rng is not None else contextlib.nullcontext()
    with torch.enable_grad(), replay, frozen_buffers(module):
        x_ = x.detach().requires_grad_(True)
        side_in = tuple(s.detach().requires_grad_(True) if w else s for s, w in zip(side, wants_side))
        out = module(x_, *side_in)
        targets = [x_] + params + [s for s, w in zip(side_in, wants_side) if w]
        got = torch.autograd.grad(out, targets, grad_out, allow_unused=True)
    for p, gp in zip(params, got[1:1 + len(params)]):
        _accumulate(param_grads, index[id(p)], gp)
    rest = iter(got[1 + len(params):])
    for k, w in enumerate(wants_side):
        if w:
            _accumulate(side_grads, k, next(rest))
    return out.detach(), got[0] if got[0] is not None else torch.zeros_like(x)


class ChainFunction(torch.autograd.Function):
    """All steps of a chain; saves only the final state and the side inputs."""

    @staticmethod
    def forward(ctx, chain: Chain, n_state: int, n_side: int, *args: torch.Tensor) -> State:
        state = tuple(args[:n_state])
        side = tuple(args[n_state:n_state + n_side])
        device = state[0].device
        rng = []
        with torch.no_grad():
            for i in range(len(chain.blocks)):
                rng.append(rng_state(device) if chain.random[i] else None)
                state = chain.coupling.step(state, chain._f(i, side))
        ctx.chain, ctx.rng, ctx.n_state, ctx.n_side = chain, rng, n_state, n_side
        ctx.n_params = len(args) - n_state - n_side
        ctx.save_for_backward(*state, *side)
        return state

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        chain = ctx.chain
        saved = ctx.saved_tensors
        state = tuple(t.detach() for t in saved[:ctx.n_state])
        side = tuple(saved[ctx.n_state:])
        params = [p for p in chain.parameters() if p.requires_grad]
        index = {id(p): k for k, p in enumerate(params)}
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        side_grads: list[torch.Tensor | None] = [None] * len(side)
        grads = tuple(torch.zeros_like(s) if g is None else g for g, s in zip(grads, state))
        device = state[0].device

        for i in reversed(range(len(chain.blocks))):
            block = chain.blocks[i]

            def f_vjp(a: torch.Tensor, g: torch.Tensor, i: int = i, block: nn.Module = block) -> tuple:
                out, ga = recompute_vjp(block, a, side, g, ctx.rng[i], device, index, param_grads, side_grads)
                return out, ga

            state, grads = chain.coupling.step_backward(state, grads, f_vjp)
        return (None, None, None, *grads, *side_grads, *param_grads)


class StoredInputFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner: nn.Module, n_side: int, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        side = tuple(rest[:n_side])
        ctx.rng = rng_state(x.device) if owner.random else None
        with torch.no_grad():
            out = owner.block(x, *side)
        ctx.owner, ctx.n_side = owner, n_side
        ctx.save_for_backward(x, *side)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        x, *side = ctx.saved_tensors
        params = [p for p in ctx.owner.parameters() if p.requires_grad]
        index = {id(p): k for k, p in enumerate(params)}
        param_grads: list = [None] * len(params)
        side_grads: list = [None] * len(side)
        _, gx = recompute_vjp(ctx.owner.block, x, tuple(side), grad_out, ctx.rng, x.device, index,
                              param_grads, side_grads)
        return (None, None, gx, *side_grads, *param_grads)
