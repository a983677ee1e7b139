"""The compile pipeline shared by the CLI and the Python API: load, trace, annotate, run passes."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .errors import ModelLoadError, PassError, PipelineError, TraceError
from .frontend.loader import LoadedModel, load
from .frontend.tracer import trace
from .ir.analysis import Analysis, analyse
from .ir.cost import evaluate, hints, node_costs, total
from .ir.match import op_kind
from .ir.meta import flat_inputs, has_metadata, propagate, symbol_names, tags
from .ir.noops import remove_no_ops
from .passes import compiled_schedule, resolve_pipeline
from .passes.manager import CHECKS, PassContext, PassManager, compare, run_example


@dataclass
class Recipe:
    """How to rebuild a compiled model: its file, attribute, inputs, tracer and pipeline, and the
    schedule the pipeline compiles for (what ``--schedule auto`` trains with)."""

    source: Path | None
    attr: str | None
    args: tuple
    kwargs: dict
    tracer: str
    pipeline: str
    original_state: dict[str, torch.Tensor] = field(default_factory=dict)
    schedule: str | None = None


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
    if traced.tracer == "export" and has_metadata(gm):
        gm.meta["gx_symbols"] = symbol_names(gm)  # export's own symbolic values, named B/T
    else:
        try:
            propagate(gm, flat_inputs(gm, loaded.args, loaded.kwargs))
        except Exception as e:
            raise TraceError(f"running the model on its example inputs failed: {_first_line(e)}",
                             where=_failing_node(e) or loaded.spec,
                             hint="check that the example inputs (example_inputs() or --input-shape) have the "
                                  "shapes and dtypes the model expects") from None
    timings["metadata"] = time.perf_counter() - start
    start = time.perf_counter()
    removed = remove_no_ops(gm)
    if removed:
        traced.notes.append("removed nodes that compute nothing: "
                            + ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in removed.items()))
    annotate(gm, analyse(gm))
    timings["analysis"] = time.perf_counter() - start
    return gm, traced.tracer, traced.notes, timings


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _failing_node(e: BaseException) -> str | None:
    """'layer conv1' from the interpreter's account of which node raised (in the message or a note)."""
    text = "\n".join([str(e), *(getattr(e, "__notes__", None) or [])])
    m = re.search(r"While executing %(\w+) : .*?\[target=([\w.]+)\]", text)
    return f"layer {m.group(2)} (node {m.group(1)})" if m else None


def compile_loaded(loaded: LoadedModel, pipeline: str, *, tracer: str = "auto", check: bool | str = True,
                   rtol: float | None = None, atol: float | None = None, strict: bool = False) -> CompileResult:
    """Trace ``loaded`` and run ``pipeline``. ``check``: True/"sample" (a slice of the example batch),
    "full" (all of it) or False; ``strict``: a pass that changes nothing is an error."""
    passes = resolve_pipeline(pipeline)  # parse first: a typo fails before any tracing
    if check not in (True, False, *CHECKS):
        raise PipelineError(f"unknown output check {check!r}", hint="use True, False, 'sample' or 'full'")
    # The weights before any pass: an artefact rebuilds the model by replaying the pipeline on them.
    original = {k: v.detach().clone() for k, v in loaded.module.state_dict().items()}
    gm, used, notes, timings = prepare(loaded, tracer)
    ctx = PassContext(loaded.args, loaded.kwargs, check=check, rtol=rtol, atol=atol, strict=strict)
    trace_diff = reference = None
    if check:
        start = time.perf_counter()
        # The traced graph must compute what the model computes before any pass touches it; its
        # outputs are then the first pass's reference.
        try:
            expected = run_example(loaded.module, ctx)
        except Exception:
            if not ctx.sampling:
                raise
            # the model cannot run the slice: it fixes its batch size, or trains BatchNorm over one value
            ctx.full_check = True
            expected = run_example(loaded.module, ctx)
        reference = run_example(gm, ctx)
        trace_diff, ok, why = compare(expected, reference, rtol, atol)
        if not ok:
            raise PassError(f"the traced graph ({used}) does not reproduce the model's outputs: "
                            + (why or f"max abs difference {trace_diff:.3g}"), where="tracing",
                            hint="try the other tracer with --tracer fx|export")
        timings["trace_check"] = time.perf_counter() - start
    start = time.perf_counter()
    module, records = PassManager(passes, pipeline).run(gm, ctx, reference)
    timings["passes"] = time.perf_counter() - start
    report = {
        "model": loaded.spec,
        "tracer": used,
        "trace_notes": notes,
        "trace_max_abs_diff": trace_diff,
        "check": ctx.describe_check(),
        "pipeline": pipeline,
        "schedule": compiled_schedule(pipeline),
        "inputs": _describe_inputs(loaded),
        "symbols": {name: hint for name, hint in gm.meta.get("gx_symbols", {}).values()},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "passes": [r.as_dict() for r in records],
    }
    module.gx_report = report
    module.gx_recipe = Recipe(loaded.path, loaded.attr, loaded.args, loaded.kwargs, used, pipeline, original,
                              report["schedule"])
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
            tracer: str = "auto", check: bool | str = True, rtol: float | None = None,
            atol: float | None = None, strict: bool = False) -> CompileResult:
    """Compile an ``nn.Module`` (with example inputs) or a ``FILE[:ATTR]`` path; see :func:`compile_loaded`."""
    if isinstance(model, (str, Path)):
        loaded = load(str(model), input_shapes)
        if example_inputs is not None or example_kwargs:
            loaded.args, loaded.kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    else:
        if example_inputs is None and not example_kwargs:
            raise ModelLoadError("compiling an nn.Module needs example inputs",
                                 hint="pass example_inputs=(x,) (and example_kwargs={...} for keyword inputs)")
        loaded = LoadedModel(model, tuple(example_inputs or ()), dict(example_kwargs or {}))
    return compile_loaded(loaded, pipeline, tracer=tracer, check=check, rtol=rtol, atol=atol, strict=strict)


