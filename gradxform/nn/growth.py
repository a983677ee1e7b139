"""Growing a network while it trains (TINY): statistics, the best update, new neurons, line search.

For a growable pair l1 -> sigma -> l2 (``gradxform.ir.growth``), over a statistical batch of n samples
(for a convolution, every output position is a sample):

    B     input of l2, unfolded, with a ones column when l2 has a bias          (n x dB)
    dA    gradient of the *summed* loss at l2's output, one row per sample      (n x out)
    B_-2  input of l1, unfolded, with a ones column when l1 has a bias          (n_-2 x d)
    S = B^T B/n   M = B^T dA/n   S_-2 = B_-2^T B_-2/n_-2   M_-2 = Z^T dA/n   C = Z^T B/n

where Z is B_-2 read at the positions l2's kernel covers (for a Linear, Z = B_-2). Then

    dW* = (S^-1 M)^T                          the best move of l2's weights; it lowers the summed loss
    D   = tr(M^T S^-1 M)                      by gamma n D + o(gamma)
    N   = -M_-2 + C dW*^T                     = -Z^T v_proj / n, v_proj = dA - B dW*^T the bottleneck
    S_-2^-1/2 N = U diag(s) V^T               new neurons alpha = (S_-2^-1/2 U_k sqrt(s_k))^T,
                                              omega = V_k sqrt(s_k), first-order gain sigma'(0) sum s_k^2

For a k x k second convolution N is exact, and S_-2 stands in for the covariance of each kernel
offset's inputs (the covariance between neighbouring positions is dropped): the linear term -- and so
the first-order gain -- is exact, the normalisation approximate. The line search measures the truth.

The new neurons enter with a factor gamma on alpha and on omega (zero at gamma = 0: the function is
unchanged) while l2 moves by -gamma dW*; gamma is chosen on a held-out batch. Parameters keep their
identity (their data is replaced), so optimizer parameter groups stay valid; the optimizer's state
grows with zeros for the new rows and columns and keeps the old entries (momentum is not lost).
What caches shapes (DDP buckets, compiled graphs) must be rebuilt when a step reports ``grown``.

Traps (ALGORITHMS.md): sums over many batches divided once; reduction='sum'; eigh with eigenvalues
below 1e-6 dropped for S^-1/2; float64; norms between the layers grow too (gamma 1, beta 0, mean 0,
variance 1). A batch norm in training mode normalises a new unit's input, so its scale then enters
through omega alone: the function still starts unchanged and moves continuously with gamma.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import GradxformError
from ..ir.growth import BlockSite, GrowablePair, Layer, explain_none, growable_pairs, growth_record
from ..state import frozen_buffers

# sigma'(0) of each activation: the right derivative for ReLU (a new unit starts on its linear side).
SLOPE_AT_ZERO = {"relu": 1.0, "gelu": 0.5, "silu": 0.5, "tanh": 1.0, "sigmoid": 0.25}
# The line search's scales: 0 and a log grid (the DAG code's), extended by decades while the loss falls.
DEFAULT_GAMMAS = (0.0,) + tuple(10.0 ** (e / 2) for e in range(-8, 1))

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def summed_cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over samples (statistics need reduction='sum': dA is per sample)."""
    logits = output["logits"] if isinstance(output, dict) else output
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")


def slope_at_zero(kinds: Sequence[str]) -> float:
    """sigma'(0) of a chain of activations (1 with none)."""
    return math.prod(SLOPE_AT_ZERO[k] for k in kinds)


# ------------------------------------------------------------------------------------- statistics

def input_rows(x: torch.Tensor, layer: Layer, gm: fx.GraphModule, ones: bool) -> torch.Tensor:
    """A layer's input as one row per sample (every output position of a convolution is a sample)."""
    if layer.kind == "conv":
        cols = F.unfold(x, layer.kernel(gm), dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if ones:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def output_rows(a: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv":
        return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    return a.reshape(-1, a.shape[-1])


def kernel_products(x_prev: torch.Tensor, hidden: torch.Tensor, pair: GrowablePair, gm: fx.GraphModule,
                    Y: torch.Tensor) -> torch.Tensor:
    """Z^T Y, where row p of Z holds l1's unfolded inputs at every offset of l2's kernel around l2's
    output position p (column ``i * K + q``: feature i of B_-2 at kernel offset q). For a Linear, Z = B_-2.

    For a convolution Z is never built: Z^T Y is the weight gradient of a convolution with l2's
    geometry whose input is B_-2 laid out as a feature map and whose output gradient is Y (one kernel
    call instead of a second unfold). Zero padding of that map pads the ones column too: a padded
    position has no unit, so no bias.
    """
    first, second = pair.first, pair.second
    ones = first.bias is not None
    if first.kind == "linear":
        return input_rows(x_prev, first, gm, ones).T @ Y
    cols = F.unfold(x_prev, first.kernel(gm), dilation=first.dilation, padding=first.padding, stride=first.stride)
    if ones:
        cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], 1)
    n, d = cols.shape[0], cols.shape[1]
    grid = cols.reshape(n, d, hidden.shape[2], hidden.shape[3])
    kh, kw = second.kernel(gm)
    out_h = (hidden.shape[2] + 2 * second.padding[0] - second.dilation[0] * (kh - 1) - 1) // second.stride[0] + 1
    out_w = (hidden.shape[3] + 2 * second.padding[1] - second.dilation[1] * (kw - 1) - 1) // second.stride[1] + 1
    y = Y.reshape(n, out_h, out_w, Y.shape[1]).permute(0, 3, 1, 2)
    shape = grid.new_zeros(()).expand(Y.shape[1], d, kh, kw)   # the weight is read for its shape only
    _, gw, _ = torch.ops.aten.convolution_backward(y, grid, shape, None, list(second.stride), list(second.padding),
                                                   list(second.dilation), False, [0, 0], 1, [False, True, False])
    return gw.permute(1, 2, 3, 0).reshape(d * kh * kw, Y.shape[1])


