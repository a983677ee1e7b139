"""Layers whose backward is Highway-BP: a residual segment and a GRU unrolled over time.

``HighwaySegment`` holds the blocks ``g_i`` of a run of same-shape residual layers and the cheap
residual function of each (``x + z``, ``act(x + z)``, or the γ form for pre-LN transformers). Blocks
with the same structure (same code, same parameter shapes) form one group that the engine runs under
``vmap`` over stacked parameters. ``HighwayGRU`` is an ``nn.GRU`` (same parameters, same state dict)
whose every time step is one Highway layer: ``h' = u ⊙ h + (1 - u) ⊙ n``, so ``K = diag(u)``.

``highway_iterations`` (k) sets the approximation; ``exact = True`` trains with ordinary autograd
through the same layers (the reference the tests compare against).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.highway import (ActResidual, GammaResidual, GateResidual, Group, LSTMResidual, Residual, Segment,
                               apply_segment)

ACTIVATION_FNS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def make_residual(kind: str, gamma: float = 0.0) -> Residual:
    """``add`` | ``gamma`` | an activation name (``relu``, ``gelu``, ...) | ``gate``."""
    if kind == "add":
        return Residual()
    if kind == "gamma":
        return GammaResidual(gamma)
    if kind == "gate":
        return GateResidual()
    if kind == "lstm":
        return LSTMResidual()
    if kind in ACTIVATION_FNS:
        return ActResidual(ACTIVATION_FNS[kind], kind)
    raise ValueError(f"unknown residual kind {kind!r}")


def _structure(block: nn.Module) -> Any:
    """What a block computes, without its node names: two blocks with equal structure and equal
    parameter shapes run as one batched call."""
    graph = getattr(block, "graph", None)
    if graph is None:
        return type(block).__qualname__
    index = {n: i for i, n in enumerate(graph.nodes)}

    def norm(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, norm(v)) for k, v in a.items())
        return repr(a)

    return tuple((n.op, n.target if isinstance(n.target, str) else repr(n.target), norm(n.args), norm(n.kwargs))
                 for n in graph.nodes)


def _signature(block: nn.Module, kind: str) -> tuple:
    code = _structure(block)
    state = tuple((n, tuple(t.shape), t.dtype) for n, t in (*block.named_parameters(), *block.named_buffers()))
    return (code, state, kind)


class _GammaBlock(nn.Module):
    """``block(x) + γ x``: the γ rewrite moves part of the skip into the block."""

    def __init__(self, block: nn.Module, gamma: float):
        super().__init__()
        self.block, self.gamma = block, gamma

    def forward(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        return self.block(x, *side) + self.gamma * x


class HighwaySegment(nn.Module):
    """``h_{i+1} = r_i(h_i, blocks[i](h_i, *side))`` for i = 0 .. L-1; returns ``h_L``.

    ``kinds[i]`` names r_i (see ``make_residual``). ``side`` tensors (an attention mask) reach every
    block unchanged.
    """

    def __init__(self, blocks: Sequence[nn.Module], kinds: Sequence[str], *, gamma: float = 0.2,
                 iterations: int = 4, names: Sequence[str] | None = None):
        super().__init__()
        if len(blocks) != len(kinds):
            raise ValueError("one residual kind per block")
        self.blocks = nn.ModuleList(_GammaBlock(b, gamma) if k == "gamma" else b for b, k in zip(blocks, kinds))
        self.kinds = list(kinds)
        self.gamma = gamma
        self.highway_iterations = iterations
        self.exact = False
        self.names = list(names or [str(i) for i in range(len(blocks))])
        sig: dict[tuple, list[int]] = {}
        for i, (b, k) in enumerate(zip(blocks, kinds)):
            sig.setdefault(_signature(b, k), []).append(i)
        self.group_layers = sorted(sig.values())

    def segment(self) -> Segment:
        residuals = [make_residual(k, self.gamma) for k in self.kinds]
        groups = []
        for layers in self.group_layers:
            if len(layers) == 1:
                groups.append(Group(layers, residuals[layers[0]], fn=self.blocks[layers[0]]))
                continue
            members = [{**dict(self.blocks[i].named_parameters()), **dict(self.blocks[i].named_buffers())}
                       for i in layers]
            groups.append(Group(layers, residuals[layers[0]], template=self.blocks[layers[0]], members=members))
        params = list(self.blocks.parameters())
        return Segment(list(self.blocks), residuals, groups, params, self.highway_iterations, list(self.blocks))

    def forward(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        return apply_segment(self.segment(), x, None, tuple(side), exact=self.exact, all_states=False)

    def extra_repr(self) -> str:
        return (f"layers={len(self.blocks)}, iterations={self.highway_iterations}, "
                f"groups={[len(g) for g in self.group_layers]}, residual={sorted(set(self.kinds))}")

    def gx_subgraphs(self) -> list[nn.Module]:
        return [b.block if isinstance(b, _GammaBlock) else b for b in self.blocks]


def gru_gates(h: torch.Tensor, xp: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> tuple:
    """One GRU step as ``(a, b)`` with ``h' = a ⊙ h + b`` (PyTorch's gate order r, z, n)."""
    hp = F.linear(h, w_hh, b_hh)
    xr, xz, xn = xp.chunk(3, dim=-1)
    hr, hz, hn = hp.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    u = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return u, (1 - u) * n


class HighwayGRU(nn.GRU):
    """An ``nn.GRU`` trained with Highway-BP over its time steps (same parameters and state dict).

    The input projections of all steps are computed at once outside the segment (they are not on
    the recurrent path); each step's recurrent part is one Highway layer. Dropout between stacked
    layers is applied between their segments.
    """

    @classmethod
    def from_gru(cls, gru: nn.GRU, iterations: int) -> "HighwayGRU":
        if gru.bidirectional:
            raise ValueError("bidirectional GRU")
        if getattr(gru, "proj_size", 0):
            raise ValueError("GRU with proj_size")
        new = cls.__new__(cls)
        new.__dict__.update(gru.__dict__)   # shares the parameters
        new.highway_iterations = iterations
        new.exact = False
        return new

    def _segment(self, layer: int, steps: int) -> Segment:
        w_hh = getattr(self, f"weight_hh_l{layer}")
        b_hh = getattr(self, f"bias_hh_l{layer}") if self.bias else None

        def step(h: torch.Tensor, xp: torch.Tensor) -> tuple:
            return gru_gates(h, xp, w_hh, b_hh)

        residual = GateResidual()
        params = [w_hh] + ([b_hh] if b_hh is not None else [])
        return Segment([step] * steps, [residual] * steps, [Group(list(range(steps)), residual, fn=step)],
                       params, self.highway_iterations)

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input, torch.Tensor):
            raise TypeError("HighwayGRU takes a padded tensor, not a PackedSequence")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
        x = x.transpose(0, 1) if self.batch_first else x          # (T, N, D)
        steps, n = x.shape[0], x.shape[1]
        if hx is None:
            hx = x.new_zeros(self.num_layers, n, self.hidden_size)
        elif not batched:
            hx = hx.unsqueeze(1)
        finals = []
        for layer in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{layer}")
            b_ih = getattr(self, f"bias_ih_l{layer}") if self.bias else None
            xp = F.linear(x, w_ih, b_ih)                            # (T, N, 3H), all steps at once
            x = apply_segment(self._segment(layer, steps), hx[layer], xp, exact=self.exact)
            finals.append(x[-1])
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        out = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.stack(finals)
        if not batched:
            out, h_n = out.squeeze(1 if not self.batch_first else 0), h_n.squeeze(1)
        return out, h_n

    def extra_repr(self) -> str:
        return super().extra_repr() + f", highway_iterations={self.highway_iterations}"


def lstm_gates(s: torch.Tensor, xp: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> tuple:
    """One LSTM step's gates from the state ``s = (h, c)`` as ``(f, i ⊙ g, o)`` (PyTorch's order i, f, g, o)."""
    gates = xp + F.linear(s.select(-3, 0), w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    return torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g), torch.sigmoid(o)


class HighwayLSTM(nn.LSTM):
    """An ``nn.LSTM`` trained with Highway-BP over its time steps (same parameters and state dict).

    The Highway state of a step is ``(h, c)`` stacked; its K is a 2 x 2 matrix of diagonals (the
    cell path ``∂c'/∂c = f`` and ``∂h'/∂c``), scanned like a diagonal one.
    """

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, iterations: int) -> "HighwayLSTM":
        if lstm.bidirectional:
            raise ValueError("bidirectional LSTM")
        if getattr(lstm, "proj_size", 0):
            raise ValueError("LSTM with proj_size")
        new = cls.__new__(cls)
        new.__dict__.update(lstm.__dict__)   # shares the parameters
        new.highway_iterations = iterations
        new.exact = False
        return new

    def _segment(self, layer: int, steps: int) -> Segment:
        w_hh = getattr(self, f"weight_hh_l{layer}")
        b_hh = getattr(self, f"bias_hh_l{layer}") if self.bias else None

        def step(s: torch.Tensor, xp: torch.Tensor) -> tuple:
            return lstm_gates(s, xp, w_hh, b_hh)

        residual = LSTMResidual()
        params = [w_hh] + ([b_hh] if b_hh is not None else [])
        return Segment([step] * steps, [residual] * steps, [Group(list(range(steps)), residual, fn=step)],
                       params, self.highway_iterations)

    def forward(self, input: torch.Tensor, hx: tuple | None = None) -> tuple:
        if not isinstance(input, torch.Tensor):
            raise TypeError("HighwayLSTM takes a padded tensor, not a PackedSequence")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
        x = x.transpose(0, 1) if self.batch_first else x          # (T, N, D)
        steps, n = x.shape[0], x.shape[1]
        if hx is None:
            h0 = c0 = x.new_zeros(self.num_layers, n, self.hidden_size)
        else:
            h0, c0 = hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{layer}")
            b_ih = getattr(self, f"bias_ih_l{layer}") if self.bias else None
            xp = F.linear(x, w_ih, b_ih)                            # (T, N, 4H), all steps at once
            s0 = torch.stack([h0[layer], c0[layer]])
            states = apply_segment(self._segment(layer, steps), s0, xp, exact=self.exact)   # (T, 2, N, H)
            x = states[:, 0]
            h_n.append(states[-1, 0])
            c_n.append(states[-1, 1])
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        out = x.transpose(0, 1) if self.batch_first else x
        h, c = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            out, h, c = out.squeeze(1 if not self.batch_first else 0), h.squeeze(1), c.squeeze(1)
        return out, (h, c)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", highway_iterations={self.highway_iterations}"
