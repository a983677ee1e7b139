"""Low-rank layers: factored weights that save parameters *and* FLOPs (docs/methods.md §6).

``factor`` form (AB): a Linear ``W (out x in)`` becomes ``B @ A`` with ``A = sqrt(S) V^T`` (r x in) and
``B = U sqrt(S)`` (out x r), two matrix products of total cost ``r (in + out)`` per row instead of
``in x out``. A k x k convolution becomes a k x k convolution into r channels followed by a 1x1
convolution back to ``out`` channels.

``usv`` form (OIALR): ``W = U S V^T`` with ``U`` and ``V`` frozen (orthonormal columns) and only the r x r
``S`` trained; :func:`truncate` periodically rediagonalises ``S``, rotates ``U`` and ``V`` into the new
basis, drops small singular values, and resizes the optimizer state to match.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear or convolution weight viewed as out x (in * k * k)."""
    return weight.reshape(weight.shape[0], -1)


class Spectrum:
    """The singular value decomposition ``U diag(s) V^T`` of a weight's matrix, computed once per layer.

    It comes from one symmetric eigendecomposition of the smaller Gram matrix (``W W^T`` or ``W^T W``),
    several times faster than an SVD, and only the singular vectors that are asked for are formed.
    Squaring the matrix costs accuracy only in the small singular values (an absolute error of about
    ``eps * sigma_max^2`` on each ``sigma_i^2``); the kept subspace is what a truncation uses, and the
    product ``B A`` is ``U_r U_r^T W``, exact for the full rank whatever the small values are. The Gram
    matrix and its eigendecomposition run in float64 for a float64 weight and in float32 otherwise:
    the factors are stored in the weight's dtype, so more precision than it holds would be wasted.
    """

    def __init__(self, weight: torch.Tensor):
        w = weight_matrix(weight).detach()
        self.dtype = weight.dtype
        work = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.w = w.to(work)
        self.left = self.w.shape[0] <= self.w.shape[1]  # eigenvectors are U (else V)
        gram = self.w @ self.w.T if self.left else self.w.T @ self.w
        values, vectors = torch.linalg.eigh(gram)
        self.values = values.flip(0).clamp_min(0)         # sigma^2, descending
        self.vectors = vectors.flip(1)
        self.s = self.values.sqrt()

    def discarded(self, rank: int) -> float:
        """Frobenius norm of ``W - W_r``, the best rank-r approximation's error (Eckart-Young); within
        about ``sqrt(n eps) sigma_max`` of it, where the squared tail is as small as its rounding."""
        return float(self.values[rank:].double().sum()) ** 0.5

    def _scale(self, rank: int) -> torch.Tensor:
        s = self.s[:rank]
        # a zero singular value (a zero-initialised layer) has no direction to divide by: its row of
        # A is then U_i^T W = 0 unscaled, and B A = U_r U_r^T W still holds
        return torch.where(s > s[0] * 1e-12, s, torch.ones_like(s)) if rank else s

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = sqrt(S_r) V_r^T`` (r x in*k*k) and ``B = U_r sqrt(S_r)`` (out x r), in the weight's dtype."""
        q = self.vectors[:, :rank]
        root = self._scale(rank).sqrt()
        if self.left:  # A = S^-1/2 U^T W, B = U S^1/2
            a, b = (q.T @ self.w) / root[:, None], q * root
        else:          # A = S^1/2 V^T,   B = W V S^-1/2
            a, b = root[:, None] * q.T, (self.w @ q) / root
        return a.to(self.dtype), b.to(self.dtype)

    def usv(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U_r`` (out x r), ``diag(s_r)`` and ``V_r`` (in x r), U and V with orthonormal columns."""
        q = self.vectors[:, :rank]
        s = self._scale(rank)
        other = (self.w.T @ q) / s if self.left else (self.w @ q) / s
        u, v = (q, other) if self.left else (other, q)
        return (u.to(self.dtype).contiguous(), torch.diag(self.s[:rank]).to(self.dtype),
                v.to(self.dtype).contiguous())


def factors(weight: torch.Tensor, rank: int, spectrum: Spectrum | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S_r) V_r^T`` (r x in*k*k) and ``B = U_r sqrt(S_r)`` (out x r) in the weight's dtype:
    ``B @ A`` is the best rank-r approximation of the weight's matrix (Eckart-Young)."""
    return (spectrum or Spectrum(weight)).factors(rank)


def choose_rank(s: torch.Tensor, rank: float | None = None, energy: float | None = None,
                cutoff: float | None = None) -> int:
    """Rank from an int or fraction of the full rank, an energy share, or a cutoff on sigma/sigma_max."""
    full = s.numel()
    if energy is not None:
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        return int(min(full, int((share < energy - 1e-12).sum()) + 1))
    if cutoff is not None:
        return max(1, int((s >= cutoff * s[0]).sum()))
    if rank is None:
        return full
    r = int(round(rank * full)) if isinstance(rank, float) and rank <= 1.0 else int(rank)
    return max(1, min(full, r))


class LowRankLinear(nn.Module):
    """``B(A(x))`` with ``A: in -> r`` and ``B: r -> out`` (the AB form)."""

    def __init__(self, a: nn.Linear, b: nn.Linear):
        super().__init__()
        self.a, self.b = a, b

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int, spectrum: Spectrum | None = None) -> "LowRankLinear":
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        a = nn.Linear(layer.in_features, rank, bias=False, **kw)
        b = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **kw)
        wa, wb = factors(layer.weight, rank, spectrum)
        with torch.no_grad():
            a.weight.copy_(wa)
            b.weight.copy_(wb)
            if layer.bias is not None:
                b.bias.copy_(layer.bias)
        return cls(a, b)

    @property
    def rank(self) -> int:
        return self.a.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def gx_flops(self, out_numel: Any) -> Any:
        """FLOPs for an output of ``out_numel`` elements: each row costs 2 r (in + out)."""
        rows = out_numel / self.b.out_features
        return 2 * rows * self.rank * (self.a.in_features + self.b.out_features)