@dataclass
class PairStatistics:
    """Sums over the statistical batch; :meth:`finalise` divides them once.

    One pass gathers S, M, S_-2, M_-2 and C. In two passes the first gathers S, M, S_-2, and the
    second, knowing dW*, gathers N = -Z^T v_proj / n directly: its product has ``out`` columns instead
    of ``out + dB`` (C's width grows with the hidden width; for convolutions it is most of the cost).
    """

    S: torch.Tensor | None
    M: torch.Tensor | None
    S_prev: torch.Tensor | None
    M_prev: torch.Tensor | None = None
    C: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None   # ||dA||^2 (divided: per sample)
    n: int = 0                            # rows of B (samples x l2 output positions)
    n_prev: int = 0                       # rows of B_-2
    positions: tuple[int, int] = (1, 1)   # output positions per sample of l1 and l2
    N: torch.Tensor | None = None         # -Z^T v_proj (divided: N itself), from a second pass
    final: bool = False

    def finalise(self) -> "PairStatistics":
        if self.final:
            return self
        n, n_prev = max(self.n, 1), max(self.n_prev, 1)

        def div(t: torch.Tensor | None, by: int) -> torch.Tensor | None:
            return None if t is None else t / by

        return PairStatistics(div(self.S, n), div(self.M, n), div(self.S_prev, n_prev), div(self.M_prev, n),
                              div(self.C, n), div(self.grad_sq, n), self.n, self.n_prev, self.positions,
                              None if self.N is None else -self.N / n, True)


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping the values of the watched nodes (works for both tracer spellings)."""

    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node]):
        super().__init__(gm)
        self.watch, self.seen = watch, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watch:
            self.seen[n] = out
        return out


def _as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def collect_statistics(gm: fx.GraphModule, pairs: Sequence[GrowablePair], batches: Iterable[tuple[Any, torch.Tensor]],
                       loss_fn: LossFn = summed_cross_entropy, dtype: torch.dtype = torch.float64,
                       samples: int | None = None, *, kernel: bool = True,
                       moves: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, PairStatistics], float, int]:
    """Statistics of every pair over the batches; returns (statistics, summed loss, samples seen).

    By default S, M, S_-2, M_-2 and C; ``kernel=False`` leaves out the two products with Z (M_-2, C);
    ``moves`` ({pair: dW*}) gathers only N = -Z^T (dA - B dW*^T) / n, the second of two passes.
    The graph runs in its current mode with the RNG seeded alike on every call (dropout draws the same
    masks in both passes); BatchNorm statistics, parameter gradients and the global RNG are left as
    they were (the statistics are invisible to training). ``samples`` stops early.
    """
    watch = set()
    for p in pairs:
        watch |= {p.first.node.args[0], p.first.node, p.second.node.args[0], p.second.node}
    acc: dict[str, PairStatistics] = {}
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[]), frozen_buffers(gm), torch.enable_grad():
        torch.manual_seed(0)
        for x, y in batches:
            if samples is not None and seen >= samples:
                break
            rec = _Recorder(gm, watch)
            loss = loss_fn(rec.run(*_as_args(x)), y)
            outs = [rec.seen[p.second.node] for p in pairs]
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
            total += float(loss.detach())
            seen += int(_as_args(x)[0].shape[0])
            with torch.no_grad():
                for p, g in zip(pairs, grads):
                    _accumulate(acc, p, gm, rec.seen, g, dtype, kernel, None if moves is None else moves[p.name])
    return {k: v.finalise() for k, v in acc.items()}, total, seen


def _add(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    return new if old is None else old + new


def _accumulate(acc: dict[str, PairStatistics], p: GrowablePair, gm: fx.GraphModule, seen: dict,
                grad: torch.Tensor | None, dtype: torch.dtype, kernel: bool, move: torch.Tensor | None) -> None:
    """Add one batch. Each batch's products are taken in the activations' dtype (for a float32 model
    the Z products are the cost of a growth step) and summed in ``dtype``."""
    x_prev, hidden = seen[p.first.node.args[0]].detach(), seen[p.first.node].detach()
    b_in, a = seen[p.second.node.args[0]].detach(), seen[p.second.node]
    if grad is None:
        grad = torch.zeros_like(a)
    B = input_rows(b_in, p.second, gm, p.second.bias is not None)
    dA = output_rows(grad, p.kind).to(B.dtype)
    out = dA.shape[1]
    s = acc.get(p.name)
    if s is None:
        per = (hidden[0, 0].numel() if p.kind == "conv" else hidden[0].numel() // hidden.shape[-1],
               a[0, 0].numel() if p.kind == "conv" else a[0].numel() // a.shape[-1])
        s = acc[p.name] = PairStatistics(None, None, None, positions=per)
    s.n += B.shape[0]
    if move is not None:
        v = dA - B @ move.to(B.dtype).T                                      # v_proj
        s.N = _add(s.N, kernel_products(x_prev, hidden, p, gm, v).to(dtype))
        return
    Y = torch.cat([dA, B], 1)                                                # [dA | B]
    Bp = input_rows(x_prev, p.first, gm, p.first.bias is not None)
    BY = (B.T @ Y).to(dtype)
    s.S, s.M = _add(s.S, BY[:, out:]), _add(s.M, BY[:, :out])
    s.S_prev = _add(s.S_prev, (Bp.T @ Bp).to(dtype))
    s.grad_sq = _add(s.grad_sq, (dA.to(dtype) ** 2).sum())
    s.n_prev += Bp.shape[0]
    if kernel:
        ZY = kernel_products(x_prev, hidden, p, gm, Y).to(dtype)
        s.M_prev, s.C = _add(s.M_prev, ZY[:, :out]), _add(s.C, ZY[:, out:])


# -------------------------------------------------------------------------------------- the maths

def _solve(S: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """S^-1 M: a solve; a pseudo-inverse where S is singular; float64 where the first dtype fails."""
    for dtype in dict.fromkeys((S.dtype, torch.float64)):
        s, m = S.to(dtype), M.to(dtype)
        try:
            x = torch.linalg.solve(s, m)
            if torch.isfinite(x).all() and torch.linalg.norm(s @ x - m) <= 1e-6 * (torch.linalg.norm(m) + 1e-30):
                return x.to(S.dtype)
        except RuntimeError:  # torch.linalg.LinAlgError: singular
            pass
        x = torch.linalg.pinv(s, hermitian=True) @ m
        if torch.isfinite(x).all():
            return x.to(S.dtype)
    return torch.zeros_like(M)


def best_update(S: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, float]:
    """dW* = (S^-1 M)^T (out x dB) and D = tr(M^T S^-1 M); dW* = 0 when D comes out negative."""
    x = _solve(S, M)
    d = float((M * x).sum())
    if not math.isfinite(d) or d < 0:
        return torch.zeros_like(M.T), 0.0
    return x.T.contiguous(), d


def inverse_sqrt(S: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """S^-1/2 of a positive semi-definite S by eigh, eigenvalues below ``floor`` dropped (not divided by)."""
    lam, q = torch.linalg.eigh(S)
    keep = lam >= floor
    q = q[:, keep]
    return (q * lam[keep].rsqrt()) @ q.T


def new_neurons(S_prev: torch.Tensor, N: torch.Tensor, k_max: int, sv_floor: float = 1e-3,
                eigen_floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha (k x d), omega (m x k) and s (k) from the SVD of S_-2^-1/2 N (d x m).

    Keeps s_j >= min(sv_floor, s_max), at most ``k_max`` of them.
    """
    r = inverse_sqrt(S_prev, eigen_floor)
    u, s, vh = torch.linalg.svd(r @ N, full_matrices=False)
    if k_max <= 0 or s.numel() == 0 or not float(s[0]) > 0:
        return N.new_zeros(0, N.shape[0]), N.new_zeros(N.shape[1], 0), s[:0]
    k = min(k_max, int((s >= min(sv_floor, float(s[0]))).sum()))
    root = s[:k].sqrt()
    return (r @ u[:, :k] * root).T.contiguous(), (vh[:k].T * root).contiguous(), s[:k]


