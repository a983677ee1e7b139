"""The compile pipeline shared by the CLI and the Python API: load, trace, annotate, run passes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .errors import PassError
from .frontend.loader import LoadedModel, load
from .frontend.tracer import trace
from .ir.analysis import Analysis, analyse
from .ir.meta import flat_inputs, propagate, tags
from .passes.base import resolve_pipeline
from .passes.manager import PassContext, PassManager, compare, run_example


@dataclass
class CompileResult:
    module: Any                     # a GraphModule or a StagedModule
    loaded: LoadedModel
    tracer: str
    pipeline: str
    report: dict[str, Any] = field(default_factory=dict)


def annotate(gm: fx.GraphModule, an: Analysis) -> None:
    """Tag nodes with their block and role (stem / block / skip / head) for reports and pictures."""
    in_block: dict[fx.Node, tuple[str, str]] = {}
    for b in an.blocks:
        for n in b.body + [b.add] + ([b.post_act] if b.post_act is not None else []):
            in_block[n] = (b.id, "block")
        for n in b.skip:
            in_block[n] = (b.id, "skip")
    first = min((an.order.index(b.body[0]) for b in an.blocks), default=len(an.order))
    last = max((an.order.index(b.exit) for b in an.blocks), default=-1)
    for i, n in enumerate(an.order):
        t = tags(n)
        if n in in_block:
            t["block"], t["role"] = in_block[n]
        else:
            t.pop("block", None)
            t["role"] = "stem" if i < first else "head" if i > last else "between"


def prepare(loaded: LoadedModel, tracer: str = "auto") -> tuple[fx.GraphModule, str, list[str], dict]:
    """Trace, propagate metadata and annotate; returns (graph, tracer used, notes, timings)."""
    timings = {}
    start = time.perf_counter()
    traced = trace(loaded.module, loaded.args, loaded.kwargs, tracer, source=loaded.path)
    timings["trace"] = time.perf_counter() - start
    gm = traced.gm
    start = time.perf_counter()
    if traced.tracer == "export":
        propagate(gm)  # export's own symbolic values, renamed
    else:
        propagate(gm, flat_inputs(gm, loaded.args, loaded.kwargs))
    timings["metadata"] = time.perf_counter() - start
    start = time.perf_counter()
    annotate(gm, analyse(gm))
    timings["analysis"] = time.perf_counter() - start
    return gm, traced.tracer, traced.notes, timings


def compile_loaded(loaded: LoadedModel, pipeline: str, *, tracer: str = "auto", check: bool = True,
                   rtol: float | None = None, atol: float | None = None) -> CompileResult:
    passes = resolve_pipeline(pipeline)  # parse first: a typo fails before any tracing
    gm, used, notes, timings = prepare(loaded, tracer)
    ctx = PassContext(loaded.args, loaded.kwargs, check=check, rtol=rtol, atol=atol)
    trace_diff = None
    if check:
        # The traced graph must compute what the model computes before any pass touches it.
        trace_diff, ok, why = compare(run_example(loaded.module, ctx), run_example(gm, ctx), rtol, atol)
        if not ok:
            raise PassError(f"the traced graph ({used}) does not reproduce the model's outputs: "
                            + (why or f"max abs difference {trace_diff:.3g}"), where="tracing",
                            hint="try the other tracer with --tracer fx|export")
    start = time.perf_counter()
    module, records = PassManager(passes, pipeline).run(gm, ctx)
    timings["passes"] = time.perf_counter() - start
    report = {
        "model": loaded.spec,
        "tracer": used,
        "trace_notes": notes,
        "trace_max_abs_diff": trace_diff,
        "pipeline": pipeline,
        "inputs": _describe_inputs(loaded),
        "symbols": {name: hint for name, hint in gm.meta.get("gx_symbols", {}).values()},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "passes": [r.as_dict() for r in records],
    }
    return CompileResult(module, loaded, used, pipeline, report)


def _describe_inputs(loaded: LoadedModel) -> dict[str, Any]:
    def one(v: Any) -> Any:
        return {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} if isinstance(
            v, torch.Tensor) else repr(v)

    out = {f"arg{i}": one(a) for i, a in enumerate(loaded.args)}
    out.update({k: one(v) for k, v in loaded.kwargs.items()})
    return out


def compile(model: Any, pipeline: str, *, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, input_shapes: list[str] | None = None,
            tracer: str = "auto", check: bool = True, rtol: float | None = None,
            atol: float | None = None) -> CompileResult:
    """Compile an ``nn.Module`` (with example inputs) or a ``FILE[:ATTR]`` path."""
    if isinstance(model, (str, Path)):
        loaded = load(str(model), input_shapes)
        if example_inputs is not None or example_kwargs:
            loaded.args, loaded.kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    else:
        if example_inputs is None and not example_kwargs:
            from .errors import ModelLoadError

            raise ModelLoadError("compiling an nn.Module needs example inputs",
                                 hint="pass example_inputs=(x,) (and example_kwargs={...} for keyword inputs)")
        loaded = LoadedModel(model, tuple(example_inputs or ()), dict(example_kwargs or {}))
    return compile_loaded(loaded, pipeline, tracer=tracer, check=check, rtol=rtol, atol=atol)
