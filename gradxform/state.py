"""Running a model without leaving a trace in it.

gradxform runs models for its own purposes -- shape propagation, output checks, ONNX comparisons,
timing, the recompute inside a reversible backward. None of these may change what training sees:
BatchNorm running statistics and batch counters are restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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


def plain_path() -> bool:
    """Whether a custom backward must step aside for the plain forward maths: under tracing, ONNX
    export or torch.compile/export (they see the ordinary ops, not an autograd.Function)."""
    compiler = getattr(torch, "compiler", None)
    exporting = bool(compiler and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or exporting
