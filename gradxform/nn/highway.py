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

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..autodiff.highway import (ActResidual, GammaResidual, GateResidual, Group, LSTMResidual, Residual, Segment,
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


class _HighwayRNN:
    """What HighwayGRU and HighwayLSTM share: adopting an existing layer's parameters, one Highway
    segment per stacked layer over the time steps, and PyTorch's input layouts."""

    gates: Callable[..., tuple]            # (state, input projection, w_hh, b_hh) -> z
    residual: type[Residual]

    @classmethod
    def adopt(cls, rnn: nn.RNNBase, iterations: int) -> Any:
        kind = type(rnn).__name__
        if rnn.bidirectional:
            raise ValueError(f"bidirectional {kind}")
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"{kind} with proj_size")
        new = cls.__new__(cls)
        new.__dict__.update(rnn.__dict__)   # shares the parameters and the state-dict keys
        new.highway_iterations = iterations
        new.exact = False
        return new

    def _segment(self, layer: int, steps: int) -> Segment:
        w_hh = getattr(self, f"weight_hh_l{layer}")
        b_hh = getattr(self, f"bias_hh_l{layer}") if self.bias else None
        gates = type(self).gates

        def step(state: torch.Tensor, xp: torch.Tensor) -> tuple:
            return gates(state, xp, w_hh, b_hh)

        residual = self.residual()
        params = [w_hh] + ([b_hh] if b_hh is not None else [])
        return Segment([step] * steps, [residual] * steps, [Group(list(range(steps)), residual, fn=step)],
                       params, self.highway_iterations)

    def _time_major(self, input: Any) -> tuple[torch.Tensor, bool]:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__} takes a padded tensor, not a PackedSequence")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
        return (x.transpose(0, 1) if self.batch_first else x), batched    # (T, N, D)

    def _run_layers(self, x: torch.Tensor, initial: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Every stacked layer over the (T, N, D) sequence from its initial state; returns the last
        layer's states (T, ...) and each layer's final state."""
        finals = []
        for layer in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{layer}")
            b_ih = getattr(self, f"bias_ih_l{layer}") if self.bias else None
            xp = F.linear(x, w_ih, b_ih)                            # all steps' input projections at once
            states = apply_segment(self._segment(layer, x.shape[0]), initial[layer], xp, exact=self.exact)
            finals.append(states[-1])
            x = self._output(states)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, finals

    def _batch_out(self, out: torch.Tensor, batched: bool) -> torch.Tensor:
        out = out.transpose(0, 1) if self.batch_first else out
        return out if batched else out.squeeze(1 if not self.batch_first else 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", highway_iterations={self.highway_iterations}"


def gru_gates(h: torch.Tensor, xp: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> tuple:
    """One GRU step as ``(a, b)`` with ``h' = a ⊙ h + b`` (PyTorch's gate order r, z, n)."""
    hp = F.linear(h, w_hh, b_hh)
    xr, xz, xn = xp.chunk(3, dim=-1)
    hr, hz, hn = hp.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    u = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return u, (1 - u) * n


class HighwayGRU(_HighwayRNN, nn.GRU):
    """An ``nn.GRU`` trained with Highway-BP over its time steps (same parameters and state dict).

    The input projections of all steps are computed at once outside the segment (they are not on
    the recurrent path); each step's recurrent part is one Highway layer with K = diag(update gate).
    Dropout between stacked layers is applied between their segments.
    """

    gates = staticmethod(gru_gates)
    residual = GateResidual

    @classmethod
    def from_gru(cls, gru: nn.GRU, iterations: int) -> "HighwayGRU":
        return cls.adopt(gru, iterations)

    def _output(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, batched = self._time_major(input)
        if hx is None:
            hx = x.new_zeros(self.num_layers, x.shape[1], self.hidden_size)
        elif not batched:
            hx = hx.unsqueeze(1)
        out, finals = self._run_layers(x, list(hx))
        h_n = torch.stack(finals)
        return self._batch_out(out, batched), (h_n if batched else h_n.squeeze(1))


def lstm_gates(s: torch.Tensor, xp: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> tuple:
    """One LSTM step's gates from the state ``s = (h, c)`` as ``(f, i ⊙ g, o)`` (PyTorch's order i, f, g, o)."""
    gates = xp + F.linear(s.select(-3, 0), w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    return torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g), torch.sigmoid(o)


class HighwayLSTM(_HighwayRNN, nn.LSTM):
    """An ``nn.LSTM`` trained with Highway-BP over its time steps (same parameters and state dict).

    The Highway state of a step is ``(h, c)`` stacked; its K is a 2 x 2 matrix of diagonals (the
    cell path ``∂c'/∂c = f`` and ``∂h'/∂c``), scanned like a diagonal one.
    """

    gates = staticmethod(lstm_gates)
    residual = LSTMResidual

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, iterations: int) -> "HighwayLSTM":
        return cls.adopt(lstm, iterations)

    def _output(self, states: torch.Tensor) -> torch.Tensor:
        return states[:, 0]

    def forward(self, input: torch.Tensor, hx: tuple | None = None) -> tuple:
        x, batched = self._time_major(input)
        if hx is None:
            h0 = c0 = x.new_zeros(self.num_layers, x.shape[1], self.hidden_size)
        else:
            h0, c0 = hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        out, finals = self._run_layers(x, [torch.stack([h, c]) for h, c in zip(h0, c0)])
        h, c = torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
        if not batched:
            h, c = h.squeeze(1), c.squeeze(1)
        return self._batch_out(out, batched), (h, c)
