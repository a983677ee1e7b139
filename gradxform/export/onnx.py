"""ONNX export of a model (and of each stage), checked in onnxruntime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..nn.staged import stages_of
from ..passes.manager import max_abs_diff
from ..state import frozen_buffers


@dataclass
class OnnxResult:
    name: str
    path: str | None
    ok: bool
    max_abs_diff: float | None = None
    error: str | None = None
    exporter: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def _quiet():
    # The exporter logs a warning per missing optional op library (torchvision) and prints progress.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, path: Path, exporter: str) -> None:
    with _quiet():
        if exporter == "dynamo":
            torch.onnx.export(module, args, str(path), kwargs=kwargs or None, dynamo=True,
                              optimize=False, verbose=False, external_data=False)
        else:
            torch.onnx.export(module, args, str(path), kwargs=kwargs or None, dynamo=False)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line: the exporter wraps the real reason (an unsupported op)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = _ANSI.sub("", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def export_onnx(module: torch.nn.Module, args: tuple, kwargs: dict, path: str | Path, name: str = "model",
                exporter: str = "auto") -> OnnxResult:
    """Export ``module`` on its example inputs and compare onnxruntime with PyTorch.

    ``exporter``: ``dynamo`` (torch.export based), ``torchscript`` (the older tracer-based exporter,
    about 30x faster on these graphs), or ``auto`` (torchscript, then dynamo if it fails). Whichever
    runs, onnxruntime checks the file. Never raises: a failure is returned, so the other artefacts
    are still written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # like every other writer: out/model.onnx just works
    was_training = module.training
    module.eval()  # batch norm with running statistics: what ONNX inference means
    try:
        with torch.no_grad():
            expected = module(*args, **kwargs)
        errors = []
        for kind in (["torchscript", "dynamo"] if exporter == "auto" else [exporter]):
            try:
                _export(module, args, kwargs, path, kind)
            except Exception as e:
                errors.append(f"{kind}: {_first_line(e)}")
                continue
            try:
                diff = check_onnx(path, args, kwargs, expected)
            except Exception as e:
                return OnnxResult(name, str(path), False, None, f"onnxruntime: {_first_line(e)}", kind)
            return OnnxResult(name, str(path), True, diff, None, kind)
        return OnnxResult(name, None, False, None, "; ".join(errors), None)
    finally:
        module.train(was_training)


def check_onnx(path: Path, args: tuple, kwargs: dict, expected: Any) -> float:
    """Run the ONNX file in onnxruntime; the max absolute difference from ``expected``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: constant-folding notices are not the user's concern
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):  # inputs the graph does not use are dropped by the exporter
        inputs = inputs[: len(names)]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    got = session.run(None, feed)
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        raise ValueError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(want)}")
    return max((max_abs_diff(torch.as_tensor(g), w) for g, w in zip(got, want)), default=0.0)


def stage_inputs(staged: Any, args: tuple, kwargs: dict) -> list[tuple]:
    """The positional inputs each stage receives on the example (stage 0: the model's own)."""
    out = []
    with torch.no_grad():
        x = staged.first(*args, **kwargs)
        for stage in staged.stages[1:]:
            out.append(tuple(x))
            x = stage(*x)
    return out


def export_all(module: Any, args: tuple, kwargs: dict, folder: Path, exporter: str = "auto",
               progress: Any = None) -> list[OnnxResult]:
    """``model.onnx`` for the whole model and ``stage{i}.onnx`` per stage of a staged model."""
    results = []
    with frozen_buffers(module):
        tick = progress or (lambda n=1: None)
        results.append(export_onnx(module, args, kwargs, folder / "model.onnx", "model", exporter))
        tick(1)
        stages = stages_of(module)
        if stages is not None:
            feeds = [(module.first_inputs(args, kwargs), {})] + [(x, {}) for x in stage_inputs(module, args, kwargs)]
            for i, (stage, (a, k)) in enumerate(zip(stages, feeds)):
                results.append(export_onnx(stage, a, k, folder / f"stage{i}.onnx", f"stage{i}", exporter))
                tick(1)
    return results
