"""Runs a pipeline of passes, verifying the graph after every one.

After each pass the manager lints the graph(s), refreshes shape metadata, and -- for a pass that
declares it preserves the model's function -- runs the example inputs through the new module and
compares with the module before it, naming the pass that broke equality. A failing pass is reported
with its position in the pipeline and the passes that ran before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import GradxformError, PassError
from ..ir.cost import evaluate, hints, node_costs, total
from ..ir.meta import has_metadata, propagate
from ..nn.staged import StagedModule, stages_of
from ..state import frozen_buffers
from .base import Pass, PassResult


CHECKS = ("sample", "full")


@dataclass
class PassContext:
    """What every pass may read: example inputs, verification settings, the model's file.

    ``check``: True (or "sample") compares outputs on a slice of the example batch, its first
    ``SAMPLES`` sample(s); "full" on the whole example batch; False not at all. Passes themselves
    (balancing by measured time, sizing heads) always see the whole batch in ``args``/``kwargs``.
    ``strict``: a pass that changes nothing is an error instead of a line in the report.
    """

    args: tuple
    kwargs: dict = field(default_factory=dict)
    check: bool | str = True
    rtol: float | None = None
    atol: float | None = None
    seed: int = 0
    strict: bool = False
    full_check: bool = False  # set when the slice cannot run (a model that fixes its batch size)

    @property
    def checking(self) -> bool:
        return bool(self.check)

    def _slice(self) -> tuple[tuple, dict] | None:
        if self.check == "full" or not self.check or self.full_check:
            return None
        return batch_slice(self.args, self.kwargs, SAMPLES)

    @property
    def sampling(self) -> bool:
        """Whether the check runs on a slice of the example batch."""
        return self._slice() is not None

    def check_inputs(self) -> tuple[tuple, dict]:
        """The inputs the output check runs on (see the class docstring)."""
        return self._slice() or (self.args, self.kwargs)

    def describe_check(self) -> str:
        if not self.check:
            return "off"
        if not self.sampling:
            return "the whole example batch"
        return f"{SAMPLES} of the {_batch(self.args, self.kwargs)} samples of the example batch"


# One sample: the batch's rows run the same graph, so a rewrite wrong for one is wrong for it; the
# check then costs a few forwards at batch 1 (ResNet-50 at 224x224 compiles in under 2 s with it). A
# model that cannot run one sample (BatchNorm training over one value) is checked on the whole batch.
SAMPLES = 1


def _batch(args: tuple, kwargs: dict) -> int | None:
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()), None)
    return None if first is None else first.shape[0]


def batch_slice(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict] | None:
    """The first ``n`` samples of every input whose leading size is the batch's; None if no smaller."""
    batch = _batch(args, kwargs)
    if batch is None or batch <= n:
        return None

    def cut(t: Any) -> Any:
        return t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t

    return pytree.tree_map(cut, (tuple(args), dict(kwargs)))


@dataclass
class PassRecord:
    name: str
    spec: str
    seconds: float
    changed: bool
    nodes: tuple[int, int]
    params: tuple[int, int]
    flops: tuple[float, float]
    notes: list[str]
    info: dict[str, Any]
    max_abs_diff: float | None = None
    unchanged: str | None = None  # one line: the pass changed nothing, and why

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "seconds": round(self.seconds, 4),
                "changed": self.changed, "nodes": list(self.nodes), "params": list(self.params),
                "flops": list(self.flops), "notes": self.notes, "info": self.info,
                "max_abs_diff": self.max_abs_diff, "unchanged": self.unchanged}


def graphs_of(module: Any) -> list[fx.GraphModule]:
    """The GraphModule(s) making up a module: itself, or a staged module's stages."""
    stages = stages_of(module)
    if stages is not None:
        return stages
    return [module] if isinstance(module, fx.GraphModule) else []


def stats(module: Any) -> tuple[int, int, float]:
    """(nodes, parameters, FLOPs at the example sizes) of a graph or staged module."""
    nodes = sum(len(g.graph.nodes) for g in graphs_of(module))
    params = sum(p.numel() for p in module.parameters())
    flops = 0.0
    for g in graphs_of(module):
        flops += evaluate(total(node_costs(g).values()).flops, hints(g))
    return nodes, params, flops


def run_example(module: Any, ctx: PassContext) -> Any:
    """Outputs on the check's inputs (:meth:`PassContext.check_inputs`; the whole example batch when
    the check is off), leaving the module's buffers and the global RNG untouched."""
    args, kwargs = ctx.check_inputs()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), frozen_buffers(module):
        torch.manual_seed(ctx.seed)
        return module(*args, **kwargs)