@dataclass
class Candidate:
    """One pair's growth: the best update of l2, the new neurons and their first-order gains."""

    pair: GrowablePair
    dW: torch.Tensor               # (out, dB): l2 moves by -gamma dW
    D: float                       # first-order gain of the move, per sample
    alpha: torch.Tensor            # (k, d): fan-in of the new neurons (bias last)
    omega: torch.Tensor            # (K * out, k): fan-out, kernel offset slowest
    s: torch.Tensor                # singular values kept
    slope: float                   # sigma'(0)
    bottleneck: float              # ||v_proj||^2 / ||dA||^2
    positions: tuple[int, int]

    @property
    def neurons(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def gain_neurons(self) -> float:
        return self.slope * float((self.s ** 2).sum())

    @property
    def gain(self) -> float:
        """D + sigma'(0) sum s_j^2: ranks the pairs."""
        return self.D + self.gain_neurons

    def truncate(self, k: int) -> "Candidate":
        k = max(0, min(k, self.neurons))
        return Candidate(self.pair, self.dW, self.D, self.alpha[:k], self.omega[:, :k], self.s[:k], self.slope,
                         self.bottleneck, self.positions)


def damped(S: torch.Tensor, damping: float) -> torch.Tensor:
    """S + damping * (tr S / d) I: Tikhonov damping relative to S's mean eigenvalue."""
    if not damping:
        return S
    return S + damping * float(torch.diagonal(S).mean()) * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)


def best_move(stats: PairStatistics, project: bool = True, damping: float = 0.0) -> tuple[torch.Tensor, float]:
    """dW* and D of a pair's statistics (zero when not projecting)."""
    st = stats.finalise()
    if not project:
        return torch.zeros_like(st.M.T), 0.0
    return best_update(damped(st.S, damping), st.M)


def candidate(pair: GrowablePair, stats: PairStatistics, gm: fx.GraphModule, k_max: int,
              sv_floor: float = 1e-3, eigen_floor: float = 1e-6, project: bool = True,
              damping: float = 0.0) -> Candidate:
    """The closed-form growth of one pair from its statistics (``project=False``: no dW*, N = -M_-2).

    ``damping`` > 0 replaces S and S_-2 by their damped forms (:func:`damped`) in the solve and the
    whitening: the step stays bounded in directions the statistical batch barely spans. The
    first-order identities still hold exactly -- the move lowers the loss by gamma n D with D =
    tr(M^T (S + delta I)^-1 M), and N = -Z^T v_proj / n for the damped dW*. Statistics from two
    passes carry N itself (gathered with the same dW*).
    """
    st = stats.finalise()
    dW, D = best_move(st, project, damping)
    N = st.N if st.N is not None else -st.M_prev + st.C @ dW.T       # (d K, out)
    K = math.prod(pair.second.kernel(gm))
    d = N.shape[0] // K
    alpha, omega, s = new_neurons(damped(st.S_prev, damping), N.reshape(d, K * N.shape[1]), k_max, sv_floor,
                                  eigen_floor)
    v_sq = st.grad_sq - 2 * (dW * st.M.T).sum() + (dW @ st.S * dW).sum()
    bottleneck = float(v_sq / st.grad_sq) if float(st.grad_sq) > 0 else 0.0
    return Candidate(pair, dW, D, alpha, omega, s, slope_at_zero(pair.activations), bottleneck, st.positions)


def statistics_for_growth(gm: fx.GraphModule, pairs: Sequence[GrowablePair], batches: Sequence,
                          loss_fn: LossFn, cfg: "GrowthConfig") -> dict[str, PairStatistics]:
    """One pass (S, M, S_-2, M_-2, C) or two (S, M, S_-2; then N for the chosen dW*), per ``cfg.passes``."""
    if cfg.passes == 1:
        return collect_statistics(gm, pairs, batches, loss_fn, cfg.dtype, cfg.samples)[0]
    first = collect_statistics(gm, pairs, batches, loss_fn, cfg.dtype, cfg.samples, kernel=False)[0]
    moves = {p.name: best_move(first[p.name], cfg.project, cfg.damping)[0] for p in pairs}
    second = collect_statistics(gm, pairs, batches, loss_fn, cfg.dtype, cfg.samples, moves=moves)[0]
    for name, st in first.items():
        st.N = second[name].N
    return first