class LowRankConv2d(nn.Module):
    """A k x k convolution into r channels, then a 1x1 convolution to the output channels."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d):
        super().__init__()
        self.first, self.second = first, second

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, spectrum: Spectrum | None = None) -> "LowRankConv2d":
        kw = {"dtype": conv.weight.dtype, "device": conv.weight.device}
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=False, padding_mode=conv.padding_mode, **kw)
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kw)
        wa, wb = factors(conv.weight, rank, spectrum)
        with torch.no_grad():
            first.weight.copy_(wa.reshape(rank, *conv.weight.shape[1:]))
            second.weight.copy_(wb.reshape(conv.out_channels, rank, 1, 1))
            if conv.bias is not None:
                second.bias.copy_(conv.bias)
        return cls(first, second)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def gx_flops(self, out_numel: Any) -> Any:
        """FLOPs for an output of ``out_numel`` elements: a k x k conv to r channels, then a 1x1 back."""
        pixels = out_numel / self.second.out_channels
        per_pixel = self.first.weight[0].numel() * self.rank + self.rank * self.second.out_channels
        return 2 * pixels * per_pixel


class USVLinear(nn.Module):
    """``x V S^T U^T + b`` with U (out x r) and V (in x r) frozen and S (r x r) trained (OIALR)."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.s = nn.Parameter(s)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int, spectrum: Spectrum | None = None) -> "USVLinear":
        u, s, v = (spectrum or Spectrum(layer.weight)).usv(rank)
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        return cls(u, s, v, bias)

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(x, self.v.T), self.s), self.u, self.bias)

    def gx_flops(self, out_numel: Any) -> Any:
        rows = out_numel / self.u.shape[0]
        return 2 * rows * self.rank * (self.v.shape[0] + self.rank + self.u.shape[0])


@torch.no_grad()
def truncate(layer: USVLinear, optimizer: torch.optim.Optimizer | None, cutoff: float,
             min_rank: int = 1) -> int:
    """Rediagonalise S, rotate U and V, drop sigma < cutoff * sigma_max; returns the new rank.

    Never removes more than half of the rank at once, never goes below ``min_rank``. The optimizer's
    per-parameter state for S (momentum, Adam moments) is rotated into the new basis and sliced, so
    the next step is the one a freshly built layer with that state would take.
    """
    p, sigma, qh = torch.linalg.svd(layer.s.double())
    keep = int((sigma >= cutoff * sigma[0]).sum())
    keep = max(keep, (layer.rank + 1) // 2, min_rank)
    keep = min(keep, layer.rank)
    dtype = layer.s.dtype
    p, q = p[:, :keep], qh[:keep].T
    old = layer.s
    state = optimizer.state.pop(old, None) if optimizer is not None else None
    layer.u = (layer.u.double() @ p).to(dtype).contiguous()
    layer.v = (layer.v.double() @ q).to(dtype).contiguous()
    new = nn.Parameter(torch.diag(sigma[:keep]).to(dtype))
    layer.s = new
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if t is old else t for t in group["params"]]
        if state is not None:
            optimizer.state[new] = {k: (p.T.to(v.dtype) @ v @ q.to(v.dtype)).contiguous()
                                    if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()}
    return keep


def factored(module: Any) -> bool:
    return isinstance(module, (LowRankLinear, LowRankConv2d, USVLinear))


