"""The Highway-BP gradient engine: k iterations of parallel block VJPs and a scan (docs/methods.md §3).

A *segment* is a run of layers ``h_{i+1} = r_i(h_i, g_i(h_i))`` over states of one shape. ``g_i``
is the expensive block, reachable only through vector-Jacobian products; ``r_i`` is a cheap residual
function (a ``Residual`` below) whose Jacobian ``K_i = ∂r_i/∂h`` is the identity, a scalar or a
diagonal. With ``W`` the gradient at every state and ``E`` the gradient arriving from outside (the
loss, or later layers of the model), one Highway iteration is

1. ``V_i = (W_{i+1} ∂r_i/∂z) ∂g_i/∂h`` for every layer at once: one batched VJP per group of layers
   that share their structure (``torch.func.vmap`` over stacked parameters, or over time steps that
   share one cell), all groups in one ``torch.autograd.grad`` call;
2. ``W_i = E_i + V_i + W_{i+1} K_i``: a suffix scan along the residual path, a reversed cumulative
   sum when every ``K`` is the identity and a reversed Hillis-Steele scan (log L rounds) otherwise.

It starts from ``V = 0``. After k iterations ``W_i`` sums every path that crosses at most k blocks, so
k >= L gives exactly the gradient of backprop (the engine stops at L: more iterations change
nothing). Parameter gradients are then one VJP per block with ``W`` in place of ``∂L/∂h``.

The forward runs the layers one after another without building a graph and keeps only the states
(one tensor per layer). The backward re-runs every block once, batched, under autograd, and reuses
that graph for all k iterations and the parameter VJP. BatchNorm layers use their batch statistics
in that re-run without updating their running statistics (the forward already did).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..state import batch_statistics_only, frozen_buffers, math_attention
from ..state import plain_path as _plain_path


# -- residual functions r(x, z) and their cheap Jacobians ----------------------------------------

class Residual:
    """``r(x, z)``: the cheap part of a layer. ``k`` is ``∂r/∂x`` as a tensor broadcastable to x
    (``None`` for the identity); ``dz`` maps a gradient w at the output to the cotangent of z."""

    name = "add"
    identity = True

    def combine(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        return x + z

    def k(self, x: torch.Tensor, z: Any) -> torch.Tensor | None:
        return None

    def dz(self, w: torch.Tensor, x: torch.Tensor, z: Any) -> Any:
        return w

    def describe(self) -> str:
        return "x + g(x), K = I"


class GammaResidual(Residual):
    """``r(x, z) = (1 - γ) x + z`` with ``z = block(x) + γ x``: the same function as ``x + block(x)``
    with a contracting skip, which pre-LN transformers need (plain ``K = I`` diverges)."""

    name = "gamma"
    identity = False

    def __init__(self, gamma: float):
        self.gamma = float(gamma)

    def combine(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        return (1.0 - self.gamma) * x + z

    def k(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        return torch.full((), 1.0 - self.gamma, dtype=x.dtype, device=x.device)

    def describe(self) -> str:
        return f"(1-{self.gamma:g}) x + (g(x) + {self.gamma:g} x), K = {1 - self.gamma:g} I"


class ActResidual(Residual):
    """``r(x, z) = act(x + z)`` for an elementwise activation: ``K = diag(act'(x + z))``."""

    name = "act"
    identity = False

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], label: str = "act"):
        self.act, self.label = act, label

    def combine(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        return self.act(x + z)

    def k(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        y = x + z
        if self.label == "relu":
            return (y > 0).to(y.dtype)
        # elementwise: the derivative is the JVP along a tangent of ones
        return torch.func.jvp(self.act, (y,), (torch.ones_like(y),))[1]

    def dz(self, w: torch.Tensor, x: torch.Tensor, z: Any) -> torch.Tensor:
        return w * self.k(x, z)

    def describe(self) -> str:
        return f"{self.label}(x + g(x)), K = diag({self.label}')"


class GateResidual(Residual):
    """``r(x, (a, b)) = a ⊙ x + b``: a gated recurrent step (GRU: a = update gate), ``K = diag(a)``."""

    name = "gate"
    identity = False

    def combine(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        return z[0] * x + z[1]

    def k(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        return z[0]

    def dz(self, w: torch.Tensor, x: torch.Tensor, z: Any) -> tuple:
        return (w * x, w)

    def describe(self) -> str:
        return "a(x) ⊙ x + b(x), K = diag(a)"


class LSTMResidual(Residual):
    """An LSTM step over the state ``s = (h, c)`` stacked on dimension 0, with ``z = (f, i ⊙ g, o)``:
    ``c' = f ⊙ c + i ⊙ g``, ``h' = o ⊙ tanh(c')``. Its K is not diagonal but a 2 x 2 matrix of
    diagonals acting on (h, c): h' does not depend on h once the gates are fixed, and
    ``∂h'/∂c = o ⊙ tanh'(c') ⊙ f``, ``∂c'/∂c = f`` (``k`` returns it as (2, 2, ...), row = output part)."""

    name = "lstm"
    identity = False
    matrix = True
    # h' does not depend on h once the gates are fixed: K's first column is zero, and the matrix scan
    # reduces to a diagonal scan on the cell path (reduced_matrix_scan)
    zero_first_column = True

    # the state's parts are on dimension -3 of (..., 2, N, H): a group adds a leading layer dimension
    def combine(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        f, ig, o = z
        c = f * x.select(-3, 1) + ig
        return torch.stack([o * torch.tanh(c), c], dim=-3)

    def _dc(self, x: torch.Tensor, z: Any) -> tuple[torch.Tensor, torch.Tensor]:
        f, ig, o = z
        t = torch.tanh(f * x.select(-3, 1) + ig)
        return o * (1 - t * t), t            # ∂h'/∂c' and tanh(c')

    def k(self, x: torch.Tensor, z: Any) -> torch.Tensor:
        f = z[0]
        dh_dc, _ = self._dc(x, z)
        zero = torch.zeros_like(f)
        return torch.stack([torch.stack([zero, dh_dc * f], dim=-3), torch.stack([zero, f], dim=-3)], dim=-4)

    def dz(self, w: torch.Tensor, x: torch.Tensor, z: Any) -> tuple:
        dh_dc, t = self._dc(x, z)
        wh, wc = w.select(-3, 0), w.select(-3, 1)
        u = wc + wh * dh_dc                   # gradient at c'
        return (u * x.select(-3, 1), u, wh * t)

    def describe(self) -> str:
        return "h' = o tanh(f c + i g), c' = f c + i g, K = 2x2 diagonal blocks on (h, c)"


# -- scans ------------------------------------------------------------------------------------

def _reverse_hillis_steele(a: torch.Tensor, b: torch.Tensor, apply: Callable, compose: Callable) -> torch.Tensor:
    """``s_i = b_i + apply(s_{i+1}, a_i)`` with ``s_{n-1} = b_{n-1}``, in ceil(log2 n) vectorised rounds:
    after the round with stride d, element i holds the affine map covering i .. i+2d-1. Combining i
    with i+d adds ``apply(b_{i+d}, a_i)`` and composes ``compose(a_i, a_{i+d})``."""
    n = b.shape[0]
    s, m = b.clone(), a.clone()
    d = 1
    while d < n:
        head = n - d
        s_new = s.clone()
        s_new[:head] = s[:head] + apply(s[d:], m[:head])
        m_new = m.clone()
        m_new[:head] = compose(m[:head], m[d:])
        s, m = s_new, m_new
        d *= 2
    return s


def suffix_scan(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """``s_i = b_i + a_i s_{i+1}`` with ``s_{n-1} = b_{n-1}``, along dimension 0.

    ``a`` is ``None`` for the identity (a reversed cumulative sum), else broadcastable to ``b``
    (``a_{n-1}`` is never read); elementwise maps commute, so composing is a product.
    """
    if a is None:
        return b.flip(0).cumsum(0).flip(0)
    a = a.expand_as(b) if a.dim() == b.dim() else a.reshape(a.shape + (1,) * (b.dim() - a.dim())).expand_as(b)
    return _reverse_hillis_steele(a, b, torch.mul, torch.mul)


def matrix_suffix_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``s_i = b_i + s_{i+1} A_i`` where each ``A_i`` is a P x P matrix of diagonals: ``a`` is
    (n, P, P, ...), ``b`` (n, P, ...); row q of ``A_i`` maps the gradient of output part q to the
    input parts. The same scan as ``suffix_scan`` with row-vector-times-matrix for ``apply`` and the
    product ``A_{i+d} A_i`` for ``compose``."""
    return _reverse_hillis_steele(a, b, lambda v, m: (v.unsqueeze(2) * m).sum(1),
                                  lambda m, later: (later.unsqueeze(3) * m.unsqueeze(1)).sum(2))


def reduced_matrix_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``matrix_suffix_scan`` for 2 x 2 matrices whose first column is zero (an LSTM's K on (h, c)).

    Then ``s_i.h = b_i.h`` and ``s_i.c = b_i.c + b_{i+1}.h a_i[h, c] + s_{i+1}.c a_i[c, c]``: one
    diagonal scan on the cell part, with the h parts folded into its inputs.
    """
    s = b.clone()
    bc = b[:, 1].clone()
    bc[:-1] += b[1:, 0] * a[:-1, 0, 1]
    s[:, 1] = suffix_scan(a[:, 1, 1], bc)
    return s


def sequential_matrix_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = b.clone()
    for i in range(b.shape[0] - 2, -1, -1):
        out[i] = b[i] + (out[i + 1].unsqueeze(1) * a[i]).sum(0)
    return out


def sequential_scan(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """The same recurrence one step at a time (the reference the parallel scan is tested against)."""
    out = b.clone()
    for i in range(b.shape[0] - 2, -1, -1):
        out[i] = b[i] + (out[i + 1] if a is None else a[i] * out[i + 1])
    return out


# -- the segment description the engine works on -----------------------------------------------

@dataclass
class Group:
    """Layers that one batched call can run: ``layers`` are indices into the segment.

    Either ``fn(x, *step_side, *shared_side)`` computes every member's block with parameters it
    closes over (one layer, or time steps sharing a cell), or ``template`` plus ``members`` (each a
    dict of its parameters and buffers by name) run through ``torch.func.functional_call`` under
    ``vmap`` over the stacked parameters.
    """

    layers: list[int]
    residual: Residual
    fn: Callable | None = None
    template: nn.Module | None = None
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass
class Segment:
    """What the engine needs from a module: the per-layer calls for the forward, the groups for the
    batched backward, and every tensor that may receive a gradient."""

    blocks: Sequence[Callable]          # blocks[i](h, *step_side_i, *shared_side) -> z
    residuals: Sequence[Residual]
    groups: list[Group]
    params: list[torch.Tensor]          # parameters of all blocks (unique), in a fixed order
    iterations: int
    modules: Sequence[nn.Module] = ()   # for the BatchNorm switch in the re-run


def run_forward(seg: Segment, h0: torch.Tensor, step_side: torch.Tensor | None, shared: tuple) -> torch.Tensor:
    """All states ``h_0 .. h_L`` stacked along a new first dimension."""
    states = [h0]
    h = h0
    for i, (block, res) in enumerate(zip(seg.blocks, seg.residuals)):
        side = () if step_side is None else (step_side[i],)
        h = res.combine(h, block(h, *side, *shared))
        states.append(h)
    return torch.stack(states)


def _stack_members(members: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([m[name] for m in members]) for name in members[0]}


def _tree_map(fn: Callable, z: Any) -> Any:
    return tuple(fn(t) for t in z) if isinstance(z, tuple) else fn(z)


def _flatten(z: Any) -> list[torch.Tensor]:
    return list(z) if isinstance(z, tuple) else [z]


class _Rerun:
    """Every block re-run once under autograd on the saved states, batched by group."""

    def __init__(self, seg: Segment, states: torch.Tensor, step_side: torch.Tensor | None, shared: tuple):
        self.seg = seg
        self.x = states[:-1].detach().requires_grad_(True)
        self.step_side = step_side
        self.shared = shared
        self.z: list[Any] = []     # per group: its blocks' outputs (stacked over members when batched)
        self.idx: list[torch.Tensor] = []
        # the math attention kernel: the fused CPU/GPU kernels have no vmap batching rule
        with torch.enable_grad(), batch_statistics_only(seg.modules), math_attention():
            for g in seg.groups:
                self.z.append(self._run(g))
        # every iteration reads each group's inputs and outputs without their graph: take them once
        self.x_const = [self.x[g.layers[0]].detach() if len(g.layers) == 1 else self.x.index_select(0, idx).detach()
                        for g, idx in zip(seg.groups, self.idx)]
        self.z_const = [_tree_map(torch.Tensor.detach, z) for z in self.z]
        matrix = [getattr(r, "matrix", False) for r in seg.residuals]
        if any(matrix) and not all(matrix):
            raise ValueError("a segment mixes matrix and elementwise residuals")
        self.matrix = all(matrix) and bool(matrix)
        # K of every layer, as one tensor per state (None where all are the identity)
        self.k = self._stack_k(states)
        if not self.matrix:
            self.scan = lambda b: suffix_scan(self.k, b)
        elif all(getattr(r, "zero_first_column", False) for r in seg.residuals):
            self.scan = lambda b: reduced_matrix_scan(self.k, b)
        else:
            self.scan = lambda b: matrix_suffix_scan(self.k, b)

    def _run(self, g: Group) -> Any:
        dev = self.x.device
        idx = torch.tensor(g.layers, device=dev)
        self.idx.append(idx)
        ss = self.step_side
        if len(g.layers) == 1:
            i = g.layers[0]
            side = () if ss is None else (ss[i],)
            fn = g.fn if g.fn is not None else (lambda x, *s, m=g.members[0]: torch.func.functional_call(
                g.template, m, (x, *s)))
            return fn(self.x[i], *side, *self.shared)
        xs = self.x.index_select(0, idx)
        side = () if ss is None else (ss.index_select(0, idx),)
        n_side = len(side)
        shared = self.shared
        if g.fn is not None:
            fn = g.fn
            return torch.func.vmap(lambda x, *s: fn(x, *s, *shared), in_dims=(0,) + (0,) * n_side)(xs, *side)
        stacked = _stack_members(g.members)
        template = g.template

        def one(p: dict, x: torch.Tensor, *s: torch.Tensor) -> Any:
            return torch.func.functional_call(template, p, (x, *s, *shared))

        return torch.func.vmap(one, in_dims=(0, 0) + (0,) * n_side)(stacked, xs, *side)

    def _stack_k(self, states: torch.Tensor) -> torch.Tensor | None:
        if all(r.identity for r in self.seg.residuals):
            return None
        if self.matrix:
            p = states.shape[1]
            k = torch.zeros((states.shape[0], p) + tuple(states.shape[1:]), dtype=states.dtype, device=states.device)
        else:
            k = torch.ones_like(states)
        with torch.no_grad():
            for gi, g in enumerate(self.seg.groups):
                kg = g.residual.k(self.x_const[gi], self.z_const[gi])
                if kg is None:
                    continue
                if len(g.layers) == 1:
                    k[g.layers[0]] = kg
                elif self.matrix:
                    k[self.idx[gi]] = kg
                else:
                    k[self.idx[gi]] = kg.expand_as(self.x_const[gi]) if kg.dim() < self.x.dim() else kg
        return k

    def cotangents(self, w: torch.Tensor) -> list[torch.Tensor]:
        """``W_{i+1} ∂r_i/∂z`` for every block output, flattened in group order."""
        out: list[torch.Tensor] = []
        for gi, g in enumerate(self.seg.groups):
            if len(g.layers) == 1:
                wg = w[g.layers[0] + 1]
            else:
                wg = w.index_select(0, self.idx[gi] + 1)
            out.extend(_flatten(g.residual.dz(wg, self.x_const[gi], self.z_const[gi])))
        return out

    def outputs(self) -> list[torch.Tensor]:
        return [t for z in self.z for t in _flatten(z)]


def highway_gradients(rerun: _Rerun, external: torch.Tensor, iterations: int) -> torch.Tensor:
    """``W`` (the gradient at every state) after ``iterations`` Highway iterations."""
    n_layers = external.shape[0] - 1
    w = rerun.scan(external)
    outputs = rerun.outputs()
    for _ in range(min(iterations, n_layers)):
        (v,) = torch.autograd.grad(outputs, rerun.x, rerun.cotangents(w), retain_graph=True, allow_unused=True)
        b = external.clone()
        if v is not None:
            b[:-1] += v
        w = rerun.scan(b)
    return w


class HighwayFunction(torch.autograd.Function):
    """States of a segment forward; Highway-BP gradients backward.

    Inputs: the segment, h0, the per-step side input (or None), whether every state is returned, the
    number of shared side inputs, then the shared side inputs and the parameters. Output: the states
    ``h_1 .. h_L`` stacked (a GRU's output sequence), or only ``h_L`` as a tensor of its own (so that
    an in-place op after the segment cannot reach the saved states).
    """

    @staticmethod
    def forward(ctx, seg: Segment, h0: torch.Tensor, step_side: torch.Tensor | None, all_states: bool,
                n_shared: int, *rest: torch.Tensor) -> torch.Tensor:
        shared = tuple(rest[:n_shared])
        with torch.no_grad():
            states = run_forward(seg, h0, step_side, shared)
        ctx.seg, ctx.n_shared, ctx.all_states = seg, n_shared, all_states
        ctx.save_for_backward(states, step_side, *shared)
        return states[1:] if all_states else states[-1].clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        seg = ctx.seg
        states, step_side, *shared = ctx.saved_tensors
        wants_step = step_side is not None and ctx.needs_input_grad[2]
        side_in = step_side.detach().requires_grad_(True) if wants_step else step_side
        wants_shared = [ctx.needs_input_grad[5 + j] for j in range(ctx.n_shared)]
        shared_in = tuple(s.detach().requires_grad_(True) if w else s for s, w in zip(shared, wants_shared))
        rerun = _Rerun(seg, states, side_in, shared_in)
        if ctx.all_states:
            external = torch.cat([torch.zeros_like(states[:1]), grad_out])
        else:
            external = torch.zeros_like(states)
            external[-1] = grad_out
        w = highway_gradients(rerun, external, seg.iterations)
        # one local VJP per block with W in place of dL/dh: parameters and side inputs
        params = [p for p in seg.params if p.requires_grad]
        targets = params + [s for s, want in zip(shared_in, wants_shared) if want] + ([side_in] if wants_step else [])
        grads = list(torch.autograd.grad(rerun.outputs(), targets, rerun.cotangents(w), allow_unused=True)) \
            if targets else []
        by_param = {id(p): g for p, g in zip(params, grads[:len(params)])}
        rest = iter(grads[len(params):])
        shared_grads = [next(rest) if want else None for want in wants_shared]
        step_grad = next(rest) if wants_step else None
        param_grads = [by_param.get(id(p)) for p in seg.params]
        return (None, w[0], step_grad, None, None, *shared_grads, *param_grads)


def apply_segment(seg: Segment, h0: torch.Tensor, step_side: torch.Tensor | None = None,
                  shared: tuple = (), exact: bool = False, all_states: bool = True) -> torch.Tensor:
    """States ``h_1 .. h_L`` (stacked) of a segment, or with ``all_states=False`` only ``h_L``;
    gradients by Highway-BP unless ``exact`` (ordinary autograd through the same layers) or no
    gradient is needed."""
    needed = torch.is_grad_enabled() and (
        h0.requires_grad or (step_side is not None and step_side.requires_grad)
        or any(s.requires_grad for s in shared) or any(p.requires_grad for p in seg.params))
    if exact or not needed or _plain_path():
        states = run_forward(seg, h0, step_side, shared)
        return states[1:] if all_states else states[-1]
    return HighwayFunction.apply(seg, h0, step_side, all_states, len(shared), *shared, *seg.params)


# -- measuring the approximation --------------------------------------------------------------

def gradient_cosines(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                     ks: Sequence[int]) -> dict[int, float]:
    """Cosine between the model's Highway gradient with k iterations and its exact gradient, per k.

    ``loss_fn(model)`` runs the model and returns a scalar loss. Buffers (BatchNorm statistics) are
    restored after every evaluation, so each k sees the same model.
    """
    segments = [m for m in model.modules() if hasattr(m, "highway_iterations")]
    if not segments:
        raise ValueError("the model has no highway segment (run the 'highway' pass first)")
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(k: int | None) -> torch.Tensor:
        saved = [(m, m.highway_iterations, m.exact) for m in segments]
        try:
            for m in segments:
                m.exact = k is None
                if k is not None:
                    m.highway_iterations = k
            with frozen_buffers(model):
                got = torch.autograd.grad(loss_fn(model), params, allow_unused=True)
        finally:
            for m, it, ex in saved:
                m.highway_iterations, m.exact = it, ex
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(got, params)])

    true = grads(None)
    out = {}
    for k in ks:
        g = grads(k)
        # in float64 whatever the model's precision: a float32 cosine of long vectors can exceed 1
        out[k] = float(torch.nn.functional.cosine_similarity(g.double(), true.double(), dim=0, eps=1e-300))
    return out