def inspect_loaded(loaded: LoadedModel, tracer: str = "auto") -> dict[str, Any]:
    """What the analysis sees: blocks, chains, cut points and a per-block symbolic cost table."""
    gm, used, notes, timings = prepare(loaded, tracer)
    an = analyse(gm)
    costs = node_costs(gm)
    values = hints(gm)
    chain_of = {id(b): i for i, chain in enumerate(an.chains) for b in chain}
    blocks = [{"id": b.id, "entry": b.entry.name, "exit": b.exit.name,
               "skip": "projection" if b.skip else "identity", "post_activation": b.post_act is not None,
               "invertible": b.invertible, "reason": b.reason, "chain": chain_of.get(id(b))}
              for b in an.blocks]
    cuts = [{"index": c.index, "after": c.after, "tensors": sum(1 for v in c.crossing if _tensor(v)),
             "bytes": str(c.bytes), "bytes_at_example": evaluate(c.bytes, values)}
            for c in an.valid_cuts]
    invalid: dict[str, int] = {}
    for c in an.cuts:
        if not c.valid:
            invalid[c.reason] = invalid.get(c.reason, 0) + 1
    segments: dict[str, list] = {}
    for n in an.order:
        gx = n.meta.get("gx", {})
        segments.setdefault(gx.get("block") or gx.get("role", "between"), []).append(n)
    table = []
    for name, nodes in segments.items():
        c = total(costs[n] for n in nodes)
        table.append({"segment": name, "nodes": len(nodes),
                      "flops": str(c.flops), "params": str(c.param_bytes), "act_bytes": str(c.act_bytes),
                      "flops_at_example": evaluate(c.flops, values),
                      "param_bytes_at_example": evaluate(c.param_bytes, values),
                      "act_bytes_at_example": evaluate(c.act_bytes, values)})
    whole = total(costs.values())
    return {"model": loaded.spec, "tracer": used, "trace_notes": notes, "nodes": len(gm.graph.nodes),
            "inputs": _describe_inputs(loaded),
            "symbols": {name: hint for name, hint in gm.meta.get("gx_symbols", {}).values()},
            "blocks": blocks, "chains": [[b.id for b in chain] for chain in an.chains],
            "cuts": cuts, "invalid_cuts": invalid, "segments": table,
            "total": {"flops": str(whole.flops), "flops_at_example": evaluate(whole.flops, values),
                      "params": str(whole.param_bytes), "act_bytes": str(whole.act_bytes)},
            "ops": sorted({op_kind(n, gm) for n in an.order}), "timings": timings}


def _tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)
