"""A reference F³ training loop in one process, for tests and bench/bench_f3.py only (not the runtime).

It trains a model compiled with the ``f3`` pass by one of five methods, all through the same
connectors (ALGORITHMS.md §7):

- ``bp``: connectors left alone (the identity): plain backprop;
- ``f3``: each connector injects e·B with e the sample's row of the error buffer (last epoch's error);
- ``dfa``: e = the current error, from an extra forward before each update (buffers frozen);
- ``drtp``: e = the target row (one-hot for classes);
- ``llo``: connectors cut the graph: only the block after the last connector trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from gradxform.autodiff.feedback import ErrorBuffer, error_rows, loss_value, target_rows, with_indices
from gradxform.nn.feedback import feedback_errors
from gradxform.state import frozen_buffers

METHODS = ("bp", "f3", "dfa", "drtp", "llo")


def batches(indexed: Any, size: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    """(index, x, y) micro-batches of an indexed TensorDataset; the order depends on (seed, epoch) only."""
    idx, x, y = indexed.tensors
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [(idx[order[i:i + size]], x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(idx), size)]


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, method: str, idx: torch.Tensor, x: torch.Tensor,
         y: torch.Tensor, loss: str, kind: str, buffer: ErrorBuffer | None) -> dict[str, Any]:
    """One update; returns the output, the loss and the error rows the connectors were handed."""
    classes = buffer.classes if buffer is not None else None
    if method == "bp":
        e, hand = None, contextlib.nullcontext()
    else:
        if method == "f3":
            e = buffer.rows(idx)
        elif method == "drtp":
            e = target_rows(y, loss, classes)
        elif method == "dfa":
            # the extra forward: same weights, same batch statistics, running statistics left alone
            with torch.no_grad(), frozen_buffers(model):
                e = error_rows(kind, loss, model(x), y)
        elif method == "llo":
            e = None
        else:
            raise ValueError(f"unknown method {method!r}")
        hand = feedback_errors(model, e)
    opt.zero_grad(set_to_none=True)
    with hand:
        out = model(x)
    value = loss_value(loss, out, y)
    value.backward()
    opt.step()
    if method == "f3":
        buffer.update(idx, out.detach(), y)   # the output of this step, taken before the update
    return {"out": out.detach(), "loss": float(value.detach()), "e": e}


@dataclass
class Run:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    buffer: ErrorBuffer
    losses: list[float] = field(default_factory=list)


def start(model: torch.nn.Module, train: Any, loss: str, kind: str, lr: float,
          dtype: torch.dtype = torch.float32) -> Run:
    indexed = with_indices(train)
    targets = indexed.tensors[2]
    classes = model_classes(model)
    return Run(model, torch.optim.Adam(model.parameters(), lr=lr),
               ErrorBuffer(targets, kind, loss, classes=classes, dtype=dtype))


def model_classes(model: torch.nn.Module) -> int:
    info = getattr(model, "gx_f3", None)
    if info is None:
        raise ValueError("the model was not compiled with the f3 pass")
    return info["classes"]


def epoch(run: Run, train: Any, method: str, loss: str, kind: str, batch: int, seed: int, number: int,
          record: list | None = None) -> None:
    run.model.train()
    for idx, x, y in batches(with_indices(train), batch, seed, number):
        result = step(run.model, run.opt, method, idx, x, y, loss, kind, run.buffer)
        run.losses.append(result["loss"])
        if record is not None:
            record.append((idx, result["out"], y, result["e"]))


def evaluate(model: torch.nn.Module, test: Any, loss: str) -> dict[str, float]:
    x, y = test.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    result = {"loss": float(loss_value(loss, out, y))}
    if loss == "mse":
        result["mse"] = result["loss"]
    else:
        result["accuracy"] = float((out.argmax(1) == (y if y.dim() == 1 else y.argmax(1))).double().mean())
    return result
