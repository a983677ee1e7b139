"""The public API, behind ``gradxform``'s lazy top-level names (importing gradxform imports no torch).

``compile`` / ``trace`` / ``save`` / ``load`` / ``export_onnx`` / ``render`` / ``train``: the CLI is a
front end over these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .compiler import compile as _compile
from .compiler import prepare
from .errors import ModelLoadError
from .export.artefact import load as _load
from .export.artefact import save as _save
from .export.onnx import export_onnx as _export_onnx
from .export.render import render as _render
from .frontend.loader import LoadedModel
from .nn.staged import StagedModule
from .runtime.data import datasets_for
from .runtime.train import Callback, TrainConfig, Trainer


def compile(model: Any, pipeline: str, *, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, tracer: str = "auto", check: bool | str = True,
            rtol: float | None = None, atol: float | None = None, strict: bool = False) -> Any:
    """Trace ``model`` and run ``pipeline`` on it.

    ``model`` is an ``nn.Module`` (then ``example_inputs`` is required) or a ``"FILE[:ATTR]"`` path.
    Returns a GraphModule, or a StagedModule whose ``.stages`` are GraphModules; its ``gx_report``
    attribute holds the compile report (``gx_report["schedule"]``: the schedule it compiles for).
    ``check``: compare outputs after every function-preserving pass on one sample of the example batch
    (True, the default), on all of it ("full"), or not (False). ``strict``: a pass that changes nothing
    raises instead of saying so in the report.
    """
    return _compile(model, pipeline, example_inputs=example_inputs, example_kwargs=example_kwargs,
                    tracer=tracer, check=check, rtol=rtol, atol=atol, strict=strict).module


def trace(model: Any, example_inputs: tuple, example_kwargs: dict | None = None, tracer: str = "auto") -> Any:
    """A GraphModule of ``model`` whose nodes carry shapes, block and role tags."""
    gm, _, _, _ = prepare(LoadedModel(model, tuple(example_inputs), dict(example_kwargs or {})), tracer)
    return gm


def save(module: Any, folder: Any) -> Any:
    """Write a compiled module to ``folder``; see :mod:`gradxform.export.artefact`."""
    return _save(module, folder)


def load(folder: Any) -> Any:
    """Rebuild a compiled module from ``folder``."""
    return _load(folder)


def export_onnx(module: Any, example_inputs: tuple, path: Any, example_kwargs: dict | None = None,
                exporter: str = "auto") -> Any:
    """Export to ONNX and compare onnxruntime with PyTorch; returns an OnnxResult."""
    return _export_onnx(module, tuple(example_inputs), dict(example_kwargs or {}), path, exporter=exporter)


def render(module: Any, path: Any, title: str = "") -> Any:
    """Draw the (staged) graph to ``path`` (SVG/PNG/PDF)."""
    return _render(module, path, title)


def staged(target: Any, pipeline: str | None = None, *, stages: int = 1, input_shapes: Sequence[str] | None = None,
           tracer: str = "auto", seed: int = 0) -> StagedModule:
    """The model to train, as a StagedModule: an artefact folder, a compiled module, or a model file
    compiled with ``pipeline`` (default ``split{stages=STAGES}``).

    The RNG is seeded first, so a model built from a file starts from the same weights in every
    process (and in every run with the same seed).
    """
    torch.manual_seed(seed)
    if isinstance(target, (str, Path)) and Path(target).is_dir():
        if pipeline:
            raise ModelLoadError("a pipeline (--pass) applies to a model file; this is a compiled artefact folder",
                                 hint="recompile with 'gradxform compile' to change the pipeline")
        module = _load(target)
    elif isinstance(target, (str, Path)):
        module = _compile(str(target), pipeline or f"split{{stages={stages}}}", input_shapes=list(input_shapes or []),
                          tracer=tracer).module
    else:
        module = target
    if isinstance(module, StagedModule):
        return module
    one = StagedModule([module])
    for attr in ("gx_recipe", "gx_report"):
        if hasattr(module, attr):
            setattr(one, attr, getattr(module, attr))
    return one


def train(model: Any, pipeline: str | None = None, *, callbacks: Sequence[Callback] = (), **config: Any
          ) -> list[dict[str, Any]]:
    """Train a compiled module, an artefact folder or a model file (compiled with ``pipeline``) in this
    process with the schedule it was compiled for (or ``schedule=...``); the other keyword arguments
    are :class:`gradxform.runtime.train.TrainConfig` fields (``epochs``, ``data``, ``lr``, ``out``, ...).
    Returns one metrics record per epoch."""
    cfg = TrainConfig(**config)
    module = staged(model, pipeline, seed=cfg.seed)
    recipe = getattr(module, "gx_recipe", None)
    if recipe is None:
        raise ModelLoadError("gradxform.train needs a compiled model (it reads the example inputs' shape)",
                             hint="pass a module from gradxform.compile, an artefact folder, or a model file")
    train_set, test_set = datasets_for(module, recipe.args, recipe.kwargs, cfg.data, cfg.seed)
    return Trainer(module, cfg, callbacks=callbacks).fit(train_set, test_set)
