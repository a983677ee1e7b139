"""Running a model without leaving a trace in it.

gradxform runs models for its own purposes -- shape propagation, output checks, ONNX comparisons,
timing, the recompute inside a reversible backward. None of these may change what training sees:
BatchNorm running statistics and batch counters are restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch


@contextlib.contextmanager
def frozen_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` when the block ends.

    Covers both spellings of a BatchNorm update: an ``nn.BatchNorm`` module writing in place and an
    exported graph's ``copy_`` into its buffers.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


_TRANSIENT = [0]


@contextlib.contextmanager
def transient_graph() -> Iterator[None]:
    """The caller backpropagates through what it runs here before anything else runs (a pipeline
    stage's recompute, a last stage's forward and backward in one tick): a module whose backward trades
    compute for memory (a reversible chain, a stored-input block) runs its plain maths instead, since
    the graph it would avoid storing lives only that long."""
    _TRANSIENT[0] += 1
    try:
        yield
    finally:
        _TRANSIENT[0] -= 1


def in_transient_graph() -> bool:
    return _TRANSIENT[0] > 0


def plain_path() -> bool:
    """Whether a custom backward must step aside for the plain forward maths: under tracing, ONNX
    export or torch.compile/export (they see the ordinary ops, not an autograd.Function)."""
    compiler = getattr(torch, "compiler", None)
    exporting = bool(compiler and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or exporting


@contextlib.contextmanager
def batch_statistics_only(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Training-mode BatchNorm uses its batch statistics without touching its running statistics."""
    changed = []
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.training and sub.track_running_stats:
                sub.track_running_stats = False
                changed.append(sub)
    try:
        yield
    finally:
        for sub in changed:
            sub.track_running_stats = True


def math_attention() -> Any:
    """Scaled-dot-product attention on the math kernel: the fused CPU/GPU kernels have no vmap or
    forward-mode rules."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
