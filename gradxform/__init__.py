"""gradxform: a model compiler for training algorithms.

The public API (imported lazily, so that ``import gradxform`` does not import torch)::

    compile(model, pipeline, example_inputs=...)  -> transformed nn.Module (.gx_report holds the report)
    trace(model, example_inputs)                  -> torch.fx.GraphModule with shape metadata
    save(module, folder) / load(folder)           -> reloadable artefacts
    export_onnx(module, example_inputs, path)     -> ONNX file checked in onnxruntime
    render(module, path)                          -> SVG picture of the (staged) graph
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["compile", "trace", "save", "load", "export_onnx", "render", "GradxformError", "__version__"]


def compile(model: Any, pipeline: str, *, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, tracer: str = "auto", check: bool | str = True,
            rtol: float | None = None, atol: float | None = None, strict: bool = False) -> Any:
    """Trace ``model`` and run ``pipeline`` on it.

    ``model`` is an ``nn.Module`` (then ``example_inputs`` is required) or a ``"FILE[:ATTR]"`` path.
    Returns a GraphModule, or a StagedModule whose ``.stages`` are GraphModules; its ``gx_report``
    attribute holds the compile report. ``check``: compare outputs after every function-preserving
    pass on one sample of the example batch (True, the default), on all of it ("full"), or not
    (False). ``strict``: a pass that changes nothing raises instead of saying so in the report.
    """
    from .compiler import compile as _compile

    return _compile(model, pipeline, example_inputs=example_inputs, example_kwargs=example_kwargs,
                    tracer=tracer, check=check, rtol=rtol, atol=atol, strict=strict).module


def trace(model: Any, example_inputs: tuple, example_kwargs: dict | None = None, tracer: str = "auto") -> Any:
    """A GraphModule of ``model`` whose nodes carry shapes, block and role tags."""
    from .compiler import prepare
    from .frontend.loader import LoadedModel

    gm, _, _, _ = prepare(LoadedModel(model, tuple(example_inputs), dict(example_kwargs or {})), tracer)
    return gm


def save(module: Any, folder: Any) -> Any:
    """Write a compiled module to ``folder``; see :mod:`gradxform.export.artefact`."""
    from .export.artefact import save as _save

    return _save(module, folder)


def load(folder: Any) -> Any:
    """Rebuild a compiled module from ``folder``."""
    from .export.artefact import load as _load

    return _load(folder)


def export_onnx(module: Any, example_inputs: tuple, path: Any, example_kwargs: dict | None = None,
                exporter: str = "auto") -> Any:
    """Export to ONNX and compare onnxruntime with PyTorch; returns an OnnxResult."""
    from .export.onnx import export_onnx as _export

    return _export(module, tuple(example_inputs), dict(example_kwargs or {}), path, exporter=exporter)


def render(module: Any, path: Any, title: str = "") -> Any:
    """Draw the (staged) graph to ``path`` (SVG/PNG/PDF)."""
    from .export.render import render as _render

    return _render(module, path, title)


def __getattr__(name: str) -> Any:
    if name == "GradxformError":
        from .errors import GradxformError

        return GradxformError
    raise AttributeError(name)
