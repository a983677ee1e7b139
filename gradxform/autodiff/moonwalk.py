"""Moonwalk: exact gradients in forward order from vector-inverse-Jacobian products (docs/methods.md §4).

A chain of units h_i = u_i(h_{i-1}) (a unit's state is a tuple: one tensor, or a coupling's two
streams). Backprop runs g_{i-1} = g_i J_i downwards and needs every h_{i-1} stored. Moonwalk runs the
recurrence upwards: g_i = vijp_i(g_{i-1}) = g_{i-1} R_i with R_i a right inverse of J_i, recomputing
h_i from h_{i-1} on the way and forming each unit's parameter gradient g_i ∂u_i/∂θ_i locally. What it
needs first is g_0, and for a unit whose Jacobian is not surjective, the part of g_i that J_i erases
(a *fragment*):

- ``mixed``: a reverse sweep computes input cotangents only (no parameter gradients), rebuilding the
  inputs of couplings by inversion and reading the inputs of other units from *anchors* (stored by the
  first forward, or recomputed from h_0); on the way it keeps each unit's fragment. Then the forward
  sweep.
- ``forward``: no reverse sweep: g_0 and every fragment come from JVPs (``torch.func.jvp`` batched with
  ``vmap``) along a basis of what is unknown, read out against the chain's output cotangent g_L. Exact;
  the cost grows with those dimensions.
- ``naive``: the baseline with no vijp at all: at every unit with parameters, its output cotangent
  from JVPs along a basis of its output through the rest of the chain (quadratic in depth).

How a unit carries a cotangent forward (its *rule*):

- coupling step (leapfrog, momentum): exactly invertible; one VJP of f per step gives both the vijp and
  the parameter gradient. Entering a chain doubles the state (x -> (x, x)): the fragment is the second
  stream's cotangent. Leaving it ((a, b) -> a) is submersive: right inverse (g, 0).
- ``isometry``: J J^T = c I (views, transposes, adding a constant, selections, pooling with disjoint
  windows): g_y = (J g_x) / c, one JVP.
- ``linear``: y = x W^T + b with out <= in: least squares through a factorisation of W W^T.
- ``cg``: any other surjective Jacobian (a strided convolution): least squares by conjugate gradients on
  J J^T, one JVP and one VJP per iteration.
- ``diag``: elementwise (ReLU, dropout, tanh, GELU): divide by the derivative; where it vanishes the
  cotangent is the fragment (the values where a ReLU's mask is 0).
- ``bn``: train-mode BatchNorm erases mean(g_y) and mean(g_y x_hat) per channel: 2 scalars per channel.
- ``ln``: LayerNorm erases the same two per row.
- ``whole``: anything else (a dimension-raising layer, a block that is not a chain): g_y is the fragment.

Every sweep sees the first forward's batch statistics (captured by :class:`Replay`) and the same dropout
noise (RNG replay); running statistics are updated once. Fragments, anchors and statistics are kept
through autograd's saved-tensor machinery, so ``saved_tensors_hooks`` (memory accounting, offloading)
see them like any saved activation. The carried g_L is compared with the loss gradient after every
backward: the drift check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import GradxformError

State = tuple[torch.Tensor, ...]
MODES = ("mixed", "forward", "naive")
ANCHORS = ("recompute", "store")

# ---------------------------------------------------------------------------------- replayed state


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed_rng(state: tuple, device: torch.device) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


_F_BATCH_NORM = {F.batch_norm}
_ATEN_BATCH_NORM = {torch.batch_norm, torch.ops.aten.batch_norm.default}
_DROPOUT = {F.dropout, torch.dropout, torch.ops.aten.dropout.default}
_COUNTER_BUMP = {torch.Tensor.add_, torch.ops.aten.add_.Tensor}


def _bn_apply(x: torch.Tensor, w: Any, b: Any, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    # The CPU kernel's own arithmetic (x * alpha + beta, fused), so that a replay reproduces the first
    # forward's activations bit for bit: a ReLU mask after a BatchNorm must not flip between the sweep
    # that keeps a fragment and the one that puts it back.
    shape = [1, -1] + [1] * (x.dim() - 2)
    alpha = invstd if w is None else invstd * w
    beta = -mean * alpha if b is None else b - mean * alpha
    return torch.addcmul(beta.view(shape), x, alpha.view(shape))


class _BatchNormReplay(torch.autograd.Function):
    """Train-mode BatchNorm on recorded batch statistics, with the train-mode derivative (the
    statistics' dependence on x included) and the same saved tensors as the native kernel."""

    @staticmethod
    def forward(ctx, x, w, b, mean, invstd):  # type: ignore[override]
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.has_w, ctx.has_b = w is not None, b is not None
        return _bn_apply(x, w, b, mean, invstd)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.has_w and ctx.needs_input_grad[1], ctx.has_b and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(g.contiguous(), x, w, None, None, mean, invstd,
                                                               True, 0.0, mask)
        return gx, gw, gb, None, None


class Replay(TorchFunctionMode):
    """Makes every sweep see what the first forward saw.

    Recording (the first forward): train-mode BatchNorm runs the native kernel (running statistics
    updated exactly as plain PyTorch would, once) and its batch mean and inverse std are kept per unit
    and call. Replaying: BatchNorm uses those statistics and leaves the buffers alone; under
    ``torch.func`` transforms (``functional``) through a formula whose value is the recorded statistics
    and whose derivative is the batch statistics'. Dropout noise is regenerated from the unit's RNG
    state, or, under ``vmap``, taken from noise prepared outside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recording = True
        self.functional = False
        self.unit = -1
        self.calls = 0      # BatchNorm calls so far in the running unit
        self.drops = 0      # dropout calls so far in the running unit
        self.stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.rng: dict[int, tuple] = {}
        self.dropouts: dict[int, list[tuple]] = {}     # unit -> [(shape, p, dtype, device)] in call order
        self.noise: dict[int, list[torch.Tensor]] = {}
        self.mixes_samples = False

    @contextlib.contextmanager
    def at(self, unit: int, random: bool, device: torch.device) -> Iterator[None]:
        """Run unit ``unit``: its statistics, its RNG state, its dropout noise."""
        prev = (self.unit, self.calls, self.drops)
        self.unit, self.calls, self.drops = unit, 0, 0
        rng: Any = contextlib.nullcontext()
        if random and not self.functional:
            if self.recording:
                self.rng[unit] = _rng_state(device)
                self.dropouts[unit] = []
            else:
                rng = _replayed_rng(self.rng[unit], device)
        try:
            with rng, self:
                yield
        finally:
            self.unit, self.calls, self.drops = prev

    def prepare_noise(self, units: Sequence[int], device: torch.device) -> None:
        """Dropout noise of ``units`` for transforms that cannot draw it (``vmap``), from their RNG states."""
        for u in units:
            if u in self.rng and u not in self.noise:
                with _replayed_rng(self.rng[u], device):
                    self.noise[u] = [torch.dropout(torch.ones(s, dtype=dt, device=dv), p, True)
                                     for s, p, dt, dv in self.dropouts[u]]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _F_BATCH_NORM or func in _ATEN_BATCH_NORM:
            return self._batch_norm(func, args, kwargs)
        if func in _DROPOUT:
            return self._dropout(func, args, kwargs)
        if func in _COUNTER_BUMP and not self.recording and not args[0].is_floating_point():
            # BatchNorm's batch counter: counted once, by the first forward (transforms reject the write)
            return args[0]
        return func(*args, **kwargs)

    def _batch_norm(self, func, args, kwargs):
        if func in _F_BATCH_NORM:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        else:
            names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                     "cudnn_enabled")
            defaults = {}
        a = {**defaults, **dict(zip(names, args)), **kwargs}
        if not a["training"]:
            return func(*args, **kwargs)
        x, w, b = a["input"], a["weight"], a["bias"]
        self.mixes_samples = True
        k = self.calls
        self.calls += 1
        if self.recording:
            out, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, a["running_mean"], a["running_var"],
                                                                 True, a["momentum"], a["eps"])
            self.stats.setdefault(self.unit, []).append((mean, invstd))
            return out
        mean, invstd = self.stats[self.unit][k]
        if not self.functional:
            return _BatchNormReplay.apply(x, w, b, mean, invstd)
        dims = [0] + list(range(2, x.dim()))
        m = x.mean(dims)
        inv = torch.rsqrt(x.var(dims, unbiased=False) + a["eps"])
        return _bn_apply(x, w, b, mean + (m - m.detach()), invstd + (inv - inv.detach()))

    def _dropout(self, func, args, kwargs):
        names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
        a = {"p": 0.5, "training": True, "inplace": False, **dict(zip(names, args)), **kwargs}
        train = a.get("training", a.get("train"))
        x, p = a["input"], float(a["p"])
        if not train or p == 0.0:
            return func(*args, **kwargs)
        k = self.drops
        self.drops += 1
        if self.functional:
            noise = self.noise[self.unit][k]
        else:
            # the CPU kernel draws bernoulli noise of x's shape and multiplies: on ones it returns the noise
            noise = torch.dropout(torch.ones_like(x), p, True)
            if self.recording:
                self.dropouts[self.unit].append((tuple(x.shape), p, x.dtype, x.device))
        return x * noise

    # The statistics and RNG states travel through ctx.save_for_backward, so that saved-tensor hooks see them.
    def pack(self) -> list[torch.Tensor]:
        """Every tensor the backward will need, flattened; the structure stays here."""
        self._layout = ({u: len(c) for u, c in self.stats.items()}, {u: [t is not None for t in r]
                                                                    for u, r in self.rng.items()})
        out = [t for u in sorted(self.stats) for pair in self.stats[u] for t in pair]
        out += [t for u in sorted(self.rng) for t in self.rng[u] if t is not None]
        self.stats, self.rng = {}, {}
        return out

    def unpack(self, tensors: Sequence[torch.Tensor]) -> None:
        it = iter(tensors)
        counts, present = self._layout
        self.stats = {u: [(next(it), next(it)) for _ in range(counts[u])] for u in sorted(counts)}
        self.rng = {u: tuple(next(it) if p else None for p in present[u]) for u in sorted(present)}
        self.recording = False


def uses_replay(module: nn.Module) -> tuple[bool, bool]:
    """(has BatchNorm, has dropout): whether a unit must run under :class:`Replay`, and whether it is random."""
    from ..ir.match import op_kind

    bn = drop = False
    for m in module.modules():
        bn |= isinstance(m, nn.modules.batchnorm._BatchNorm)
        drop |= isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
        graph = getattr(m, "graph", None)
        if graph is not None:
            for n in graph.nodes:
                kind = op_kind(n, m) if n.op != "call_module" else ""
                bn |= kind == "batch_norm"
                drop |= kind == "dropout"
    return bn, drop


def _math_attention() -> Any:
    # the fused scaled-dot-product kernels have no forward-mode rule (docs/methods.md §5)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# ---------------------------------------------------------------------------------- held tensors


class _Hold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, *tensors):  # type: ignore[override]
        ctx.save_for_backward(*tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override] # pragma: no cover - never differentiated
        return (None,) * (1 + len(ctx.saved_tensors))


class Held:
    """Tensors kept from one sweep to the next, kept the way autograd keeps saved tensors (through the
    active ``saved_tensors_hooks``), so that memory accounting and offloading hooks see them."""

    def __init__(self, tensors: Sequence[torch.Tensor | None]):
        self.present = [t is not None for t in tensors]
        kept = [t.detach() for t in tensors if t is not None]
        self.nbytes = sum(t.numel() * t.element_size() for t in kept)
        with torch.enable_grad():
            self._node = _Hold.apply(torch.empty(0, requires_grad=True), *kept)

    def take(self) -> list[torch.Tensor | None]:
        kept = iter(self._node.grad_fn.saved_tensors)
        self._node = None
        return [next(kept) if p else None for p in self.present]


# ---------------------------------------------------------------------------------- units


@dataclass
class Sink:
    """Where a sweep puts what it finds: parameter and side-input gradients, drift figures, counters."""

    index: dict[int, int]
    params: list
    sides: list
    drift: list = field(default_factory=list)          # (unit name, relative error of the carried cotangent)
    exit_residual: float = 0.0
    jvps: int = 0
    cg_iterations: int = 0
    fragment_bytes: dict[str, int] = field(default_factory=dict)

    def add(self, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for t, g in zip(tensors, grads):
            k = self.index.get(id(t))
            if g is None or k is None:
                continue
            self.params[k] = g if self.params[k] is None else self.params[k] + g

    def add_sides(self, wanted: Sequence[int], grads: Sequence[torch.Tensor | None]) -> None:
        for k, g in zip(wanted, grads):
            if g is not None:
                self.sides[k] = g if self.sides[k] is None else self.sides[k] + g


def _relative(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().norm() ** 2) for y in b) ** 0.5
    return num / den if den > 0 else num


class Unit:
    """One link of the chain: ``forward(state, side) -> state``."""

    name = ""
    rebuildable = False      # its input can be rebuilt from its output (mixed mode's reverse sweep)
    replay = False           # runs under Replay (BatchNorm or dropout inside)
    random = False
    rule = ""
    side_index: list[int] = []   # which of the chain's side inputs the unit reads
    _all: list[nn.Parameter] | None = None

    def parameters(self) -> list[nn.Parameter]:
        return []

    def sides(self, side: tuple) -> tuple:
        return tuple(side[k] for k in self.side_index)

    def forward(self, state: State, side: tuple) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.rule


class Enter(Unit):
    """Entering a coupling: x -> (x, x) (leapfrog) or (x, 0) (momentum). Its fragment is the second
    stream's cotangent (the dimension it adds)."""

    rule = "enter"
    rebuildable = True

    def __init__(self, coupling: Any, name: str):
        self.coupling, self.name = coupling, name

    def forward(self, state: State, side: tuple) -> State:
        return tuple(self.coupling.enter(state[0]))

    def inverse(self, state: State, side: tuple) -> State:
        return (state[0],)

    def reverse(self, state: State, grads: State) -> tuple[State, torch.Tensor]:
        if self.coupling.name == "leapfrog":
            return (grads[0] + grads[1],), grads[1]
        return (grads[0],), grads[1]

    def carry(self, x: State, gx: State, frag: torch.Tensor) -> tuple[State, State]:
        y = self.forward(x, ())
        if self.coupling.name == "leapfrog":
            return y, (gx[0] - frag, frag)
        return y, (gx[0], frag)


class Exit(Unit):
    """Leaving a coupling: (a, b) -> a, (a + b)/2 or x. Submersive: the right inverse puts the whole
    cotangent back on what the exit reads (its least-squares solution)."""

    rule = "exit"

    def __init__(self, coupling: Any, name: str):
        self.coupling, self.name = coupling, name

    def forward(self, state: State, side: tuple) -> State:
        return (self.coupling.exit(state),)

    def carry(self, x: State, gx: State, sink: Sink) -> tuple[State, State]:
        ga, gb = gx
        if getattr(self.coupling, "merge", "first") == "mean":
            # J = [I/2, I/2]: least squares g = ga + gb; the two halves agree when nothing drifted
            residual, g = ga - gb, ga + gb
        else:
            residual, g = gb, ga
        scale = float(g.detach().double().norm()) or 1.0
        sink.exit_residual = max(sink.exit_residual, float(residual.detach().double().norm()) / scale)
        return self.forward(x, ()), (g,)


class Step(Unit):
    """One coupling step with residual function ``block(a, *side)``: exactly invertible."""

    rule = "coupling"
    rebuildable = True

    def __init__(self, coupling: Any, block: nn.Module, name: str, random: bool = False,
                 side_index: Sequence[int] = ()):
        self.coupling, self.block, self.name = coupling, block, name
        self.side_index = list(side_index)
        bn, drop = uses_replay(block)
        self.random = random or drop
        self.replay = bn or self.random
        if coupling.name not in ("leapfrog", "momentum"):
            raise GradxformError(f"Moonwalk has no vijp for the '{coupling.name}' coupling",
                                 hint="use the leapfrog or momentum coupling")

    def parameters(self) -> list[nn.Parameter]:
        if self._all is None:
            self._all = list(self.block.parameters())
        return [p for p in self._all if p.requires_grad]

    def f(self, side: tuple) -> Callable:
        mine = self.sides(side)
        return lambda a: self.block(a, *mine)

    def forward(self, state: State, side: tuple) -> State:
        return tuple(self.coupling.step(state, self.f(side)))

    def describe(self) -> str:
        return self.coupling.describe()


class Map(Unit):
    """A layer or block h -> h' run by its own module ``module(h, *side)``, carried by ``rule``.

    ``spec`` holds what a rule needs to know of the layer: ``weight`` (attribute path of a Linear,
    BatchNorm or LayerNorm weight), ``eps`` and ``dims`` (LayerNorm's normalised dimensions).
    """

    RULES = ("isometry", "linear", "cg", "diag", "bn", "ln", "whole")

    def __init__(self, module: nn.Module, rule: str, name: str, spec: dict | None = None,
                 side_index: Sequence[int] = (), random: bool | None = None):
        if rule not in self.RULES:
            raise ValueError(f"unknown rule {rule!r}")
        self.module, self.rule, self.name = module, rule, name
        self.spec = dict(spec or {})
        self.side_index = list(side_index)
        bn, drop = uses_replay(module)
        self.random = drop if random is None else random
        self.replay = bn or self.random
        self._scale: dict[tuple, float] = {}

    def parameters(self) -> list[nn.Parameter]:
        if self._all is None:
            self._all = list(self.module.parameters())
        return [p for p in self._all if p.requires_grad]

    def forward(self, state: State, side: tuple) -> State:
        return (self.module(state[0], *self.sides(side)),)

    def weight(self) -> torch.Tensor | None:
        path = self.spec.get("weight")
        return None if path is None else self.module.get_parameter(path) if path in dict(
            self.module.named_parameters()) else self.module.get_buffer(path)

    def describe(self) -> str:
        return self.rule


# ---------------------------------------------------------------------------------- the engine


def _basis(shape: tuple, lo: int, hi: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unit tangents e_lo .. e_{hi-1} of a tensor of ``shape``: (hi - lo, *shape)."""
    n = 1
    for s in shape:
        n *= s
    eye = torch.zeros(hi - lo, n, dtype=dtype, device=device)
    eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1
    return eye.view(hi - lo, *shape)


class Engine:
    """Runs one chain of units: the first forward, then the gradients of one backward.

    ``units`` in order, ``side`` the tensors every unit may read (an attention mask), ``params`` every
    trainable parameter the units use. A fresh engine serves one forward and its backward.
    """

    def __init__(self, units: Sequence[Unit], mode: str = "mixed", anchors: str = "recompute", chunk: int = 256,
                 independent: bool | None = None, cg_tol: float | None = None, cg_iterations: int = 1000):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if anchors not in ANCHORS:
            raise ValueError(f"anchors must be one of {', '.join(ANCHORS)}, got {anchors!r}")
        self.units = list(units)
        self.mode, self.anchors, self.chunk = mode, anchors, chunk
        self.independent = independent
        self.cg_tol, self.cg_iterations = cg_tol, cg_iterations
        self.replay = Replay()
        self._params: dict[int, list[nn.Parameter]] = {}
        self.side: tuple = ()
        self.device = torch.device("cpu")
        # runs of units whose input cannot be rebuilt from their output: [lo, hi)
        self.runs: list[tuple[int, int]] = []
        i = 0
        while i < len(self.units):
            if self.units[i].rebuildable:
                i += 1
                continue
            j = i
            while j < len(self.units) and not self.units[j].rebuildable:
                j += 1
            self.runs.append((i, j))
            i = j

    # -- running units ------------------------------------------------------------------------
    def params_of(self, i: int) -> list[nn.Parameter]:
        if i not in self._params:
            self._params[i] = self.units[i].parameters()
        return self._params[i]

    def run(self, i: int, state: State) -> State:
        u = self.units[i]
        if not u.replay:
            return u.forward(state, self.side)
        with self.replay.at(i, u.random, self.device):
            return u.forward(state, self.side)

    def run_range(self, lo: int, hi: int, state: State) -> State:
        for i in range(lo, hi):
            state = self.run(i, state)
        return state

    def first_forward(self, h0: torch.Tensor, side: tuple) -> tuple[torch.Tensor, list[State]]:
        """h_L, and the inputs of the non-rebuildable runs when anchors are stored (mixed mode)."""
        self.side, self.device = side, h0.device
        anchors: list[State] = []
        state: State = (h0,)
        with torch.no_grad():
            for i in range(len(self.units)):
                if self.mode == "mixed" and i in self.stored_anchors():
                    anchors.append(state)
                state = self.run(i, state)
        self.replay.recording = False
        if len(state) != 1:
            raise GradxformError("a Moonwalk chain must end on one tensor, not a coupling's state",
                                 hint="close every reversible chain inside the Moonwalk chain")
        return state[0], anchors

    def stored_anchors(self) -> set[int]:
        """Units whose input the first forward keeps for mixed mode's reverse sweep: the first unit of every
        run that cannot be rebuilt (``store``), or only of the last run (``recompute``: rebuilding that one
        would cost a whole forward; the others are recomputed from h_0 when the sweep reaches them)."""
        starts = sorted(lo for lo, _ in self.runs if lo > 0)
        return set(starts if self.anchors == "store" else starts[-1:])

    def _independent(self, h0: torch.Tensor) -> bool:
        if self.independent is not None:
            return self.independent
        return not self.replay.mixes_samples and h0.dim() > 0 and h0.shape[0] > 1

    # -- the backward -------------------------------------------------------------------------
    def gradients(self, h0: torch.Tensor, gL: torch.Tensor, anchors: list[State], params: list,
                  want_g0: bool, side_wants: list[bool]) -> tuple[torch.Tensor | None, Sink]:
        sink = Sink({id(p): k for k, p in enumerate(params)}, [None] * len(params), [None] * len(self.side))
        self.side_wants = side_wants
        self.gL = gL
        if self.mode == "mixed":
            g0, frags = self.reverse_sweep(h0, gL, anchors, sink)
            self.forward_sweep(h0, g0, sink, lambda i, x: frags.pop(i, None))
        elif self.mode == "forward":
            indep = self._independent(h0)
            g0 = None
            if want_g0 or self.units[0].rule not in ("whole",):
                g0 = self._basis_cotangent(0, (h0,), 0, indep, sink)
            self.forward_sweep(h0, g0, sink, lambda i, x: self._forward_fragment(i, x, indep, sink))
        else:
            g0 = self.naive(h0, want_g0, sink)
        return g0, sink

    # -- mixed mode: the reverse sweep --------------------------------------------------------------
    def reverse_sweep(self, h0: torch.Tensor, gL: torch.Tensor, anchors: list[State], sink: Sink
                      ) -> tuple[torch.Tensor, dict[int, Held]]:
        """Input cotangents only, top to bottom; returns g_0 and the fragments of the units."""
        frags: dict[int, Held] = {}
        stored = dict(zip(sorted(self.stored_anchors()), anchors))
        g: State = (gL,)
        state: State | None = None
        i = len(self.units) - 1
        runs = {hi - 1: lo for lo, hi in self.runs}
        while i >= 0:
            u = self.units[i]
            if u.rebuildable:
                assert state is not None
                if isinstance(u, Step):
                    state, g = self._step_reverse(i, state, g)
                else:
                    state, gx = self._enter_reverse(i, state, g, frags, sink)
                    g = gx
                i -= 1
                continue
            lo = runs[i]
            if lo == 0:
                x: State = (h0,)
            elif lo in stored:
                x = stored.pop(lo)
            else:  # recompute the anchor from h_0 (nothing of it was kept)
                with torch.no_grad():
                    x = self.run_range(0, lo, (h0,))
            state, g = self._run_reverse(lo, i + 1, x, g, frags, sink)
            i = lo - 1
        return g[0], frags

    def _step_reverse(self, i: int, state: State, g: State) -> tuple[State, State]:
        u = self.units[i]

        def f_vjp(a: torch.Tensor, cot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                a_ = a.detach().requires_grad_(True)
                out = self.run_f(i, a_)
                (ga,) = torch.autograd.grad(out, [a_], cot, allow_unused=True)
            return out.detach(), torch.zeros_like(a) if ga is None else ga

        state, g = u.coupling.step_backward(state, g, f_vjp)
        return tuple(state), tuple(g)

    def run_f(self, i: int, a: torch.Tensor) -> torch.Tensor:
        u = self.units[i]
        if not u.replay:
            return u.block(a, *u.sides(self.side))
        with self.replay.at(i, u.random, self.device):
            return u.block(a, *u.sides(self.side))

    def _enter_reverse(self, i: int, state: State, g: State, frags: dict, sink: Sink) -> tuple[State, State]:
        u = self.units[i]
        gx, frag = u.reverse(state, g)
        frags[i] = Held([frag])
        sink.fragment_bytes[u.name] = frags[i].nbytes
        return u.inverse(state, self.side), gx

    def _run_reverse(self, lo: int, hi: int, x: State, g: State, frags: dict, sink: Sink) -> tuple[State, State]:
        """Recompute units lo..hi-1 from their input under autograd; cotangents of every link in one backward."""
        with torch.enable_grad():
            states = [tuple(t.detach().requires_grad_(True) for t in x)]
            for i in range(lo, hi):
                y = self.run(i, states[-1])
                # a unit that returns its input (an identity, a merge 'first') gets a node of its own
                y = tuple(t.view_as(t) if any(t is s for s in states[-1]) else t for t in y)
                states.append(y)
            inputs = [t for s in states[:-1] for t in s]
            got = torch.autograd.grad(states[-1], inputs, g, allow_unused=True)
        cot: list[State] = []
        k = 0
        for s in states[:-1]:
            cot.append(tuple(torch.zeros_like(t) if got[k + j] is None else got[k + j] for j, t in enumerate(s)))
            k += len(s)
        cot.append(g)
        for i in range(lo, hi):
            u = self.units[i]
            if isinstance(u, Map) and u.rule in ("whole", "diag", "bn", "ln"):
                xi = states[i - lo][0].detach()
                frag = self._fragment(i, xi, cot[i - lo + 1][0])
                frags[i] = Held(frag)
                sink.fragment_bytes[u.name] = frags[i].nbytes
        return tuple(t.detach() for t in states[0]), cot[0]

    # -- fragments -------------------------------------------------------------------------------
    def _zero_mask(self, d: torch.Tensor) -> torch.Tensor:
        # where the derivative vanishes (a ReLU's mask, dropped units) or is too small to divide by
        tol = torch.finfo(d.dtype).eps ** 0.5
        return d.abs() <= tol * d.abs().max().clamp_min(torch.finfo(d.dtype).tiny)

    def _derivative(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, dy/dx) of an elementwise unit, by one JVP along ones."""
        fn = lambda t: self.run(i, (t,))[0]  # noqa: E731
        with self._functional([i]):
            y, d = torch.func.jvp(fn, (x,), (torch.ones_like(x),))
        return y, d

    def _norm_terms(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], Any, bool]:
        """For a BatchNorm or LayerNorm unit at input x: (x_hat, factor, reduced dims, w, degenerate) with
        g_x = factor * (h - mean(h) - x_hat mean(h x_hat)) and h = g_y * w (w None: h = g_y).
        ``degenerate``: a zero scale erases a whole slice, so the cotangent must be kept whole."""
        u = self.units[i]
        assert isinstance(u, Map)
        w = u.weight()
        degenerate = w is not None and bool((w == 0).any())
        if u.rule == "bn":
            dims = [0] + list(range(2, x.dim()))
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean, invstd = self.replay.stats[i][0]
            xhat = (x - mean.view(shape)) * invstd.view(shape)
            factor = invstd.view(shape) * (w.view(shape) if w is not None else 1.0)
            return xhat, factor, dims, None, degenerate
        k = len(u.spec["dims"])
        dims = list(range(x.dim() - k, x.dim()))
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + u.spec["eps"])
        return (x - mean) * invstd, invstd, dims, w, degenerate

    def _fragment(self, i: int, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor | None]:
        u = self.units[i]
        gy = gy.detach()
        if u.rule == "whole":
            return [gy]
        if u.rule == "diag":
            _, d = self._derivative(i, x)
            return [gy[self._zero_mask(d)]]
        if u.rule == "bn" and i not in self.replay.stats:  # eval mode: an elementwise map
            return [gy[self._zero_mask(self._bn_eval_derivative(i, x))]]
        xhat, _, dims, w, degenerate = self._norm_terms(i, x)
        if degenerate:
            return [gy]
        h = gy if w is None else gy * w
        return [h.mean(dims, keepdim=True), (h * xhat).mean(dims, keepdim=True)]

    def _bn_eval_derivative(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._derivative(i, x)[1]

    # -- the forward sweep -----------------------------------------------------------------------
    def forward_sweep(self, h0: torch.Tensor, g0: torch.Tensor | None, sink: Sink,
                      fragment: Callable[[int, State], Any]) -> None:
        x: State = (h0,)
        g: State | None = None if g0 is None else (g0,)
        for i, u in enumerate(self.units):
            frag = fragment(i, x) if (isinstance(u, Enter) or (isinstance(u, Map) and u.rule in
                                                             ("whole", "diag", "bn", "ln"))) else None
            if isinstance(frag, Held):
                frag = frag.take()
            x, g = self._carry(i, x, g, frag, sink)
        last = self.units[-1]
        if g is not None and not (isinstance(last, Map) and last.rule == "whole"):
            sink.drift.append((last.name, _relative(g, (self.gL,))))

    def _carry(self, i: int, x: State, g: State | None, frag: Any, sink: Sink) -> tuple[State, State | None]:
        u = self.units[i]
        if isinstance(u, Enter):
            return u.carry(x, g, frag[0] if isinstance(frag, list) else frag)
        if isinstance(u, Exit):
            return u.carry(x, g, sink)
        if isinstance(u, Step):
            return self._step_carry(i, x, g, sink)
        return self._map_carry(i, x, g, frag, sink)

    def _step_carry(self, i: int, x: State, g: State, sink: Sink) -> tuple[State, State]:
        """The coupling's vijp: one recompute of f, one VJP for the input and parameter cotangents."""
        u = self.units[i]
        assert isinstance(u, Step)
        params = self.params_of(i)
        wanted = [k for k, w in enumerate(self.side_wants) if w]
        if u.coupling.name == "leapfrog":
            (a, b), (ga, gb) = x, g
            at, cot, scale = a, gb, 1.0
        else:
            (a, v), (ga, gv) = x, g
            gamma = u.coupling.gamma
            s = gv / gamma
            at, cot, scale = a, (1.0 - gamma) * s, 1.0 - gamma
        with torch.enable_grad():
            a_ = at.detach().requires_grad_(True)
            side = tuple(t.detach().requires_grad_(True) if k in wanted else t for k, t in enumerate(self.side))
            saved, self.side = self.side, side
            try:
                fa = self.run_f(i, a_)
            finally:
                self.side = saved
            got = torch.autograd.grad(fa, [a_] + params + [side[k] for k in wanted], cot, allow_unused=True)
        fa = fa.detach()
        u_in = torch.zeros_like(a) if got[0] is None else got[0]
        sink.add(params, got[1:1 + len(params)])
        sink.add_sides(wanted, got[1 + len(params):])
        if u.coupling.name == "leapfrog":
            return (b + fa, a), (gb, ga - u_in)
        gx_new = ga - u_in
        v_new = gamma * v + scale * fa
        return (a + v_new, v_new), (gx_new, s - gx_new)

    def _map_carry(self, i: int, x: State, g: State | None, frag: Any, sink: Sink) -> tuple[State, State]:
        u = self.units[i]
        assert isinstance(u, Map)
        xt = x[0]
        gx = None if g is None else g[0]
        rule = u.rule
        if rule == "bn" and i not in self.replay.stats:
            rule = "diag"  # eval mode
        y: torch.Tensor | None = None
        if rule == "whole":
            gy = frag[0]
            if g is not None:
                # free drift check: the carried cotangent against the stored one pulled back
                y, back = self._local_vjp(i, xt, gy, sink, want_input=True)
                sink.drift.append((u.name, _relative((gx,), (back,))))
                return (y,), (gy,)
        elif rule == "isometry":
            y, t = self._jvp(i, xt, gx)
            gy = t / self._isometry_scale(i, xt, y)
        elif rule == "diag":
            y, d = self._derivative(i, xt)
            zero = self._zero_mask(d)
            gy = gx / torch.where(zero, torch.ones_like(d), d)
            gy = gy.masked_scatter(zero, frag[0]) if frag[0].numel() == int(zero.sum()) else self._mismatch(u)
        elif rule in ("bn", "ln"):
            gy = self._norm_carry(i, xt, gx, frag)
        elif rule == "linear":
            gy = self._linear_carry(u, gx)
        else:
            y, gy = self._cg_carry(i, xt, gx, sink)
        y = self._local_vjp(i, xt, gy, sink)[0] if (self.params_of(i) or any(self.side_wants)) else (
            y if y is not None else self.run(i, (xt,))[0])
        return (y,), (gy,)

    def _mismatch(self, u: Unit) -> torch.Tensor:
        raise GradxformError(f"Moonwalk: the fragment of '{u.name}' does not fit its recomputed mask (the first "
                             f"forward and the recompute disagree on which units are zero)",
                             hint="the layer is not deterministic; train it as a stored-input block "
                                  "(moonwalk{fragments=false})")

    def _local_vjp(self, i: int, x: torch.Tensor, gy: torch.Tensor, sink: Sink, want_input: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Recompute unit i at x under autograd; its parameter (and side) gradients for output cotangent gy."""
        u = self.units[i]
        params = self.params_of(i)
        wanted = [k for k, w in enumerate(self.side_wants) if w and (not isinstance(u, Map) or k in u.side_index)]
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(want_input)
            side = tuple(t.detach().requires_grad_(True) if k in wanted else t for k, t in enumerate(self.side))
            saved, self.side = self.side, side
            try:
                y = self.run(i, (x_,))[0]
            finally:
                self.side = saved
            targets = ([x_] if want_input else []) + params + [side[k] for k in wanted]
            got = torch.autograd.grad(y, targets, gy, allow_unused=True) if targets else ()
        back = None
        if want_input:
            back = torch.zeros_like(x) if got[0] is None else got[0]
            got = got[1:]
        sink.add(params, got[:len(params)])
        sink.add_sides(wanted, got[len(params):])
        return y.detach(), back

    @contextlib.contextmanager
    def _functional(self, units: Sequence[int]) -> Iterator[None]:
        prev = self.replay.functional
        self.replay.prepare_noise(units, self.device)
        self.replay.functional = True
        try:
            with _math_attention():
                yield
        finally:
            self.replay.functional = prev

    def _vjp_fn(self, i: int, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> v J of unit i at x, through one autograd graph (``torch.func.vjp`` refuses to run under the
        saved-tensor hooks that memory accounting and offloading install)."""
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            y = self.run(i, (x_,))[0]

        def vjp(v: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(y, [x_], v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(x_) if g is None else g

        return vjp

    def _jvp(self, i: int, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = lambda z: self.run(i, (z,))[0]  # noqa: E731
        with self._functional([i]):
            return torch.func.jvp(fn, (x,), (t,))

    def _isometry_scale(self, i: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """c with J J^T = c I, probed once per input shape (J J^T 1 must be constant)."""
        key = tuple(x.shape)
        u = self.units[i]
        assert isinstance(u, Map)
        if key not in u._scale:
            fn = lambda z: self.run(i, (z,))[0]  # noqa: E731
            back = self._vjp_fn(i, x)(torch.ones_like(y))
            with self._functional([i]):
                _, probe = torch.func.jvp(fn, (x,), (back,))
            c = float(probe.mean())
            spread = float((probe - c).abs().max())
            if c <= 0 or spread > 1e-6 * abs(c):
                raise GradxformError(f"Moonwalk: '{u.name}' was taken for an isometry (J J^T = c I) but is not "
                                     f"(J J^T 1 spreads by {spread:.2g} around {c:.3g})",
                                     hint="this is a misclassification in the moonwalk pass; please report it")
            u._scale[key] = c
        return u._scale[key]

    def _norm_carry(self, i: int, x: torch.Tensor, gx: torch.Tensor, frag: list) -> torch.Tensor:
        xhat, factor, dims, w, _ = self._norm_terms(i, x)
        if len(frag) == 1:  # kept whole (a zero scale)
            return frag[0]
        f0, f1 = frag
        h = gx / factor + f0 + xhat * f1
        return h if w is None else h / w

    def _linear_carry(self, u: Map, gx: torch.Tensor) -> torch.Tensor:
        """g_y = g_x W^T (W W^T)^-1: the least-squares right inverse of y = x W^T + b."""
        w = u.weight()
        assert w is not None
        # the factorisation wants at least float32 (and half-precision kernels for it do not exist)
        work = torch.promote_types(w.dtype, torch.float32)
        w = w.detach().to(work)
        rhs = gx.reshape(-1, w.shape[1]).to(work) @ w.T                  # (rows, out)
        gram = w @ w.T
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs.T, chol).T
        else:  # W is rank-deficient: the minimum-norm least-squares solution
            sol = torch.linalg.lstsq(gram, rhs.T).solution.T
        return sol.reshape(*gx.shape[:-1], w.shape[0]).to(gx.dtype)

    def _cg_carry(self, i: int, x: torch.Tensor, gx: torch.Tensor, sink: Sink) -> tuple[torch.Tensor, torch.Tensor]:
        """Least squares J^T u = g_x by conjugate gradients on (J J^T) u = J g_x."""
        fn = lambda z: self.run(i, (z,))[0]  # noqa: E731
        tol = self.cg_tol if self.cg_tol is not None else (1e-13 if x.dtype == torch.float64 else 1e-6)
        vjp_fn = self._vjp_fn(i, x)
        with self._functional([i]):

            def op(v: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(fn, (x,), (vjp_fn(v),))[1]

            y, b = torch.func.jvp(fn, (x,), (gx,))
            u_ = torch.zeros_like(b)
            r = b.clone()
            p = r.clone()
            rr = float((r * r).sum())
            stop = tol * tol * max(rr, torch.finfo(x.dtype).tiny)
            for _ in range(self.cg_iterations):
                if rr <= stop:
                    break
                ap = op(p)
                alpha = rr / float((p * ap).sum())
                u_ = u_ + alpha * p
                r = r - alpha * ap
                rr_new = float((r * r).sum())
                p = r + (rr_new / rr) * p
                rr = rr_new
                sink.cg_iterations += 1
        return y.detach(), u_

    # -- forward mode -------------------------------------------------------------------------------
    def _directional(self, start: int, state: State, which: int, tangents: torch.Tensor, indep: bool,
                     sink: Sink) -> torch.Tensor:
        """<g_L, dh_L> along each tangent (k, *state[which].shape) placed on state[which], the input of
        unit ``start``; (k, B) per sample when ``indep``, else (k,)."""
        gL = self.gL
        sink.jvps += tangents.shape[0]
        red = list(range(1, gL.dim())) if indep else list(range(gL.dim()))
        if start >= len(self.units) and len(state) == 1:
            return (tangents * gL).sum([d + 1 for d in red])

        def rest(z: torch.Tensor) -> torch.Tensor:
            s = tuple(z if k == which else t for k, t in enumerate(state))
            return self.run_range(start, len(self.units), s)[0]

        def one(t: torch.Tensor) -> torch.Tensor:
            out = torch.func.jvp(rest, (state[which],), (t,))[1]
            return (out * gL).sum(red)

        with self._functional(range(start, len(self.units))):
            return torch.func.vmap(one, chunk_size=self.chunk, randomness="same")(tangents)

    def _basis_cotangent(self, start: int, state: State, which: int, indep: bool, sink: Sink,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """The cotangent of state[which] (the input of unit ``start``), by JVPs along a basis; only the
        entries under ``mask`` (a bool tensor of its shape) when given."""
        t = state[which].detach()
        out = torch.zeros_like(t)
        if indep:
            per = t[0].numel()
            flat = out.view(t.shape[0], per)
            for lo in range(0, per, self.chunk):
                hi = min(per, lo + self.chunk)
                tang = _basis(tuple(t.shape[1:]), lo, hi, t.dtype, t.device)
                tang = tang.unsqueeze(1).expand(hi - lo, *t.shape).contiguous()
                flat[:, lo:hi] = self._directional(start, state, which, tang, True, sink).T
            return out
        flat = out.view(-1)
        where = torch.arange(t.numel(), device=t.device) if mask is None else mask.reshape(-1).nonzero().view(-1)
        for lo in range(0, where.numel(), self.chunk):
            idx = where[lo:lo + self.chunk]
            tang = torch.zeros(idx.numel(), t.numel(), dtype=t.dtype, device=t.device)
            tang[torch.arange(idx.numel()), idx] = 1
            flat[idx] = self._directional(start, state, which, tang.view(idx.numel(), *t.shape), False, sink)
        return out

    def _forward_fragment(self, i: int, x: State, indep: bool, sink: Sink) -> list | torch.Tensor:
        """A unit's fragment by JVPs from its output (forward mode)."""
        u = self.units[i]
        with torch.no_grad():
            y = self.run(i, x)
        if isinstance(u, Enter):
            return self._basis_cotangent(i + 1, y, 1, indep, sink)
        assert isinstance(u, Map)
        xt = x[0]
        if u.rule == "whole":
            return [self._basis_cotangent(i + 1, y, 0, indep, sink)]
        if u.rule == "diag" or (u.rule == "bn" and i not in self.replay.stats):
            _, d = self._derivative(i, xt)
            zero = self._zero_mask(d)
            if not bool(zero.any()):
                return [d.new_empty(0)]
            gy = self._basis_cotangent(i + 1, y, 0, indep, sink, mask=None if indep else zero)
            return [gy[zero]]
        xhat, _, dims, w, degenerate = self._norm_terms(i, xt)
        if degenerate:
            return [self._basis_cotangent(i + 1, y, 0, indep, sink)]
        # mean(h) and mean(h x_hat) per slice, with h = g_y * w: derivatives along w * 1_slice and w * x_hat_slice
        yt = y[0]
        kept = [d for d in range(yt.dim()) if d not in dims]
        groups = yt.new_zeros([yt.shape[d] for d in kept])
        count = 1
        for d in dims:
            count *= yt.shape[d]
        per_sample = indep and u.rule == "ln"
        lead = list(groups.shape[1:]) if per_sample else list(groups.shape)
        n = 1
        for s in lead:
            n *= s
        f0 = torch.zeros(groups.shape, dtype=yt.dtype, device=yt.device)
        f1 = torch.zeros_like(f0)
        wb = 1.0 if w is None else w
        for lo in range(0, n, self.chunk):
            hi = min(n, lo + self.chunk)
            sel = _basis(tuple(lead), lo, hi, yt.dtype, yt.device)        # (k, *lead)
            if per_sample:
                sel = sel.unsqueeze(1).expand(hi - lo, *groups.shape)
            shape = [hi - lo] + [yt.shape[d] if d in kept else 1 for d in range(yt.dim())]
            sel = sel.reshape(shape)
            ones = (sel * wb).expand(hi - lo, *yt.shape).contiguous()
            xh = sel * wb * xhat
            d0 = self._directional(i + 1, y, 0, ones, per_sample, sink)
            d1 = self._directional(i + 1, y, 0, xh.contiguous(), per_sample, sink)
            if per_sample:
                f0.view(f0.shape[0], -1)[:, lo:hi] = d0.T
                f1.view(f1.shape[0], -1)[:, lo:hi] = d1.T
            else:
                f0.view(-1)[lo:hi] = d0
                f1.view(-1)[lo:hi] = d1
        shape = [yt.shape[d] if d in kept else 1 for d in range(yt.dim())]
        return [(f0 / count).reshape(shape), (f1 / count).reshape(shape)]

    # -- the naive baseline -------------------------------------------------------------------------
    def naive(self, h0: torch.Tensor, want_g0: bool, sink: Sink) -> torch.Tensor | None:
        """At every unit with parameters, its output cotangent by JVPs along a basis of its output through
        the rest of the chain; then the unit's local VJP. No vijp, no fragments: quadratic in depth."""
        indep = self._independent(h0)
        state: State = (h0,)
        g0 = self._basis_cotangent(0, state, 0, indep, sink) if want_g0 else None
        for i, u in enumerate(self.units):
            with torch.no_grad():
                y = self.run(i, state)
            if self.params_of(i) or (any(self.side_wants) and not isinstance(u, (Enter, Exit))):
                gy = tuple(self._basis_cotangent(i + 1, y, k, indep, sink) for k in range(len(y)))
                self._naive_local(i, state, gy, sink)
            state = y
        return g0

    def _naive_local(self, i: int, x: State, gy: State, sink: Sink) -> None:
        u = self.units[i]
        if isinstance(u, Map):
            self._local_vjp(i, x[0], gy[0], sink)
            return
        params = self.params_of(i)
        wanted = [k for k, w in enumerate(self.side_wants) if w]
        with torch.enable_grad():
            side = tuple(t.detach().requires_grad_(True) if k in wanted else t for k, t in enumerate(self.side))
            saved, self.side = self.side, side
            try:
                y = self.run(i, x)
            finally:
                self.side = saved
            live = [(t, c) for t, c in zip(y, gy) if t.requires_grad]  # a leapfrog step passes a through
            got = torch.autograd.grad([t for t, _ in live], params + [side[k] for k in wanted],
                                      [c for _, c in live], allow_unused=True)
        sink.add(params, got[:len(params)])
        sink.add_sides(wanted, got[len(params):])


__all__ = ["Engine", "Unit", "Enter", "Exit", "Step", "Map", "Replay", "Held", "Sink", "MODES", "ANCHORS",
           "uses_replay"]