def unchanged_line(name: str, notes: list[str]) -> str:
    """'highway changed nothing: <each note>', the one line a report gives a pass that did nothing."""
    return f"{name} changed nothing: " + ("; ".join(notes) if notes else "it gave no reason")


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| elementwise in float64, zero where both hold the same value (equal infinities, NaNs)."""
    a, b = a.detach().double(), b.detach().double()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(a), (a - b).abs().nan_to_num(nan=float("inf")))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(abs_diff(a, b).max()) if a.numel() else 0.0


def default_tolerance(outputs: Any) -> tuple[float, float]:
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if leaves and all(t.dtype == torch.float64 for t in leaves if t.is_floating_point()):
        return 1e-10, 1e-12
    return 1e-5, 1e-6


def compare(before: Any, after: Any, rtol: float | None, atol: float | None) -> tuple[float, bool, str]:
    """Max absolute difference between two output structures, and whether it is within tolerance."""
    a_leaves, a_spec = pytree.tree_flatten(before)
    b_leaves, b_spec = pytree.tree_flatten(after)
    if a_spec != b_spec:
        return float("inf"), False, f"output structure changed: {a_spec} -> {b_spec}"
    d_rtol, d_atol = default_tolerance(before)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    worst, ok = 0.0, True
    for x, y in zip(a_leaves, b_leaves):
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return float("inf"), False, f"output shape changed: {tuple(x.shape)} -> {tuple(y.shape)}"
            if x.numel():
                diff = abs_diff(x, y)
                worst = max(worst, float(diff.max()))
                ok = ok and bool((diff <= atol + rtol * x.double().abs().nan_to_num(posinf=0.0)).all())
        elif x != y:
            return float("inf"), False, f"output value changed: {x!r} -> {y!r}"
    return worst, ok, ""


class PassManager:
    """Applies passes in order; see the module docstring for what it checks."""

    def __init__(self, passes: list[Pass], pipeline_text: str = ""):
        self.passes = passes
        self.text = pipeline_text or ",".join(p.describe() for p in passes)

    def run(self, module: Any, ctx: PassContext, reference: Any = None) -> tuple[Any, list[PassRecord]]:
        """Run the passes on ``module``; ``reference``: its outputs on the check's inputs, if known."""
        records: list[PassRecord] = []
        # after the last function-preserving pass nothing is compared: no need to run the model
        last_check = max((i for i, p in enumerate(self.passes) if p.preserves_function), default=-1)
        if ctx.checking and reference is None and last_check >= 0:
            reference = run_example(module, ctx)
        for i, p in enumerate(self.passes):
            ran = [r.spec for r in records]
            where = f"step {i + 1} of pipeline '{self.text}'" + (f" (after {', '.join(ran)})" if ran else "")
            before = stats(module)
            start = time.perf_counter()
            try:
                result = self._apply(p, module, ctx)
                for g in graphs_of(result.module):
                    g.graph.lint()
                    if result.changed:
                        g.recompile()
                        if not has_metadata(g):
                            propagate(g)
            except GradxformError as e:
                e.where = e.where or where
                raise
            except Exception as e:
                raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}", where=where,
                                hint="this is likely a bug in the pass; rerun with the pass removed to "
                                     "get the other artefacts") from e
            seconds = time.perf_counter() - start
            unchanged = None if result.changed else unchanged_line(p.name, result.notes)
            if unchanged and ctx.strict:
                raise PassError(unchanged, where=where,
                                hint=f"change the options of '{p.name}' (gradxform passes {p.name}), drop it "
                                     f"from the pipeline, or compile without --strict")
            module = result.module
            diff = None
            if ctx.checking and i <= last_check:
                outputs = run_example(module, ctx)
                if p.preserves_function:
                    diff, ok, why = compare(reference, outputs, ctx.rtol, ctx.atol)
                    if not ok:
                        raise PassError(f"pass '{p.name}' changed the model's outputs on the example inputs: "
                                        + (why or f"max abs difference {diff:.3g}"), where=where,
                                        hint="raise --rtol/--atol if the difference is rounding, "
                                             "or rerun with --no-check to keep the artefacts")
                reference = outputs
            after = stats(module)
            records.append(PassRecord(p.name, p.describe(), seconds, result.changed,
                                      (before[0], after[0]), (before[1], after[1]),
                                      (before[2], after[2]), result.notes, result.info, diff, unchanged))
        return module, records

    @staticmethod
    def _apply(p: Pass, module: Any, ctx: PassContext) -> PassResult:
        if not isinstance(module, StagedModule) or p.whole_model:
            return p.run(module, ctx)
        # A per-graph pass on a staged model runs on each stage in turn.
        changed, notes, info = False, [], {}
        for j, stage in enumerate(module.stages):
            r = p.run(stage, ctx)
            module.stages[j] = r.module
            changed |= r.changed
            notes += [f"stage {j}: {n}" for n in r.notes]
            info[f"stage{j}"] = r.info
        return PassResult(module, changed, notes, info)
