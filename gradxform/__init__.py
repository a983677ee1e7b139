"""gradxform: a model compiler for training algorithms.

The public API (imported lazily, so that ``import gradxform`` does not import torch)::

    compile(model, pipeline, example_inputs=...)  -> transformed nn.Module (.gx_report holds the report)
    trace(model, example_inputs)                  -> torch.fx.GraphModule with shape metadata
    save(module, folder) / load(folder)           -> reloadable artefacts
    export_onnx(module, example_inputs, path)     -> ONNX file checked in onnxruntime
    render(module, path)                          -> SVG picture of the (staged) graph
    train(model, pipeline=None, epochs=..., ...)  -> per-epoch metrics, trained with the compiled-for schedule

See :mod:`gradxform.api`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("compile", "trace", "save", "load", "export_onnx", "render", "train")
__all__ = [*_API, "GradxformError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "GradxformError":
        from .errors import GradxformError

        return GradxformError
    raise AttributeError(f"module 'gradxform' has no attribute {name!r}")
