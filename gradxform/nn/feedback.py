"""The F³ feedback connector: the module the ``f3`` pass puts after every block (ALGORITHMS.md §7).

A connector holds its fixed feedback matrix ``B`` (C × n, n the values per sample of the activation
it sits on) as a buffer: saved with the model, identical on every rank, never seen by an optimizer,
weight decay or DDP's gradient reduction. What it does depends on what the training loop handed it
for the current micro-batch:

==========================  ===================================================================
nothing (the default)       the identity: the model is the original model, trained by backprop
``set_error(e)``, e (N, C)  F³ / DFA / DRTP: forward h unchanged; backward returns e_n · B per sample
                            and drops the gradient coming from later blocks
``set_error(None)``         LLO: the graph is cut (``h.detach()``); the block gets no gradient
==========================  ===================================================================

In eval mode, under ``torch.no_grad()`` and while exporting (ONNX, ``torch.export``), a connector is
always the identity, so evaluation, the PassManager's output check and DFA's extra forward see the
original model.

The contract for the training loop: before the forward of a micro-batch, hand every connector of the
module the micro-batch's error rows, e.g. with the context manager ::

    with feedback_errors(model, buffer.rows(indices)):    # F³ (drtp: target rows; llo: None)
        out = model(x)
    loss_value(loss, out, y).backward()                   # last block: true gradient; others: e·B
    optimizer.step()
    buffer.update(indices, out.detach(), y)               # this step's errors, for the next epoch

``e`` is saved by the forward, so the backward may run after the block ends. A pipeline stage whose
output ends in a connector trains at once with ``feedback_backward(out)`` (no loss, no message from a
later stage).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..autodiff.feedback import feedback, feedback_matrix
from ..errors import GradxformError
from ..state import plain_path


class FeedbackConnector(nn.Module):
    """After block k: forward the identity, backward ``e_n · B_k`` (see the module docstring).

    Args:
        shape: one sample's activation shape (without the batch dimension): (C, H, W), (T, D) or (D,).
        classes: C, the model's output width (the error's length).
        init: how B is drawn: kaiming, trinomial, binomial or identity.
        seed, index: B is drawn from a generator seeded by (seed, index), index = the connector's
            position in the model, so every connector has its own B and every rank the same ones.
    """

    gx_leaf = True  # a tracer leaf: tracing into it would inline the Function and lose its backward

    def __init__(self, shape: tuple[int, ...], classes: int, init: str = "kaiming", seed: int = 0, index: int = 0,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        self.shape, self.classes, self.init = tuple(int(s) for s in shape), int(classes), init
        self.seed, self.index = seed, index
        width = math.prod(self.shape)
        self.register_buffer("B", feedback_matrix(init, self.classes, width, seed, index, dtype, device))
        self._mode, self._error = "identity", None

    def set_error(self, e: torch.Tensor | None) -> None:
        """The error rows (N, C) of the next forward's micro-batch; None cuts the graph (LLO)."""
        if e is not None and (not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[1] != self.classes):
            got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise GradxformError(f"feedback connector {self.index}: error rows must be (N, {self.classes}), got {got}")
        self._mode, self._error = ("cut" if e is None else "feedback"), e

    def clear(self) -> None:
        """Back to the identity (plain backprop through the connector)."""
        self._mode, self._error = "identity", None

    @property
    def mode(self) -> str:
        """'identity', 'feedback' or 'cut': what the next training forward does."""
        return self._mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._mode == "identity" or not self.training or not torch.is_grad_enabled() or plain_path():
            return h
        if self._mode == "cut":
            return h.detach()
        e = self._error
        if e.shape[0] != h.shape[0]:
            raise GradxformError(f"feedback connector {self.index}: {e.shape[0]} error rows for a micro-batch of "
                                 f"{h.shape[0]} samples",
                                 hint="hand the connectors the rows of exactly this micro-batch's samples")
        return feedback(h, e, self.B)

    def extra_repr(self) -> str:
        return (f"shape=(N, {', '.join(map(str, self.shape))}), classes={self.classes}, init={self.init}, "
                f"B={self.classes}x{math.prod(self.shape)}")


def connectors(module: nn.Module) -> list[FeedbackConnector]:
    """The module's feedback connectors, in module order (for a staged model: stage by stage)."""
    return [m for m in module.modules() if isinstance(m, FeedbackConnector)]


@contextlib.contextmanager
def feedback_errors(module: nn.Module, e: torch.Tensor | None) -> Iterator[list[FeedbackConnector]]:
    """Hand every connector of ``module`` the error rows ``e`` (None: cut, LLO) for the forwards in the
    block; afterwards each connector is back to what it was (the identity unless set otherwise)."""
    found = connectors(module)
    before = [(c._mode, c._error) for c in found]
    try:
        for c in found:
            c.set_error(e)
        yield found
    finally:
        for c, (mode, error) in zip(found, before):
            c._mode, c._error = mode, error


__all__ = ["FeedbackConnector", "connectors", "feedback_errors"]
