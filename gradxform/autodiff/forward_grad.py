"""Forward gradients with local guesses (docs/methods.md §5): estimators, tangent pushing, forward-mode gaps.

For a stage output h and per-sample guesses v_n (rows of the tangents V), the end-to-end gradient t_n
at h reaches the stage only as directional derivatives d_n = <t_n, v_n>, computed by pushing V forward
through the later stages and the per-sample loss with JVPs (``torch.func.jvp`` under ``vmap``: one
batched call for all tangents). The estimate is

- one tangent: ``g_n = d_n / (|v_n|^2 + eps) v_n`` (exact when v_n is parallel to t_n);
- k tangents, ``project``: the orthogonal projection of t_n on their span, ``B (B^T B)^-1 d``
  (exact when the k tangents span the space);
- k tangents, ``mean``: ``(1/k) sum_i d_i v_i`` (unbiased for Gaussian tangents).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx

from ..errors import GradxformError
from ..ir.match import scope
from ..state import batch_statistics_only, frozen_buffers, math_attention

EPS = 1e-14


def project(tangents: torch.Tensor, d: torch.Tensor, combine: str = "project", eps: float = EPS) -> torch.Tensor:
    """The gradient estimate per sample from ``tangents`` (k, N, ...) and derivatives ``d`` (k, N)."""
    k, n = tangents.shape[:2]
    v = tangents.reshape(k, n, -1)
    if combine == "mean":
        return (d.unsqueeze(-1) * v).mean(0).reshape(tangents.shape[1:])
    if k == 1:
        norm2 = (v[0] * v[0]).sum(-1)
        return (d[0] / (norm2 + eps)).unsqueeze(-1).mul(v[0]).reshape(tangents.shape[1:])
    # B (B^T B)^-1 d is the minimum-norm x with B^T x = d: pinv(B^T) d, through an SVD (the normal
    # equations would square B's condition number)
    bt = v.transpose(0, 1)                                        # (N, k, D)
    return (torch.linalg.pinv(bt) @ d.transpose(0, 1).unsqueeze(-1)).squeeze(-1).reshape(tangents.shape[1:])


def make_tangents(h: torch.Tensor, guess: torch.Tensor | None, k: int, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """k tangents at ``h`` (k, *h.shape): the local guess first when there is one, then Gaussian ones."""
    rows = [] if guess is None else [guess.detach()]
    while len(rows) < k:
        rows.append(torch.randn(h.shape, dtype=h.dtype, device=h.device, generator=generator))
    return torch.stack(rows[:k])


@contextlib.contextmanager
def forward_mode_safe(module: torch.nn.Module) -> Iterator[None]:
    """The documented workarounds for torch 2.13's forward-mode gaps, while tangents are pushed."""
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        # LSTM's mkldnn kernel has no forward-mode rule; mkldnn stays on otherwise (CPU convolutions use it)
        lstm = any(isinstance(m, torch.nn.LSTM) for m in module.modules())
        mkldnn = torch.backends.mkldnn.flags(enabled=False) if lstm else contextlib.nullcontext()
        with batch_statistics_only([module]), math_attention(), mkldnn, frozen_buffers(module):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def push(fn: Callable[..., Any], primals: tuple, tangents: tuple, where: str, module: Any = None,
         rng: torch.Tensor | None = None) -> Any:
    """JVPs of ``fn`` at ``primals`` along every tangent (each entry (m, ...) or None), batched over m.

    Returns ``fn``'s tangent outputs, each with a leading dimension m. ``rng``: the RNG state ``fn``'s
    forward ran with; replayed, and shared by every tangent (``vmap(randomness="same")``), so dropout
    differentiates the mask the forward drew. An op without a forward-mode rule raises a
    GradxformError naming the op and the layer.
    """
    active = [i for i, t in enumerate(tangents) if t is not None and isinstance(primals[i], torch.Tensor)
              and primals[i].is_floating_point()]
    if not active:
        return None
    base = [p.detach() if isinstance(p, torch.Tensor) else p for p in primals]

    def call(*ts: torch.Tensor) -> Any:
        def f(*xs: torch.Tensor) -> Any:
            args = list(base)
            for i, x in zip(active, xs):
                args[i] = x
            return fn(*args)

        return torch.func.jvp(f, tuple(base[i] for i in active), ts)[1]

    try:
        with torch.random.fork_rng(devices=[]):
            if rng is not None:
                torch.set_rng_state(rng)
            return torch.func.vmap(call, randomness="same")(*(tangents[i] for i in active))
    except RuntimeError as e:
        if "forward" not in str(e).lower() and "jvp" not in str(e).lower():
            raise
        raise _located(module, base, [tangents[i][0] if i in active else None for i in range(len(base))],
                       where, e) from None


def _located(module: Any, primals: list, tangents: list, where: str, error: Exception) -> GradxformError:
    """Re-run the stage node by node with dual numbers to name the op and layer that fails."""
    first = str(error).strip().splitlines()[0]
    hint = ("forward-grad pushes tangents through every stage after the first: keep this layer in the first "
            "stage (split{at=...}) or train with the local schedule")
    if not isinstance(module, fx.GraphModule):
        return GradxformError(f"{where}: an op has no forward-mode derivative: {first}", hint=hint)

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            try:
                return super().run_node(n)
            except Exception as e:  # the first node that fails
                raise _NodeFailed(n, e) from None

    try:
        with fwAD.dual_level(), torch.no_grad():
            duals = [fwAD.make_dual(p, t) if t is not None else p for p, t in zip(primals, tangents)]
            Probe(module).run(*duals)
    except _NodeFailed as f:
        op = f.node.target if isinstance(f.node.target, str) else getattr(f.node.target, "__name__", str(f.node.target))
        layer = scope(f.node) or f.node.name
        return GradxformError(f"{where}: '{op}' has no forward-mode derivative (node '{f.node.name}', layer "
                              f"'{layer}'): {str(f.error).strip().splitlines()[0]}", hint=hint)
    except Exception:
        pass
    return GradxformError(f"{where}: an op has no forward-mode derivative: {first}", hint=hint)


class _NodeFailed(Exception):
    def __init__(self, node: Any, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error