# ------------------------------------------------------------------------------------------ surgery

def _set_size(gm: fx.GraphModule, target: str | None, **sizes: int) -> None:
    if target is None:
        return
    mod = gm.get_submodule(target)
    for k, v in sizes.items():
        if hasattr(mod, k):
            setattr(mod, k, v)


class Insertion:
    """New neurons of one candidate placed in the graph's parameters, at a scale set by :meth:`set_scale`.

    On creation the parameters have their new shapes and the scale is 0 (the function is unchanged);
    :meth:`undo` puts the original tensors back, :meth:`commit` grows the optimizer's state.
    """

    def __init__(self, gm: fx.GraphModule, cand: Candidate):
        self.gm, self.cand = gm, cand
        pair, k = cand.pair, cand.neurons
        first, second = pair.first, pair.second
        self.hidden = h = pair.hidden(gm)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        w1, b1 = first.weight_of(gm), first.bias_of(gm)
        w2, b2 = second.weight_of(gm), second.bias_of(gm)
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        dt = w2.dtype
        # The candidate's sizes are those its statistics saw. With strategy 'all' another insertion
        # may already have grown l1's inputs or l2's outputs: those rows and columns stay zero here.
        k1, k2 = first.kernel(gm), second.kernel(gm)
        K1, K2 = math.prod(k1), math.prod(k2)
        self.out = out = cand.dW.shape[0]
        self.c_in = c_in = (cand.alpha.shape[1] - (b1 is not None)) // K1
        self.dW_w = cand.dW[:, :h * K2].to(dt).reshape(out, h, *w2.shape[2:])
        self.dW_b = cand.dW[:, h * K2].to(dt) if b2 is not None else None
        self.alpha_w = cand.alpha[:, :c_in * K1].to(dt).reshape(k, c_in, *w1.shape[2:])
        self.alpha_b = cand.alpha[:, -1].to(dt) if b1 is not None else None
        om = cand.omega.to(dt).reshape(K2, out, k).permute(1, 2, 0)
        self.omega = om.reshape(out, k, *w2.shape[2:])
        self.w2_0 = w2.detach()[:out, :h].clone()
        self.b2_0 = b2.detach()[:out].clone() if b2 is not None else None
        with torch.no_grad():
            self._grow(w1, 0, k, 0.0)
            if b1 is not None:
                self._grow(b1, 0, k, 0.0)
            for norm in pair.norms:
                for path, fill in ((norm.weight, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0),
                                   (norm.running_var, 1.0)):
                    if path is not None:
                        self._grow(_tensor(gm, path), 0, k, fill)
                _set_size(gm, norm.module, num_features=h + k)
            self._grow(w2, 1, k, 0.0)
            if b2 is not None:
                self.saved.append((b2, b2.data))
                b2.data = b2.data.clone()
        _set_size(gm, first.module, out_features=h + k, out_channels=h + k)
        _set_size(gm, second.module, in_features=h + k, in_channels=h + k)
        self.gamma = 0.0

    def _grow(self, t: torch.Tensor, dim: int, k: int, fill: float) -> None:
        shape = list(t.shape)
        shape[dim] = k
        self.saved.append((t, t.data))
        t.data = torch.cat([t.data, t.data.new_full(shape, fill)], dim)

    @torch.no_grad()
    def set_scale(self, gamma: float, neurons: float | None = None) -> None:
        """New neurons at gamma * alpha, gamma * omega; l2's existing weights at W - gamma dW*.
        ``neurons`` scales the new neurons apart from the move (default: gamma)."""
        h, k, out = self.hidden, self.cand.neurons, self.out
        g = gamma if neurons is None else neurons
        self.w1.data[h:h + k, :self.c_in] = g * self.alpha_w
        if self.b1 is not None:
            self.b1.data[h:h + k] = g * self.alpha_b
        self.w2.data[:out, :h] = self.w2_0 - gamma * self.dW_w
        self.w2.data[:out, h:h + k] = g * self.omega
        if self.b2 is not None:
            self.b2.data[:out] = self.b2_0 - gamma * self.dW_b
        self.gamma = gamma

    def undo(self) -> None:
        for t, data in reversed(self.saved):
            t.data = data
        pair = self.cand.pair
        for norm in pair.norms:
            _set_size(self.gm, norm.module, num_features=self.hidden)
        _set_size(self.gm, pair.first.module, out_features=self.hidden, out_channels=self.hidden)
        _set_size(self.gm, pair.second.module, in_features=self.hidden, in_channels=self.hidden)
        self.saved = []



def commit(gm: fx.GraphModule, insertions: Sequence[Insertion],
           optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.nn.Parameter]:
    """Keep the inserted neurons: every grown parameter becomes a new ``nn.Parameter`` in the module
    and in the optimizer, whose state moves over padded with zeros; returns {path: new parameter}.

    A fresh parameter rather than a resized one: autograd caches a leaf's shape in its gradient
    accumulator, which outlives a resize while any graph that used the leaf is alive.
    """
    first: dict[int, tuple[torch.Tensor, torch.Size]] = {}
    for ins in insertions:
        for t, old in ins.saved:
            first.setdefault(id(t), (t, old.shape))
        ins.saved = []
    names = {id(t): n for n, t in gm.named_parameters(remove_duplicate=False)}
    replaced: dict[str, torch.nn.Parameter] = {}
    for t, old_shape in first.values():
        if tuple(t.shape) == tuple(old_shape) or id(t) not in names:
            continue  # an unchanged bias, or a buffer (running statistics): resized in place is enough
        path = names[id(t)]
        new = torch.nn.Parameter(t.data, requires_grad=t.requires_grad)
        owner, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, new)
        if optimizer is not None:
            grow_optimizer_state(optimizer, t, new)
        replaced[path] = new
    return replaced


