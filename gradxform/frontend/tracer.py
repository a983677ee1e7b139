"""The two front doors into the IR: ``torch.fx.symbolic_trace`` and ``torch.export`` (non-strict).

``fx`` keeps standard layers as ``call_module`` nodes, which passes like best; it fails on Python
control flow over shapes, dataclass outputs and similar. ``export`` handles those and gives ATen-level
graphs with parameters as ``get_attr``; gradxform exports with the batch (and sequence) dimensions
dynamic so the graph and its costs stay symbolic, falling back to static sizes if the model insists.
``auto`` tries fx first, then export, and says why it fell back.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import TraceError
from ..ir.meta import is_sequence_input
from .loader import user_frame

TRACERS = ("auto", "fx", "export")


@dataclass
class Traced:
    gm: fx.GraphModule
    tracer: str
    notes: list[str] = field(default_factory=list)


def _forward_params(model: torch.nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(model.forward).parameters.values())


def trace_fx(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    # Parameters the example does not supply are fixed to their defaults: tracing them as proxies
    # would take the `is not None` branch and break calls that leave them out.
    params = _forward_params(model)
    given = {p.name for p in params[: len(args)]} | set(kwargs)
    concrete = {p.name: p.default for p in params
                if p.name not in given and p.default is not inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    tracer = GxTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.meta["gx_tracer"] = "fx"
    return gm


class GxTracer(fx.Tracer):
    """symbolic_trace's tracer, keeping gradxform's own modules as leaves.

    A module class that sets ``gx_leaf = True`` (a ReversibleChain, whose forward runs a custom
    autograd.Function) stays one ``call_module`` node: tracing into it would inline the Function, the
    gradients would stay right but the memory saving would silently vanish.
    """

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return getattr(m, "gx_leaf", False) or super().is_leaf_module(m, module_qualified_name)


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    from torch.export import Dim

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    spec: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            dims = {0: Dim.AUTO}
            if is_sequence_input(value):
                dims[1] = Dim.AUTO
            spec[name] = dims
        else:
            spec[name] = None
    return spec


def trace_export(model: torch.nn.Module, args: tuple, kwargs: dict, notes: list[str]) -> fx.GraphModule:
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(model, args, kwargs),
                                 strict=False)
    except Exception as e:  # a model that specialises its sizes still exports statically
        notes.append(f"export with a dynamic batch size failed ({type(e).__name__}); exported with static sizes")
        ep = torch.export.export(model, args, kwargs, strict=False)
    return normalise_export(ep.module())


def normalise_export(exported: torch.nn.Module) -> fx.GraphModule:
    """A plain GraphModule from ``ExportedProgram.module()``.

    The unlifted module guards its inputs through a ``_guards_fn`` submodule and pre-hooks tied to
    the export; gradxform's passes rewrite the graph, so both are dropped. The pytree code generator
    stays: the module still takes the model's own (args, kwargs) and returns its own output structure.
    """
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    gm = fx.GraphModule(exported, graph, class_name="ExportedGraphModule")
    gm.meta["gx_tracer"] = "export"
    return gm


def _describe(e: BaseException, path: Path | None) -> str:
    where = user_frame(e, path)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__} at {where}: {msg}" if where else f"{type(e).__name__}: {msg}"


def trace(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, tracer: str = "auto",
          source: Path | None = None) -> Traced:
    """Trace ``model`` on its example inputs into a GraphModule."""
    kwargs = kwargs or {}
    if tracer not in TRACERS:
        raise TraceError(f"unknown tracer '{tracer}'", hint=f"choose one of {', '.join(TRACERS)}")
    notes: list[str] = []
    failures: list[str] = []
    if tracer in ("auto", "fx"):
        try:
            return Traced(trace_fx(model, args, kwargs), "fx", notes)
        except Exception as e:
            failures.append(f"torch.fx.symbolic_trace failed: {_describe(e, source)}")
            if tracer == "fx":
                raise TraceError(failures[0], hint="try --tracer export, which handles Python control flow "
                                 "over shapes, dict/dataclass outputs and keyword inputs") from None
            notes.append(failures[-1] + "; fell back to torch.export")
    try:
        return Traced(trace_export(model, args, kwargs, notes), "export", notes)
    except Exception as e:
        failures.append(f"torch.export failed: {_describe(e, source)}")
    if "Cache" in "\n".join(failures) and getattr(getattr(model, "config", None), "use_cache", False):
        # HuggingFace models return a key/value cache object by default, which torch.export cannot carry
        raise TraceError("could not trace the model: it returns a key/value cache object:\n  " + "\n  ".join(failures),
                         hint="build it with use_cache=False (e.g. GPT2Config(..., use_cache=False)), or set "
                              "model.config.use_cache = False before compiling")
    raise TraceError("could not trace the model:\n  " + "\n  ".join(failures),
                     hint="make control flow independent of tensor values (torch.cond for data-dependent "
                          "branches), check that the example inputs match forward(), or make the failing "
                          "layer a leaf")