class AdaptiveRank:
    """OIALR's schedule: after ``warmup`` optimizer steps, every ``every`` steps truncate each USV layer.

    Call :meth:`step` after each optimizer step of the module's stage. Returns whether ranks changed
    (the caller refreshes anything that cached the parameter list).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, every: int, warmup: int = 0,
                 cutoff: float = 0.1, min_fraction: float = 0.01):
        self.module, self.optimizer = module, optimizer
        self.every, self.warmup, self.cutoff, self.min_fraction = every, warmup, cutoff, min_fraction
        self.steps = 0
        self.log: list[dict[str, Any]] = []

    def layers(self) -> list[tuple[str, USVLinear]]:
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, USVLinear)]

    def step(self) -> bool:
        self.steps += 1
        if self.every <= 0 or self.steps <= self.warmup or (self.steps - self.warmup) % self.every:
            return False
        changed = False
        for name, layer in self.layers():
            before = layer.rank
            floor = max(1, int(self.min_fraction * min(layer.u.shape[0], layer.v.shape[0])))
            after = truncate(layer, self.optimizer, self.cutoff, min_rank=floor)
            changed |= after != before
            self.log.append({"step": self.steps, "layer": name, "rank": [before, after]})
        return changed


def resize_usv(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Give every USV layer the rank recorded in ``state`` (a state dict), before loading it."""
    changed = False
    for name, layer in module.named_modules():
        if isinstance(layer, USVLinear):
            key = f"{name}.s" if name else "s"
            if key in state and state[key].shape != layer.s.shape:
                r = state[key].shape[0]
                layer.u = torch.zeros(layer.u.shape[0], r, dtype=layer.u.dtype, device=layer.u.device)
                layer.v = torch.zeros(layer.v.shape[0], r, dtype=layer.v.dtype, device=layer.v.device)
                layer.s = nn.Parameter(torch.zeros(r, r, dtype=layer.s.dtype, device=layer.s.device))
                changed = True
    return changed


# -- factor surgery: AB-training changes ranks and trains W itself between rounds ------------------

def factor_weights(layer: LowRankLinear | LowRankConv2d) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B) of an AB layer: A the first (k x k, or in -> r) weight, B the second (r -> out)."""
    if isinstance(layer, LowRankLinear):
        return layer.a.weight, layer.b.weight
    return layer.first.weight, layer.second.weight


def product(layer: LowRankLinear | LowRankConv2d) -> torch.Tensor:
    """The layer's weight matrix ``W = B @ A`` (out x in*k*k)."""
    a, b = factor_weights(layer)
    return b.detach().reshape(b.shape[0], -1) @ a.detach().reshape(a.shape[0], -1)


def dense_shape(layer: LowRankLinear | LowRankConv2d) -> tuple[int, int]:
    """(out, in*k*k): the shape of the weight matrix the layer stands for."""
    a, b = factor_weights(layer)
    return b.shape[0], a[0].numel()


@torch.no_grad()
def set_factors(layer: LowRankLinear | LowRankConv2d, a: torch.Tensor, b: torch.Tensor) -> None:
    """Give the layer new factors ``a`` (r x in*k*k) and ``b`` (out x r) of any rank r: new Parameters
    (the optimizer must be rebuilt), the submodules' size attributes updated to match."""
    r = a.shape[0]
    if isinstance(layer, LowRankLinear):
        layer.a.weight = nn.Parameter(a.contiguous().clone())
        layer.b.weight = nn.Parameter(b.contiguous().clone())
        layer.a.out_features = layer.b.in_features = r
    else:
        first, second = layer.first, layer.second
        first.weight = nn.Parameter(a.reshape(r, *first.weight.shape[1:]).contiguous().clone())
        second.weight = nn.Parameter(b.reshape(b.shape[0], r, 1, 1).contiguous().clone())
        first.out_channels = second.in_channels = r


def set_dense(layer: LowRankLinear | LowRankConv2d, w: torch.Tensor) -> None:
    """The layer computes the full-rank ``w`` (out x in*k*k) exactly: ``A = w`` and ``B = I`` (rank =
    out). Training A alone is then training the dense layer (AB-training's full-rank phase)."""
    out = w.shape[0]
    set_factors(layer, w, torch.eye(out, dtype=w.dtype, device=w.device))


def refactor(layer: LowRankLinear | LowRankConv2d, w: torch.Tensor, rank: int) -> None:
    """Factor ``w`` (out x in*k*k) into the best rank-``rank`` ``B @ A`` (truncated SVD)."""
    a, b = Spectrum(w).factors(rank)
    set_factors(layer, a, b)


def resize_factors(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Give every AB layer the rank recorded in ``state`` (a state dict), before loading it."""
    changed = False
    for name, layer in module.named_modules():
        if isinstance(layer, (LowRankLinear, LowRankConv2d)):
            prefix = f"{name}." if name else ""
            first, second = ("a", "b") if isinstance(layer, LowRankLinear) else ("first", "second")
            key_a, key_b = f"{prefix}{first}.weight", f"{prefix}{second}.weight"
            a, b = factor_weights(layer)
            if key_a in state and key_b in state and (state[key_a].shape != a.shape or state[key_b].shape != b.shape):
                r = state[key_a].shape[0]
                set_factors(layer, torch.zeros(r, a[0].numel(), dtype=a.dtype, device=a.device),
                            torch.zeros(b.shape[0], r, dtype=b.dtype, device=b.device))
                changed = True
    return changed