def _tensor(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, leaf = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def grow_optimizer_state(optimizer: torch.optim.Optimizer, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Put ``new`` where ``old`` was in the optimizer's groups, its state padded to the new shape.

    Old entries keep their values at their old positions (new units are appended at the end of each
    grown dimension); new entries start at zero (momentum, Adam moments). Scalars such as Adam's step
    count are kept.
    """
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    grown = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() == new.dim() and value.dim() > 0 and value.shape != new.shape:
            pad = value.new_zeros(new.shape)
            pad[tuple(slice(0, s) for s in value.shape)] = value
            value = pad
        grown[key] = value
    optimizer.state[new] = grown


# ----------------------------------------------------------------------------------- line search

def held_out_loss(gm: fx.GraphModule, batches: Sequence[tuple[Any, torch.Tensor]], loss_fn: LossFn,
                  seed: int = 0) -> float:
    """Mean loss per sample on ``batches``, leaving buffers and the RNG as they were."""
    total, count = 0.0, 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]), frozen_buffers(gm):
        torch.manual_seed(seed)
        for x, y in batches:
            total += float(loss_fn(gm(*_as_args(x)), y))
            count += int(_as_args(x)[0].shape[0])
    return total / max(count, 1)


def line_search(gm: fx.GraphModule, insertions: Sequence[Insertion], batches: Sequence[tuple[Any, torch.Tensor]],
                loss_fn: LossFn, gammas: Sequence[float] = DEFAULT_GAMMAS, extend: int = 0) -> tuple[float, dict[float, float]]:
    """The gamma with the lowest held-out loss; the grid is extended by decades (``extend`` times at
    most) while its largest value is the best."""
    losses: dict[float, float] = {}

    def at(g: float) -> float:
        for ins in insertions:
            ins.set_scale(g)
        losses[g] = held_out_loss(gm, batches, loss_fn)
        return losses[g]

    for g in gammas:
        at(g)
    top = max(gammas)
    for _ in range(extend):
        if min(losses, key=losses.get) != top or not math.isfinite(losses[top]):
            break
        top *= 10.0
        at(top)
    best = min(losses, key=lambda g: (losses[g] if math.isfinite(losses[g]) else math.inf, g))
    return best, losses


# ------------------------------------------------------------------------------------ the step

@dataclass
class GrowthConfig:
    """What one growth step may do (the runtime's ``--grow-*`` options map onto these)."""

    every: int = 1                                  # epochs between growth steps (for :meth:`GrowthStep.due`)
    neurons: float = 8                              # new neurons per pair per step, at most (< 1: a fraction of its cap)
    max_width: int | None = None                    # hidden width cap per pair (None: the pass's full width, else none)
    budget: Literal["params", "flops"] = "params"   # what the limit counts (FLOPs: forward, per sample)
    limit: float | None = None                      # stop growing at this many parameters / FLOPs
    strategy: Literal["best", "all"] = "best"       # grow the pair with the best first-order gain, or every pair
    targets: tuple[str, ...] = ()                   # grow only pairs whose name matches (fnmatch); () all
    samples: int | None = None                      # samples of the statistical batch, at most (None: every batch given)
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    extend: int = 0                                 # decades the grid may grow past its top while the loss falls
    sv_floor: float = 1e-3
    eigen_floor: float = 1e-6
    project: bool = True                            # TINY (v_proj); False: neurons fit dA itself, no dW*
    damping: float = 0.01                           # Tikhonov damping of S and S_-2, relative to tr(S)/d (0: plain TINY)
    dtype: torch.dtype = torch.float64
    passes: Literal[1, 2] = 2                       # statistics in one pass (with C) or two (N directly)


@dataclass
class GrowthReport:
    grown: bool
    reason: str = ""
    pairs: list[dict[str, Any]] = field(default_factory=list)     # one row per pair grown
    gains: dict[str, dict[str, float]] = field(default_factory=dict)   # every candidate's gains
    gamma: float = 0.0
    loss: tuple[float, float] = (math.nan, math.nan)              # held-out loss before, after
    predicted: float = 0.0                                        # first-order decrease predicted at gamma
    params: tuple[int, int] = (0, 0)
    grown_tensors: list[str] = field(default_factory=list)        # whose shapes changed (rebuild DDP, compiled graphs)
    losses: dict[float, float] = field(default_factory=dict)      # the line search

    def as_dict(self) -> dict[str, Any]:
        return {"grown": self.grown, "reason": self.reason, "pairs": self.pairs, "gains": self.gains,
                "gamma": self.gamma, "loss": list(self.loss), "predicted": self.predicted,
                "params": list(self.params), "grown_tensors": self.grown_tensors,
                "line_search": {str(g): v for g, v in sorted(self.losses.items())}}


def count_params(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def forward_flops(gm: fx.GraphModule, x: Any) -> float:
    """Forward FLOPs per sample, by torch's flop counter on one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    one = tuple(a[:1] if torch.is_tensor(a) else a for a in _as_args(x))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, frozen_buffers(gm), torch.random.fork_rng(devices=[]):
        gm(*one)
    return float(counter.get_total_flops())


def growth_cost(plan: Sequence[tuple[Candidate, int]], gm: fx.GraphModule, budget: str) -> float:
    """Exact extra parameters, or forward FLOPs per sample (two per multiply-add, torch's counter's
    convention), of giving each candidate's pair k more units; chained pairs share a layer, whose
    new rows and new columns meet in new weights counted once."""
    grow_out: dict[str, int] = {}
    grow_in: dict[str, int] = {}
    layers: dict[str, tuple[Layer, int]] = {}          # weight path -> (layer, output positions per sample)
    extra = 0.0
    for cand, k in plan:
        pair = cand.pair
        grow_out[pair.first.weight] = grow_out.get(pair.first.weight, 0) + k
        grow_in[pair.second.weight] = grow_in.get(pair.second.weight, 0) + k
        layers[pair.first.weight] = (pair.first, cand.positions[0])
        layers[pair.second.weight] = (pair.second, cand.positions[1])
        if budget == "params":
            extra += k * sum((n.weight is not None) + (n.bias is not None) for n in pair.norms)
    for path, (layer, positions) in layers.items():
        w = layer.weight_of(gm)
        out, inp, K = w.shape[0], w.shape[1], w[0, 0].numel() if layer.kind == "conv" else 1
        dout, din = grow_out.get(path, 0), grow_in.get(path, 0)
        macs = ((out + dout) * (inp + din) - out * inp) * K
        if budget == "params":
            extra += macs + (dout if layer.bias is not None else 0)
        else:
            extra += 2.0 * macs * positions
    return extra


def full_widths(gm: fx.GraphModule) -> dict[str, int]:
    """Hidden widths before the ``grow`` pass shrank the model (empty if it did not run)."""
    return {name: row["full"] for name, row in growth_record(gm)["pairs"].items()}


def _batches(batches: Iterable) -> list:
    return list(batches)


def grow_once(model: fx.GraphModule, batches: Iterable[tuple[Any, torch.Tensor]],
              optimizer: torch.optim.Optimizer | None = None, *, held_out: Sequence[tuple[Any, torch.Tensor]] | None = None,
              loss_fn: LossFn = summed_cross_entropy, config: GrowthConfig | None = None) -> GrowthReport:
    """One growth step on a graph module: statistics, candidates, line search, insertion.

    ``batches`` ((input, target) pairs) make the statistical batch; ``held_out`` batches choose the
    scale (default: the last of ``batches``, then not used for statistics). ``loss_fn(output, target)``
    returns the *summed* loss. The optimizer's state grows in place. Raises GradxformError when the
    model has no growable pair or is already over the budget.
    """
    cfg = config or GrowthConfig()
    if not isinstance(model, fx.GraphModule):
        raise GradxformError(f"growth works on one traced graph, got a {type(model).__name__}", where="growth",
                             hint="compile the model (gradxform.compile) and grow its graph module; a staged "
                                  "model grows stage by stage")
    batches = _batches(batches)
    if not batches:
        raise GradxformError("growth needs at least one batch for its statistics", where="growth")
    if held_out is None:
        held_out = batches[-1:]
        batches = batches[:-1] or batches
    pairs, rejected = growable_pairs(model)
    if not pairs:
        raise GradxformError(f"the model has no growable pair: {explain_none(rejected)}", where="growth",
                             hint="growth adds units between Linear -> activation -> Linear or Conv2d -> "
                                  "(BatchNorm) -> activation -> Conv2d layers")
    if cfg.targets:
        pairs = [p for p in pairs if any(fnmatch.fnmatch(p.name, t) or fnmatch.fnmatch(p.first.path, t)
                                         for t in cfg.targets)]
        if not pairs:
            raise GradxformError(f"no growable pair matches targets={','.join(cfg.targets)}", where="growth",
                                 hint="pair names are 'first->second' layer paths, e.g. body.0->body.2")
    current = count_params(model) if cfg.budget == "params" else forward_flops(model, batches[0][0])
    if cfg.limit is not None and current > cfg.limit:
        raise GradxformError(f"the {cfg.budget} budget is already exceeded: {current:,.0f} > {cfg.limit:,.0f}",
                             where="growth", hint="raise the budget, or start from a smaller model (grow{width=...})")
    caps = full_widths(model)
    widths = {p.name: p.hidden(model) for p in pairs}

    def room(p: GrowablePair) -> int:
        cap = cfg.max_width if cfg.max_width is not None else caps.get(p.name)
        k = int(cfg.neurons) if cfg.neurons >= 1 else max(1, math.ceil(cfg.neurons * (cap or widths[p.name])))
        return k if cap is None else min(k, cap - widths[p.name])

    pairs = [p for p in pairs if room(p) > 0]
    params_before = count_params(model)
    if not pairs:
        return GrowthReport(False, "every pair is at its maximum width", params=(params_before, params_before))
    stats = statistics_for_growth(model, pairs, batches, loss_fn, cfg)
    cands = [candidate(p, stats[p.name], model, room(p), cfg.sv_floor, cfg.eigen_floor, cfg.project, cfg.damping)
             for p in pairs]
    # sizes of the decompositions (eigh of S_-2: d; SVD: d x m; solve: dB), for cost accounting
    gains = {c.pair.name: {"D": c.D, "neurons": c.gain_neurons, "total": c.gain, "bottleneck": c.bottleneck,
                           "available": c.neurons, "d": int(stats[c.pair.name].S_prev.shape[0]),
                           "m": int(c.omega.shape[0]), "dB": int(stats[c.pair.name].S.shape[0])} for c in cands}
    cands.sort(key=lambda c: -c.gain)
    if cfg.strategy == "best":
        cands = cands[:1]
    chosen: list[Candidate] = []
    for c in cands:  # best first: each takes as many of its neurons as the budget still allows
        k = c.neurons
        while cfg.limit is not None and k > 0 and \
                current + growth_cost([(x, x.neurons) for x in chosen] + [(c, k)], model, cfg.budget) > cfg.limit:
            k -= 1
        if k > 0:
            chosen.append(c.truncate(k))
    if not chosen:
        why = "the budget has no room for one more neuron" if cfg.limit is not None else "no direction to grow in"
        return GrowthReport(False, why, gains=gains, params=(params_before, params_before))
    before = held_out_loss(model, held_out, loss_fn)
    insertions = [Insertion(model, c) for c in chosen]
    gamma, losses = line_search(model, insertions, held_out, loss_fn, cfg.gammas, cfg.extend)
    if gamma == 0.0:
        for ins in reversed(insertions):
            ins.undo()
        return GrowthReport(False, "no scale lowered the held-out loss", gains=gains, losses=losses,
                            loss=(before, before), params=(params_before, params_before))
    for ins in insertions:
        ins.set_scale(gamma)
    grown = list(commit(model, insertions, optimizer))
    _refresh_metadata(model)
    rows = [{"pair": c.pair.name, "neurons": c.neurons, "hidden": [widths[c.pair.name], widths[c.pair.name] + c.neurons],
             "D": c.D, "gain_neurons": c.gain_neurons, "bottleneck": c.bottleneck} for c in chosen]
    # per sample, like the held-out loss: the statistics count every output position of l2 as a sample
    predicted = sum((gamma * c.D + gamma ** 2 * c.gain_neurons) * c.positions[1] for c in chosen)
    return GrowthReport(True, "", rows, gains, gamma, (before, losses[gamma]), predicted,
                        (params_before, count_params(model)), grown, losses)


def _refresh_metadata(gm: fx.GraphModule) -> None:
    """Shapes in ``meta['val']`` follow the grown parameters (re-propagated from the placeholders)."""
    from ..ir.meta import propagate

    try:
        propagate(gm)
    except Exception:  # no placeholder metadata to start from: drop what is stale
        for n in gm.graph.nodes:
            n.meta.pop("val", None)


class GrowthStep:
    """The growth callback: ``step = GrowthStep(model, optimizer, config)``; at the end of each epoch
    ``if step.due(epoch): report = step(batches, held_out)``. Keeps a log of every report."""

    def __init__(self, model: fx.GraphModule, optimizer: torch.optim.Optimizer | None = None,
                 config: GrowthConfig | None = None, loss_fn: LossFn = summed_cross_entropy):
        self.model, self.optimizer, self.config, self.loss_fn = model, optimizer, config or GrowthConfig(), loss_fn
        self.log: list[dict[str, Any]] = []
        self.stopped = ""

    def due(self, epoch: int) -> bool:
        """Whether a step is due after ``epoch`` (counted from 1) epochs."""
        return not self.stopped and self.config.every > 0 and epoch > 0 and epoch % self.config.every == 0

    def __call__(self, batches: Iterable[tuple[Any, torch.Tensor]],
                 held_out: Sequence[tuple[Any, torch.Tensor]] | None = None, epoch: int | None = None) -> GrowthReport:
        report = grow_once(self.model, batches, self.optimizer, held_out=held_out, loss_fn=self.loss_fn,
                           config=self.config)
        if not report.grown and report.reason in ("every pair is at its maximum width",
                                                  "the budget has no room for one more neuron"):
            self.stopped = report.reason
        self.log.append({"epoch": epoch, **report.as_dict()})
        return report


# ------------------------------------------------------------------------------ new blocks (DAG)

@dataclass
class InsertedBlock:
    """A block ``y = x + l2(relu(l1(x)))`` put after a residual block's exit (see :func:`insert_block`)."""

    site: BlockSite
    name: str                     # its module: ``name.l1``, ``name.act``, ``name.l2``
    add: fx.Node
    nodes: list[fx.Node]

    @property
    def pair_name(self) -> str:
        return f"{self.name}.l1->{self.name}.l2"


def insert_block(gm: fx.GraphModule, site: BlockSite, hidden: int = 1, name: str | None = None) -> InsertedBlock:
    """Insert ``y = x + l2(relu(l1(x)))`` after ``site``, l2 zero: the function is unchanged.

    A convolutional stream gets 3x3 convolutions (stride 1, padding 1), a feature stream Linear
    layers; l1 starts with PyTorch's default initialisation, l2 (no bias) at zero. The block's
    l1 -> relu -> l2 is a growable pair, so growth steps widen it from there.
    """
    import operator

    ref = site.value.meta.get("val")
    dtype = ref.dtype if isinstance(ref, torch.Tensor) else next(gm.parameters()).dtype
    device = ref.device if isinstance(ref, torch.Tensor) and not ref.is_meta else next(gm.parameters()).device
    c = site.channels
    block = torch.nn.Module()
    if site.kind == "conv":
        block.l1 = torch.nn.Conv2d(c, hidden, 3, padding=1)
        block.l2 = torch.nn.Conv2d(hidden, c, 3, padding=1, bias=False)
    else:
        block.l1 = torch.nn.Linear(c, hidden)
        block.l2 = torch.nn.Linear(hidden, c, bias=False)
    block.act = torch.nn.ReLU()
    with torch.no_grad():
        block.l2.weight.zero_()
    block.to(device=device, dtype=dtype)
    base = name or "grown_block"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}{i}"
    gm.add_submodule(name, block)
    value = site.value
    users = list(value.users)
    with gm.graph.inserting_after(value):
        a = gm.graph.call_module(f"{name}.l1", (value,))
    with gm.graph.inserting_after(a):
        r = gm.graph.call_module(f"{name}.act", (a,))
    with gm.graph.inserting_after(r):
        b = gm.graph.call_module(f"{name}.l2", (r,))
    with gm.graph.inserting_after(b):
        y = gm.graph.call_function(operator.add, (value, b))
    for u in users:
        u.replace_input_with(value, y)
    if isinstance(ref, torch.Tensor):  # the stream keeps its shape; the hidden values get theirs on refresh
        b.meta["val"] = y.meta["val"] = ref
    gm.graph.lint()
    gm.recompile()
    return InsertedBlock(site, name, y, [a, r, b, y])


def remove_block(gm: fx.GraphModule, block: InsertedBlock) -> None:
    """Take an inserted block out again (the graph and module are as before :func:`insert_block`)."""
    block.add.replace_all_uses_with(block.site.value)
    for n in reversed(block.nodes):
        gm.graph.erase_node(n)
    delattr(gm, block.name)
    gm.graph.lint()
    gm.recompile()


def stream_gradients(gm: fx.GraphModule, sites: Sequence[BlockSite], batches: Iterable[tuple[Any, torch.Tensor]],
                     loss_fn: LossFn = summed_cross_entropy) -> dict[str, float]:
    """||dL/dx||^2 per sample at each site's stream value, for the summed loss: the size of the change
    the loss asks of the stream there (no existing layer is projected out: a proxy for the node's
    bottleneck, cheaper than scoring a new block at every site)."""
    watch = {s.value for s in sites}
    sums = {s.name: 0.0 for s in sites}
    seen = 0
    with torch.random.fork_rng(devices=[]), frozen_buffers(gm), torch.enable_grad():
        torch.manual_seed(0)
        for x, y in batches:
            rec = _Recorder(gm, watch)
            loss = loss_fn(rec.run(*_as_args(x)), y)
            grads = torch.autograd.grad(loss, [rec.seen[s.value] for s in sites], allow_unused=True)
            for s, g in zip(sites, grads):
                if g is not None:
                    sums[s.name] += float((g.double() ** 2).sum())
            seen += int(_as_args(x)[0].shape[0])
    return {k: v / max(seen, 1) for k, v in sums.items()}


def grow_block(model: fx.GraphModule, batches: Iterable[tuple[Any, torch.Tensor]],
               optimizer: torch.optim.Optimizer | None = None, *, held_out: Sequence | None = None,
               loss_fn: LossFn = summed_cross_entropy, config: GrowthConfig | None = None,
               site: str | None = None) -> tuple[GrowthReport, InsertedBlock | None]:
    """Insert a new block where the stream's gradient is largest (or at ``site``), then grow it once.

    The block enters with one unit and a zero output; a growth step restricted to its pair fits its
    l2 (dW*) and adds neurons by the closed form, with the line search's scale. When no scale lowers
    the held-out loss the block is taken out again and the model is as before. New parameters join
    the optimizer's first parameter group.
    """
    from ..ir.growth import block_sites

    from ..ir.meta import flat_inputs, has_metadata, propagate

    cfg = config or GrowthConfig()
    batches = _batches(batches)
    if not has_metadata(model) and batches:  # residual blocks are found from the values' shapes
        propagate(model, flat_inputs(model, _as_args(batches[0][0]), {}))
    sites = block_sites(model)
    if not sites:
        raise GradxformError("the model has no residual block to insert a new block after", where="growth",
                             hint="new blocks go after residual blocks (y = x + f(x)); grow neurons instead")
    if site is not None:
        chosen = [s for s in sites if s.name == site]
        if not chosen:
            raise GradxformError(f"no block site '{site}'", where="growth",
                                 hint="sites: " + ", ".join(s.name for s in sites))
    else:
        scores = stream_gradients(model, sites, batches, loss_fn)
        chosen = [max(sites, key=lambda s: scores[s.name])]
    block = insert_block(model, chosen[0])
    new = list(getattr(model, block.name).parameters())
    if optimizer is not None:
        optimizer.param_groups[0]["params"].extend(new)
    # a new block is at most as wide as its stream (a basic block's width)
    step = dataclasses.replace(cfg, targets=(block.pair_name,), strategy="best", max_width=cfg.max_width or chosen[0].channels)
    report = grow_once(model, batches, optimizer, held_out=held_out, loss_fn=loss_fn, config=step)
    if not report.grown:
        if optimizer is not None:
            current = {id(p) for p in getattr(model, block.name).parameters()}
            optimizer.param_groups[0]["params"] = [p for p in optimizer.param_groups[0]["params"] if id(p) not in current]
            for p in new:
                optimizer.state.pop(p, None)
        remove_block(model, block)
        _refresh_metadata(model)
        return report, None
    report.pairs[0]["block"] = chosen[0].name
    growth_record(model)["blocks"].append({"name": block.name, "site": chosen[0].name})
    return report, block


# ------------------------------------------------------------------------------------- resuming

def set_width(gm: fx.GraphModule, pair: GrowablePair, width: int) -> None:
    """Give a pair ``width`` hidden units: the first units are kept, new ones are zero (norms at
    weight 1, bias 0, mean 0, variance 1). Every resized tensor is a new parameter or buffer."""
    h = pair.hidden(gm)

    def resize(path: str | None, dim: int, fill: float) -> None:
        if path is None:
            return
        owner, _, leaf = path.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        t = getattr(mod, leaf)
        data = t.data.narrow(dim, 0, min(h, width))
        if width > h:
            shape = list(data.shape)
            shape[dim] = width - h
            data = torch.cat([data, data.new_full(shape, fill)], dim)
        data = data.clone()
        if isinstance(t, torch.nn.Parameter):
            setattr(mod, leaf, torch.nn.Parameter(data, requires_grad=t.requires_grad))
        else:
            t.data = data

    resize(pair.first.weight, 0, 0.0)
    resize(pair.first.bias, 0, 0.0)
    for norm in pair.norms:
        for path, fill in ((norm.weight, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0), (norm.running_var, 1.0)):
            resize(path, 0, fill)
        _set_size(gm, norm.module, num_features=width)
    resize(pair.second.weight, 1, 0.0)
    _set_size(gm, pair.first.module, out_features=width, out_channels=width)
    _set_size(gm, pair.second.module, in_features=width, in_channels=width)


def resize_to_state(gm: fx.GraphModule, state: dict[str, torch.Tensor], blocks: Sequence[dict[str, str]] = ()) -> bool:
    """Rebuild grown shapes before ``load_state_dict`` (resuming from a checkpoint of a grown model).

    ``blocks`` are the inserted blocks in insertion order, as recorded in ``growth_record(gm)['blocks']``
    of the grown model ({"name", "site"}); each is inserted again at its site, then every growable
    pair takes the hidden width its first layer's weight has in ``state``. Returns whether anything
    changed (the caller rebuilds its optimizer).
    """
    from ..ir.growth import block_sites

    changed = False
    for b in blocks:
        if hasattr(gm, b["name"]):
            continue
        sites = {s.name: s for s in block_sites(gm)}
        if b["site"] not in sites:
            raise GradxformError(f"the checkpoint has a block {b['name']} after '{b['site']}', which this model lacks",
                                 where="resume", hint="resume with the model the checkpoint was trained from")
        insert_block(gm, sites[b["site"]], hidden=int(state[f"{b['name']}.l1.weight"].shape[0]), name=b["name"])
        changed = True
    for pair in growable_pairs(gm)[0]:
        saved = state.get(pair.first.weight)
        if saved is not None and int(saved.shape[0]) != pair.hidden(gm):
            set_width(gm, pair, int(saved.shape[0]))
            changed = True
    if changed:
        growth_record(gm)["blocks"] = [dict(b) for b in blocks]
        _refresh_metadata(gm)
    return changed
